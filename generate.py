"""Generate text with MagicDec speculative decoding: `python generate.py --help`.

The CLI lives in the package (gpt_fast_magicdec/cli/generate.py) so that an installed copy has it
too, as the `gfm-generate` command; this file runs it from a checkout, and is what torchrun
launches: `torchrun --nproc_per_node 8 generate.py --bsz 64 --gamma 3`.
"""
from gpt_fast_magicdec.cli.generate import console_main

if __name__ == "__main__":
    console_main()
