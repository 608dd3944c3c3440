"""Benchmark plain decoding against MagicDec speculative decoding: `python bench.py --help`.

The CLI lives in the package (gpt_fast_magicdec/cli/bench.py) so that an installed copy has it
too, as the `gfm-bench` command; this file runs it from a checkout.
"""
from gpt_fast_magicdec.cli.bench import console_main

if __name__ == "__main__":
    console_main()
