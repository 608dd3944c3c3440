"""The bundled tiny Llama: a ~6M-parameter GQA Llama trained on CPU on public-domain books
(see `train.py` and `model/train_log.json`), shipped in Hugging Face layout under `model/`, so the
engine, its tests and its README run on real weights without any download. Beside it, under
`draft/`, a ~1.2M-parameter standalone draft model with the same tokenizer, trained on the same books.

    from gpt_fast_magicdec.tiny import bundled_checkpoint, bundled_draft_checkpoint
    ckpt = bundled_checkpoint()          # converted once into the user cache, then reused
    draft = bundled_draft_checkpoint()   # likewise; `generate.py --draft-checkpoint bundled-draft`

The cache is $GPT_FAST_MAGICDEC_CACHE, else $XDG_CACHE_HOME/gpt-fast-magicdec, else
~/.cache/gpt-fast-magicdec (see `cache_root`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

_HASHED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer.json", "tokenizer_config.json")


# What `--draft-checkpoint` accepts in place of a directory to mean the bundled draft model.
BUNDLED_DRAFT_NAME = "bundled-draft"
CACHE_VARIABLE = "GPT_FAST_MAGICDEC_CACHE"  # the directory converted bundled models go to


def bundled_hf_dir() -> Path:
    """The bundled model's Hugging Face directory (inside the installed package)."""
    return Path(__file__).resolve().parent / "model"


def bundled_draft_hf_dir() -> Path:
    """The bundled standalone draft model's Hugging Face directory (inside the installed package)."""
    return Path(__file__).resolve().parent / "draft"


def configured_cache_root() -> tuple[Path, bool]:
    """(directory, whether the user chose it with $GPT_FAST_MAGICDEC_CACHE): that variable, else
    $XDG_CACHE_HOME/gpt-fast-magicdec, else ~/.cache/gpt-fast-magicdec."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE]), True
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no HOME and no password-database entry: use the fallback
        base = Path(os.sep, "nonexistent-home", ".cache")
    return base / "gpt-fast-magicdec", False


def fallback_cache_root() -> Path:
    """A per-user directory in the temporary directory, for when the configured cache is unwritable."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"gpt-fast-magicdec-{user}"


def cache_root() -> Path:
    """The configured cache (`configured_cache_root`), created if missing, when it can be written.
    A default one that cannot (read-only HOME, an unwritable container file system) gives way to
    `fallback_cache_root()` with a one-line warning naming $GPT_FAST_MAGICDEC_CACHE; one the user
    set, or a fallback that is unusable too, is a UserError that says which variable to set."""
    from ..errors import UserError

    root, chosen = configured_cache_root()
    problem = _unwritable(root)
    if problem is None:
        return root
    if chosen:
        raise UserError(f"{CACHE_VARIABLE}={root}: cannot write the bundled model's cache there ({problem}); "
                        "point it at a writable directory")
    fallback = fallback_cache_root()
    fallback_problem = _unusable_private_dir(fallback)
    if fallback_problem is not None:
        raise UserError(f"cannot write the bundled model's cache in {root} ({problem}) nor in {fallback} "
                        f"({fallback_problem}); set {CACHE_VARIABLE} to a writable directory")
    warnings.warn(f"cannot write the bundled model's cache in {root} ({problem}); using {fallback} instead: "
                  f"set {CACHE_VARIABLE} to a writable directory to keep the conversion", stacklevel=3)
    return fallback


def _unwritable(directory: Path) -> Optional[str]:
    """None when a file can be created in `directory` (made if missing), else why not. Tried, not
    judged from permission bits: root ignores those, and a read-only mount ignores root."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or str(err)
    return None


def _unusable_private_dir(directory: Path) -> Optional[str]:
    """Like `_unwritable`, for a directory in a shared temporary directory: it must be this user's
    own, and writable by no one else, or another user could plant a checkpoint in it."""
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        st = directory.lstat()
    except OSError as err:
        return err.strerror or str(err)
    if directory.is_symlink() or not directory.is_dir():
        return "not a directory of its own"
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        return "owned or writable by another user"
    return _unwritable(directory)


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
    from ..checkpoint import first_line, load_engine_checkpoint
    from ..convert.convert_hf_checkpoint import conversion_lock, convert_hf_checkpoint
    from ..errors import UserError

    def damage(out: Path) -> Optional[str]:  # None: a complete, loadable conversion
        try:
            load_engine_checkpoint(out)  # the whole check (a few ms for these models)
        except UserError as err:  # what is wrong, without the advice meant for a user's checkpoint
            return first_line(err).split("; ")[0]
        return None

    if not (hf_dir / "model.safetensors").is_file():
        raise UserError(f"the bundled {what} is missing from {hf_dir}; reinstall the package or pass {flag}")
    name = f"{prefix}-{_fingerprint(hf_dir)}"
    out = configured_cache_root()[0] / name
    if out.is_dir() and damage(out) is None:  # reused even from a cache that is now read-only
        return out
    out = cache_root() / name
    with conversion_lock(out, wait=True):  # a concurrent first use converts once; the other waits
        problem = damage(out) if os.path.lexists(out) else None
        if os.path.lexists(out) and problem is None:
            return out
        if problem is not None:  # a file lost or truncated: the entry is ours, so rebuild it
            warnings.warn(f"the bundled {what}'s cached conversion {out} is damaged ({problem}); converting it "
                          "again", stacklevel=3)
            try:
                shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
            except OSError as err:
                raise UserError(f"the bundled {what}'s cached conversion {out} is damaged ({problem}) and cannot "
                                f"be removed ({err.strerror}); delete {out} and run again") from None
        try:
            return convert_hf_checkpoint(hf_dir, out, lock=False)
        except UserError as err:
            raise UserError(f"cannot convert the bundled {what} into its cache: {err}; set {CACHE_VARIABLE} to "
                            "another directory") from None


def bundled_checkpoint() -> Path:
    """The bundled model as an engine checkpoint, converted on first use into
    `cache_root()/tiny-<hash>` (`~/.cache/gpt-fast-magicdec/...` by default) and reused after.

    The converter assembles its output in a temporary directory and renames it into place, and a
    concurrent first use waits for the conversion's lock, so neither a crash nor a race leaves a
    half-written checkpoint; an entry damaged since (a file lost or truncated) is converted again."""
    return _converted(bundled_hf_dir(), "tiny", "tiny model", "--checkpoint DIR")


def bundled_draft_checkpoint() -> Path:
    """The bundled standalone draft model as an engine checkpoint, converted on first use into
    `cache_root()/tiny-draft-<hash>` and reused after (as `bundled_checkpoint`)."""
    return _converted(bundled_draft_hf_dir(), "tiny-draft", "tiny draft model", "--draft-checkpoint DIR")


def resolve_draft_checkpoint(draft_checkpoint: Optional[Path]) -> Optional[Path]:
    """`--draft-checkpoint` as a directory: the name `bundled-draft` (when no directory of that name
    exists here) means the bundled draft model, converted on first use; anything else is unchanged."""
    if (draft_checkpoint is not None and str(draft_checkpoint) == BUNDLED_DRAFT_NAME
            and not Path(draft_checkpoint).is_dir()):
        return bundled_draft_checkpoint()
    return draft_checkpoint


__all__ = ["BUNDLED_DRAFT_NAME", "CACHE_VARIABLE", "cache_root", "bundled_hf_dir", "bundled_checkpoint", "bundled_draft_hf_dir",
           "bundled_draft_checkpoint", "resolve_draft_checkpoint"]
