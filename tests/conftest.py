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
