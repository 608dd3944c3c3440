"""Test-session set-up.

Without a GPU the Triton kernels run in Triton's interpreter. triton reads TRITON_INTERPRET when it
is first imported (that is when `@triton.jit` picks compiled or interpreted kernels), so it is set
here, before any test module imports triton. `--attention auto` still picks the plain-torch path
on CPU; only tests that ask for the kernels run them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CLI tests (generate.py, bench.py, torchrun launches, which inherit the environment) check exact
# fp32 output on CPU; on a CUDA machine they would otherwise default to bf16 with compile and graphs.
# A test that names --device still gets that device; the GPU-only tests build their models directly.
os.environ.setdefault("GPT_FAST_MAGICDEC_DEVICE", "cpu")
