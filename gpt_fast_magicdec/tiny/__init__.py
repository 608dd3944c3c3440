"""The bundled tiny Llama: a ~6M-parameter GQA Llama trained on CPU on public-domain books
(see `train.py` and `model/train_log.json`), shipped in Hugging Face layout under `model/`, so the
engine, its tests and its README run on real weights without any download. Beside it, under
`draft/`, a ~1.2M-parameter standalone draft model with the same tokenizer, trained on the same books.

    from gpt_fast_magicdec.tiny import bundled_checkpoint, bundled_draft_checkpoint
    ckpt = bundled_checkpoint()          # converted once into the user cache, then reused
    draft = bundled_draft_checkpoint()   # likewise; `generate.py --draft-checkpoint bundled-draft`
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

_HASHED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer.json", "tokenizer_config.json")


# What `--draft-checkpoint` accepts in place of a directory to mean the bundled draft model.
BUNDLED_DRAFT_NAME = "bundled-draft"


def bundled_hf_dir() -> Path:
    """The bundled model's Hugging Face directory (inside the installed package)."""
    return Path(__file__).resolve().parent / "model"


def bundled_draft_hf_dir() -> Path:
    """The bundled standalone draft model's Hugging Face directory (inside the installed package)."""
    return Path(__file__).resolve().parent / "draft"


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


def _converted(hf_dir: Path, prefix: str, what: str, flag: str) -> Path:
    from ..convert.convert_hf_checkpoint import convert_hf_checkpoint

    from ..config import ENGINE_CONFIG_NAME
    from ..errors import UserError

    if not (hf_dir / "model.safetensors").is_file():
        raise UserError(f"the bundled {what} is missing from {hf_dir}; reinstall the package or pass {flag}")
    out = _cache_root() / f"{prefix}-{_fingerprint(hf_dir)}"
    if (out / ENGINE_CONFIG_NAME).is_file():
        return out
    try:
        return convert_hf_checkpoint(hf_dir, out, force=True)
    except OSError:
        if (out / ENGINE_CONFIG_NAME).is_file():  # another process finished the same conversion first
            return out
        raise


def bundled_checkpoint() -> Path:
    """The bundled model as an engine checkpoint, converted on first use into
    `$XDG_CACHE_HOME/gpt-fast-magicdec/tiny-<hash>` (`~/.cache/...` by default) and reused after.

    The converter assembles its output in a temporary directory and renames it into place, so a
    crashed or concurrent first use never leaves a half-written checkpoint behind."""
    return _converted(bundled_hf_dir(), "tiny", "tiny model", "--checkpoint DIR")


def bundled_draft_checkpoint() -> Path:
    """The bundled standalone draft model as an engine checkpoint, converted on first use into
    `$XDG_CACHE_HOME/gpt-fast-magicdec/tiny-draft-<hash>` and reused after (as `bundled_checkpoint`)."""
    return _converted(bundled_draft_hf_dir(), "tiny-draft", "tiny draft model", "--draft-checkpoint DIR")


def resolve_draft_checkpoint(draft_checkpoint: Optional[Path]) -> Optional[Path]:
    """`--draft-checkpoint` as a directory: the name `bundled-draft` (when no directory of that name
    exists here) means the bundled draft model, converted on first use; anything else is unchanged."""
    if (draft_checkpoint is not None and str(draft_checkpoint) == BUNDLED_DRAFT_NAME
            and not Path(draft_checkpoint).is_dir()):
        return bundled_draft_checkpoint()
    return draft_checkpoint


__all__ = ["BUNDLED_DRAFT_NAME", "bundled_hf_dir", "bundled_checkpoint", "bundled_draft_hf_dir",
           "bundled_draft_checkpoint", "resolve_draft_checkpoint"]
