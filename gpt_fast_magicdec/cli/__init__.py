"""The command-line programs: `generate` (gfm-generate), `bench` (gfm-bench), and the options and
checks they share (`options`). The converter's CLI is gpt_fast_magicdec.convert (gfm-convert)."""
