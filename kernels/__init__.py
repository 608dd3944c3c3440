"""Decode-attention kernels (Triton) and their plain-torch reference twins.

`decode_attention_triton` is imported lazily (module __getattr__): `import kernels` never needs
triton, and TRITON_INTERPRET is read when the kernel module is first imported (that is when
`@triton.jit` decides between compiled and interpreted kernels), not when `kernels` is.
"""
from __future__ import annotations

import os

import torch

from .reference import decode_attention_reference, full_view_mask, sparse_view_keys

__all__ = ["decode_attention_reference", "decode_attention_triton", "full_view_mask",
           "sparse_view_keys", "triton_available"]


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
