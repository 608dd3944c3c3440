"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint into the engine's format.

    python convert/convert_hf_checkpoint.py --hf-dir HF_DIR --out DIR [--dtype bfloat16] [--force]

Reads config.json (+ generation_config.json), the weights (sharded or single safetensors, or
pytorch_model*.bin read with `weights_only=True`), renames and casts them, checks every tensor
against the config, and writes safetensors + engine_config.json + the tokenizer files. Output is
assembled in a temporary directory beside --out and renamed into place at the end, so a failed
run never leaves a half-written checkpoint. A lock file beside --out is held for the whole run, so
a second conversion to the same --out fails at once instead of replacing the first one's output."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pickle
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import click
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from gpt_fast_magicdec.checkpoint import (TOKENIZER_FILES, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                                          engine_weight_files, first_line, hf_to_engine_name,
                                          save_engine_checkpoint, validate_state_dict)
from gpt_fast_magicdec.config import ENGINE_CONFIG_NAME, ModelArgs
from gpt_fast_magicdec.devices import DTYPES as TORCH_DTYPES
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.locks import output_lock

DTYPES = {**TORCH_DTYPES, "auto": None}  # auto: keep the checkpoint's own dtype
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers old transformers versions saved
# (index file, single file, shard glob) in order of preference.
_HF_LAYOUTS = (("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
               ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"))
# What a converted checkpoint directory may hold: --force replaces only such a directory.
_CHECKPOINT_FILES = {ENGINE_CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, *TOKENIZER_FILES}
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# A work directory `.NAME.partial-PID-HEX` beside --out; older versions wrote `.NAME.partial-HEX`.
_PARTIAL_RE = re.compile(r"\.(?P<name>.+)\.partial-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")
LEGACY_PARTIAL_STALE_S = 3600  # no pid to check: one untouched for an hour is abandoned


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {first_line(e)}") from None


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The weight files of a HF checkpoint; an index's shards must all be present."""
    for index_name, single_name, pattern in _HF_LAYOUTS:
        if (hf_dir / index_name).is_file():
            weight_map = _read_json(hf_dir / index_name).get("weight_map") or {}
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (hf_dir / n).is_file()]
            if missing:
                raise UserError(f"{hf_dir} is missing {len(missing)} of {len(names)} weight shards listed "
                                f"in {index_name} (first: {missing[0]}); download the complete checkpoint")
            if names:
                return [hf_dir / n for n in names]
        if (hf_dir / single_name).is_file():
            return [hf_dir / single_name]
        shards = sorted(hf_dir.glob(pattern))
        if shards:
            return shards
    raise UserError(f"no weights in {hf_dir}: expected model.safetensors, model-*.safetensors with "
                    "model.safetensors.index.json, or pytorch_model*.bin")


def _load_hf_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read weights file {path}: {first_line(e)}") from None


def check_not_quantized(hf_dir: Path, hf_config: dict) -> None:
    """Refuse a quantized checkpoint before reading its weights: its tensors are codes plus scales
    (or float8 values plus scales) that the engine cannot run."""
    quant = hf_config.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise UserError(f"{hf_dir} is a quantized checkpoint (quantization_config"
                        f"{f'.quant_method {method!r}' if method else ''}): the engine runs unquantized "
                        "float weights only; convert the original (unquantized) model")


def read_hf_state_dict(hf_dir: Path, args: ModelArgs, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """All weights of `hf_dir` under engine names, cast to `dtype` (None keeps each tensor's)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for path in hf_weight_files(hf_dir):
        for hf_name, tensor in _load_hf_file(path).items():
            name = hf_to_engine_name(hf_name)
            if name is None:
                if not hf_name.endswith(IGNORED_HF_SUFFIXES):
                    unknown.append(hf_name)
                continue
            if name == "output.weight" and args.tie_word_embeddings:
                continue  # tied: the engine reuses tok_embeddings, as transformers does
            if not tensor.is_floating_point():  # checked before the cast, which would hide it
                raise UserError(f"{hf_dir}: tensor {hf_name!r} in {path.name} is "
                                f"{str(tensor.dtype).removeprefix('torch.')}, not floating point: quantized "
                                "weights without their scales cannot be converted; use the unquantized model")
            out[name] = tensor if dtype is None else tensor.to(dtype)
    if unknown:
        raise UserError(f"{hf_dir} has {len(unknown)} tensor(s) the engine does not know (first: "
                        f"{unknown[0]!r}); this model variant is not supported")
    return out


def _unshare(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (possible in .bin files): copy the repeats."""
    seen: set[int] = set()
    for name, t in state_dict.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            state_dict[name] = t.clone()
        seen.add(ptr)
    return state_dict


def convert_hf_checkpoint(hf_dir, out_dir, dtype: str = "auto", force: bool = False,
                          max_shard_gb: float = 0.0, lock: bool = True) -> Path:
    """Convert the HF checkpoint in `hf_dir` into an engine checkpoint at `out_dir`; returns it.
    lock=False: the caller already holds `conversion_lock(out_dir)`."""
    hf_dir = Path(hf_dir)
    if not str(out_dir).strip():  # `--out "$UNSET"`: never let it mean the current directory
        raise UserError("--out is empty; give the directory to write the checkpoint to")
    out_dir = Path(os.path.abspath(out_dir))  # normalised, so "." or "x/.." still has a name and a parent
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if max_shard_gb < 0:
        raise UserError(f"--max-shard-gb must be >= 0 (0 writes one file), got {max_shard_gb}")
    if not hf_dir.is_dir():
        raise UserError(f"--hf-dir {hf_dir} is not a directory: point it at a downloaded Hugging Face "
                        "model (the folder holding config.json)")
    if out_dir.exists():
        hf_real, out_real = hf_dir.resolve(), out_dir.resolve()
        if hf_real == out_real or out_real in hf_real.parents:
            raise UserError(f"--out {out_dir} holds the input checkpoint; choose another output path")
        cwd = Path.cwd().resolve()
        if out_real == cwd or out_real in cwd.parents:
            raise UserError(f"--out {out_dir} is the current directory or one above it; choose a new directory")
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?")
    hf_config = _read_json(hf_dir / "config.json")
    gen_path = hf_dir / "generation_config.json"
    args = ModelArgs.from_hf_config(hf_config, _read_json(gen_path) if gen_path.is_file() else None)
    check_not_quantized(hf_dir, hf_config)
    if not hf_config.get("_name_or_path"):  # transformers 5 no longer saves it: name after the folder
        args.name = hf_dir.resolve().name

    created = make_parents(out_dir)
    try:
        with conversion_lock(out_dir) if lock else contextlib.nullcontext():
            before = check_replaceable(out_dir, force)  # under the lock: nobody else converts to it now
            state_dict = read_hf_state_dict(hf_dir, args, DTYPES[dtype])
            validate_state_dict(args, state_dict, hint=f"the checkpoint in {hf_dir} is incomplete or does "
                                "not match its config.json")
            remove_stale_partials(out_dir)
            _write(hf_dir, out_dir, args, _unshare(state_dict), max_shard_gb, before)
    except BaseException:
        for parent in reversed(created):  # only the (still empty) directories made for --out
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return out_dir


def _write(hf_dir: Path, out_dir: Path, args: ModelArgs, state_dict: dict, max_shard_gb: float, before) -> None:
    """Assemble the checkpoint in a work directory beside `out_dir`, then move it into place."""
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        save_engine_checkpoint(tmp, args, state_dict, max_shard_bytes=int(max_shard_gb * 2**30) or None)
        _copy_tokenizer_files(hf_dir, tmp)
        _move_into_place(tmp, out_dir, before)
    except (OSError, SafetensorError) as e:  # disk full, quota, file-size limit: --out is unchanged
        raise UserError(f"--out {out_dir}: cannot write the checkpoint into {out_dir.parent} "
                        f"({getattr(e, 'strerror', None) or first_line(e)}); --out was left as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_parents(out_dir: Path) -> list[Path]:
    """Create the missing parents of `out_dir` (returned, outermost first), refusing with one line a
    parent that is a file or cannot be created."""
    missing = []
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out_dir}: {parent} is not a directory; choose another path")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise UserError(f"--out {out_dir}: {path} is not a directory; choose another path") from None
            continue
        except OSError as e:
            for made in reversed(created):
                with contextlib.suppress(OSError):
                    made.rmdir()
            raise UserError(f"--out {out_dir}: cannot create {path} ({e.strerror}); choose another path") from None
        created.append(path)
    return created


def conversion_lock(out_dir: Path, wait: bool = False):
    """Hold the lock file `.NAME.lock` beside `out_dir` for a whole conversion: a second conversion
    to the same --out (another shell, a job started twice) fails at once, or with wait=True waits for
    the first to finish, instead of replacing its finished checkpoint minutes later."""
    return output_lock(out_dir, "--out", "another conversion to it is running", wait)


def is_engine_checkpoint(directory: Path) -> bool:
    """True for a directory this converter wrote: engine_config.json, and nothing but checkpoint
    files (weights, index, tokenizer files) beside it."""
    names = {p.name for p in directory.iterdir()}
    return ENGINE_CONFIG_NAME in names and all(n in _CHECKPOINT_FILES or _SHARD_RE.fullmatch(n) for n in names)


def check_replaceable(out_dir: Path, force: bool) -> Optional[tuple]:
    """An existing --out may be replaced only when empty, or with --force when it is an earlier
    engine checkpoint: anything else (the current directory, a home, a source tree) is refused,
    whatever the flags, since replacing it deletes it. Returns what the final step may replace:
    None (nothing there), or (identity, was empty) of the directory checked."""
    if not os.path.lexists(out_dir):
        return None
    if not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory; choose another path")
    st = out_dir.stat()
    empty = not any(out_dir.iterdir())
    if not empty and not is_engine_checkpoint(out_dir):
        raise UserError(f"--out {out_dir} exists and is not an engine checkpoint; refusing to replace it "
                        "(even with --force): choose a new or empty directory")
    if not empty and not force:
        raise UserError(f"--out {out_dir} already holds a checkpoint; pass --force to replace it")
    return (st.st_dev, st.st_ino), empty


def remove_stale_partials(out_dir: Path) -> None:
    """Delete `.NAME.partial-*` work directories a killed conversion to `out_dir` left behind:
    those whose process is gone (or, from older versions without a pid, untouched for an hour)."""
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        m = _PARTIAL_RE.fullmatch(path.name)
        if m is None or m["name"] != out_dir.name or not path.is_dir():
            continue
        stale = (not _process_alive(int(m["pid"])) if m["pid"]
                 else time.time() - path.stat().st_mtime > LEGACY_PARTIAL_STALE_S)
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _copy_tokenizer_files(hf_dir: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
    # Meta's Llama-3 repos keep the tiktoken model under original/.
    if not (out_dir / "tokenizer.model").exists() and (hf_dir / "original" / "tokenizer.model").is_file():
        shutil.copy2(hf_dir / "original" / "tokenizer.model", out_dir / "tokenizer.model")


def _move_into_place(tmp: Path, out_dir: Path, before: Optional[tuple]) -> None:
    """Rename `tmp` to `out_dir`, replacing only what `check_replaceable` saw there (`before`): a
    directory that appeared, changed or was replaced since is left alone, and the new checkpoint is
    kept beside it. The rename itself cannot replace anything (see `_rename_noreplace`)."""
    old = None
    if os.path.lexists(out_dir):
        st = out_dir.stat() if out_dir.is_dir() else None
        ours = before is not None and st is not None and (st.st_dev, st.st_ino) == before[0]
        if ours and not any(out_dir.iterdir()):
            out_dir.rmdir()
        elif ours and not before[1] and is_engine_checkpoint(out_dir):  # the checkpoint --force replaces
            old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
            os.rename(out_dir, old)
        else:
            _conflict(tmp, out_dir)
    try:
        _rename_noreplace(tmp, out_dir)
    except BaseException as err:
        if old is not None:  # put the checkpoint back first, whatever went wrong
            os.rename(old, out_dir)
        if isinstance(err, FileExistsError):
            _conflict(tmp, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old)


def _conflict(tmp: Path, out_dir: Path) -> None:
    kept = out_dir.parent / f"{out_dir.name}.converted-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(tmp, kept)
    raise UserError(f"--out {out_dir} changed while this conversion ran (another process wrote it); left it "
                    f"as it is and kept this conversion in {kept}")


_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_RENAME_NOREPLACE, _AT_FDCWD = 1, -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that raises FileExistsError when `dst` exists, even as an empty directory (which a
    plain rename replaces): renameat2(RENAME_NOREPLACE) where the kernel and libc have it, else a
    check just before the rename (the lock keeps other conversions out of that window)."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # those: the file system or kernel lacks the flag
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def summarize(out_dir: Path) -> str:
    """One-paragraph description of a converted checkpoint, read back from disk."""
    args = ModelArgs.load(out_dir)
    files = engine_weight_files(out_dir)
    n_params, dtypes = 0, set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                n_params += torch.Size(piece.get_shape()).numel()
                dtypes.add(piece.get_dtype())
    nbytes = sum(p.stat().st_size for p in files)
    scaling = f", rope {args.rope_scaling.rope_type} x{args.rope_scaling.factor:g}" if args.rope_scaling else ""
    return (f"model  : {args.name}: {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads "
            f"({args.n_kv_heads} kv, head_dim {args.head_dim}), ffn {args.intermediate_size}, "
            f"vocab {args.vocab_size}{scaling}{', tied embeddings' if args.tie_word_embeddings else ''}\n"
            f"params : {n_params / 1e6:.2f}M in {len(files)} file(s), dtype {'/'.join(sorted(dtypes))}, "
            f"{nbytes / 2**20:.1f} MiB\n"
            f"output : {out_dir}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hf-dir", required=True, type=click.Path(path_type=Path),
              help="Hugging Face model directory: config.json plus *.safetensors or pytorch_model*.bin "
                   "weights, and tokenizer files.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory to write the engine checkpoint to (created; must not exist, be empty, or "
                   "with --force be an earlier engine checkpoint).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="Weight dtype to store; 'auto' keeps the dtype the checkpoint is stored in.")
@click.option("--force", is_flag=True,
              help="Replace an existing --out that holds an engine checkpoint (any other non-empty "
                   "directory is refused).")
@click.option("--max-shard-gb", type=float, default=0.0, show_default=True,
              help="Split the weights into safetensors shards of at most this many GiB; 0 writes "
                   "one model.safetensors.")
def main(hf_dir: Path, out_dir: Path, dtype: str, force: bool, max_shard_gb: float) -> None:
    """Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint into the engine's safetensors
    format (engine_config.json + model.safetensors + tokenizer files)."""
    try:
        out = convert_hf_checkpoint(hf_dir, out_dir, dtype=dtype, force=force, max_shard_gb=max_shard_gb)
    except UserError as e:
        click.echo(f"error: {first_line(e)}", err=True)
        sys.exit(1)
    click.echo(summarize(out))


if __name__ == "__main__":
    main()
