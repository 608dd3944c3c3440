"""Decode-attention kernels (Triton) and their plain-torch reference twins.

The modules live in the repository's top-level `kernels/` folder (its layout) and are linked in
here, so they install and import as `gpt_fast_magicdec.kernels`. The top-level folder has no
`__init__.py` on purpose: run from a checkout, where the checkout is on sys.path, it is then at most
a namespace portion, and never shadows the published `kernels` package that other libraries
(transformers among them) import.

`decode_attention_triton` is imported lazily (module __getattr__): importing this package never needs
triton, and TRITON_INTERPRET is read when the kernel module is first imported (that is when
`@triton.jit` decides between compiled and interpreted kernels), not when this package is.
"""
from __future__ import annotations

import os

import torch

from .reference import decode_attention_reference, full_view_mask, sparse_view_keys

__all__ = ["decode_attention_reference", "decode_attention_triton", "full_view_mask", "kernel_supports",
           "sparse_view_keys", "triton_available"]

KERNEL_MAX_ROWS = 256  # G*T query rows in one tile; more is prefill territory (reference / SDPA path)


def kernel_supports(n_rows: int, head_dim: int) -> bool:
    """Shapes decode_attention_triton takes: G*T = n_rows <= 256 and a head_dim in 16..256 (any
    value: the tile is padded to the next power of two)."""
    return 16 <= head_dim <= 256 and n_rows <= KERNEL_MAX_ROWS


def triton_available(device) -> bool:
    """True if triton imports and can run on `device`: a CUDA device, or any device in interpreter mode."""
    try:
        import triton
    except Exception:  # not installed, or a broken install: fall back to the reference
        return False
    try:
        interpret = bool(triton.knobs.runtime.interpret)  # accepts 1 / true / on like triton itself
    except AttributeError:  # older triton without knobs
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return interpret or torch.device(device).type == "cuda"


def __getattr__(name: str):
    if name == "decode_attention_triton":
        from .decode_attention import decode_attention_triton
        return decode_attention_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
