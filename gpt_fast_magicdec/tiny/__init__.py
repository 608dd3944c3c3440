"""The bundled tiny Llama: a ~6M-parameter GQA Llama trained on CPU on public-domain books
(see `train.py` and `model/train_log.json`), shipped in Hugging Face layout under `model/`, so the
engine, its tests and its README run on real weights without any download.

    from gpt_fast_magicdec.tiny import bundled_checkpoint
    ckpt = bundled_checkpoint()   # converted once into the user cache, then reused
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASHED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer.json", "tokenizer_config.json")


def bundled_hf_dir() -> Path:
    """The bundled model's Hugging Face directory (inside the installed package)."""
    return Path(__file__).resolve().parent / "model"


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt-fast-magicdec"


def _fingerprint(hf_dir: Path) -> str:
    """Short hash of the files the converted checkpoint is made from: a retrained model gets a
    new cache directory instead of a stale one."""
    h = hashlib.sha256()
    for name in _HASHED_FILES:
        path = hf_dir / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def bundled_checkpoint() -> Path:
    """The bundled model as an engine checkpoint, converted on first use into
    `$XDG_CACHE_HOME/gpt-fast-magicdec/tiny-<hash>` (`~/.cache/...` by default) and reused after.

    The converter assembles its output in a temporary directory and renames it into place, so a
    crashed or concurrent first use never leaves a half-written checkpoint behind."""
    from convert.convert_hf_checkpoint import convert_hf_checkpoint

    from ..config import ENGINE_CONFIG_NAME
    from ..errors import UserError

    hf_dir = bundled_hf_dir()
    if not (hf_dir / "model.safetensors").is_file():
        raise UserError(f"the bundled tiny model is missing from {hf_dir}; reinstall the package or "
                        "pass --checkpoint DIR")
    out = _cache_root() / f"tiny-{_fingerprint(hf_dir)}"
    if (out / ENGINE_CONFIG_NAME).is_file():
        return out
    try:
        return convert_hf_checkpoint(hf_dir, out, force=True)
    except OSError:
        if (out / ENGINE_CONFIG_NAME).is_file():  # another process finished the same conversion first
            return out
        raise


__all__ = ["bundled_hf_dir", "bundled_checkpoint"]
