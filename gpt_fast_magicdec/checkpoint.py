"""The engine's checkpoint format: tensor names and shapes, the HF -> engine name map, and
safetensors save/load with validation.

A checkpoint directory holds `engine_config.json` (ModelArgs), the weights as `model.safetensors`
or as shards `model-0000k-of-0000N.safetensors` with `model.safetensors.index.json`, and the
tokenizer files copied from the Hugging Face directory. Loading never unpickles. Models are built
from it here too (on the meta device, adopting the loaded tensors), or with random weights."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ENGINE_CONFIG_NAME, ModelArgs, check_checkpoint_dir
from .errors import UserError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
RECONVERT_HINT = ("re-run `python convert/convert_hf_checkpoint.py --hf-dir HF_DIR --out DIR --force` "
                  "to rebuild it")

# HF per-layer suffix -> engine per-layer suffix. No q/k permutation: the engine keeps HF's
# rotate-half RoPE layout.
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.o_proj.bias": "attention.wo.bias",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.gate_proj.bias": "feed_forward.w1.bias",
    "mlp.up_proj.bias": "feed_forward.w3.bias",
    "mlp.down_proj.bias": "feed_forward.w2.bias",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")

# The ModelArgs fields that say how the weights are read. Edit one in engine_config.json and the same
# tensors can still have the expected shapes (8 heads of 32 instead of 4 of 64) but mean a different
# model, which would generate garbage without an error. The converter records these fields in every
# weights file's safetensors metadata and loading compares them. Left out: what may be edited without
# changing what the weights mean (name, max_position_embeddings, bos_id, eos_ids). The attention
# window is in: the same weights with another window are another model.
FINGERPRINT_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                      "norm_eps", "rope_base", "rope_scaling", "qkv_bias", "tie_word_embeddings",
                      "out_bias", "mlp_bias", "qk_norm", "sliding_window", "layer_types")
FINGERPRINT_KEY = "gpt_fast_magicdec.config"
_LATER_FIELDS = ("out_bias", "mlp_bias", "qk_norm", "sliding_window", "layer_types")  # absent from older records  # the safetensors metadata key holding them, as JSON


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor an engine checkpoint for `args` holds, with its shape."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (q, args.dim)
        shapes[p + "attention.wk.weight"] = (kv, args.dim)
        shapes[p + "attention.wv.weight"] = (kv, args.dim)
        if args.qkv_bias:
            shapes[p + "attention.wq.bias"] = (q,)
            shapes[p + "attention.wk.bias"] = (kv,)
            shapes[p + "attention.wv.bias"] = (kv,)
        shapes[p + "attention.wo.weight"] = (args.dim, q)
        if args.out_bias:
            shapes[p + "attention.wo.bias"] = (args.dim,)
        if args.qk_norm:
            shapes[p + "attention.q_norm.weight"] = (args.head_dim,)
            shapes[p + "attention.k_norm.weight"] = (args.head_dim,)
        shapes[p + "feed_forward.w1.weight"] = (args.intermediate_size, args.dim)
        shapes[p + "feed_forward.w3.weight"] = (args.intermediate_size, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, args.intermediate_size)
        if args.mlp_bias:
            shapes[p + "feed_forward.w1.bias"] = (args.intermediate_size,)
            shapes[p + "feed_forward.w3.bias"] = (args.intermediate_size,)
            shapes[p + "feed_forward.w2.bias"] = (args.dim,)
        shapes[p + "attention_norm.weight"] = (args.dim,)
        shapes[p + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def hf_to_engine_name(name: str) -> Optional[str]:
    """Engine name of a Hugging Face Llama/Mistral/Qwen2/Qwen3 tensor, or None when the engine has no
    such weight (RoPE `inv_freq` buffers, or a tensor from an architecture we do not know)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def validate_state_dict(args: ModelArgs, state_dict: dict[str, torch.Tensor],
                        hint: str = RECONVERT_HINT) -> None:
    """Raise UserError (one line, ending in `hint`) unless `state_dict` has exactly the expected
    tensors with the expected shapes."""
    expected = expected_shapes(args)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise UserError(f"checkpoint is missing {len(missing)} of {len(expected)} tensors "
                        f"(first: {missing[0]!r}); {hint}")
    wrong = [k for k, shape in expected.items() if tuple(state_dict[k].shape) != shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"tensor {k!r} has shape {tuple(state_dict[k].shape)} but the config needs "
                        f"{expected[k]} ({len(wrong)} tensor(s) mis-shaped); {hint}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise UserError(f"checkpoint has {len(unexpected)} unexpected tensor(s) (first: "
                        f"{unexpected[0]!r}) that this config does not use; {hint}")
    not_float = [k for k in expected if not state_dict[k].is_floating_point()]
    if not_float:  # e.g. quantized codes without their scales: they would "run" as numbers
        k = not_float[0]
        raise UserError(f"tensor {k!r} is {str(state_dict[k].dtype).removeprefix('torch.')}, not floating point "
                        f"({len(not_float)} such tensor(s)): the engine runs unquantized float weights only; {hint}")


def config_fingerprint(args: ModelArgs) -> dict:
    """The FINGERPRINT_FIELDS of `args`, as they are stored in (and read back from) JSON."""
    return json.loads(json.dumps({k: v for k, v in args.to_dict().items() if k in FINGERPRINT_FIELDS}))


def check_fingerprint(args: ModelArgs, metadata: Optional[dict], path: Path) -> None:
    """Refuse weights whose recorded config differs from `args` (read from engine_config.json).
    Files without a record (conversions by earlier versions, hand-made test checkpoints) pass; a
    record without one of the later fields (out_bias, qk_norm, sliding_window, ...) was written when
    the converter refused every other value of it, so it holds that field's default."""
    recorded = (metadata or {}).get(FINGERPRINT_KEY)
    if recorded is None:
        return
    config = Path(path).parent / ENGINE_CONFIG_NAME
    try:
        recorded = json.loads(recorded)
        current = config_fingerprint(args)
        defaults = config_fingerprint(ModelArgs())
        recorded = {k: recorded[k] if k in recorded or k not in _LATER_FIELDS else defaults[k]
                    for k in FINGERPRINT_FIELDS}
        changed = [k for k in FINGERPRINT_FIELDS if recorded[k] != current[k]]
    except (ValueError, TypeError, KeyError):
        raise UserError(f"{path} has an unreadable {FINGERPRINT_KEY} record; {RECONVERT_HINT}") from None
    if changed:
        k = changed[0]
        raise UserError(f"{config} no longer matches the weights it was converted with ({k} is "
                        f"{json.dumps(current[k])} there, {json.dumps(recorded[k])} at conversion"
                        f"{f', and {len(changed) - 1} more field(s)' if len(changed) > 1 else ''}): the same "
                        f"tensors would be read as another model; restore it, or {RECONVERT_HINT}")


def save_engine_checkpoint(directory: Path, args: ModelArgs, state_dict: dict[str, torch.Tensor],
                           max_shard_bytes: Optional[int] = None) -> list[Path]:
    """Write `engine_config.json` and the weights into an existing `directory`: one
    `model.safetensors`, or shards of at most `max_shard_bytes` (a tensor is never split) plus an
    index. Returns the weight files written."""
    directory = Path(directory)
    args.save(directory)
    metadata = {"format": "pt", FINGERPRINT_KEY: json.dumps(config_fingerprint(args), sort_keys=True)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata=metadata)
        return [directory / WEIGHTS_NAME]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata=metadata)
        files.append(directory / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return files


def first_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line, for UserError messages."""
    return " ".join(str(exc).split()) or type(exc).__name__


def engine_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of an engine checkpoint, checked to exist."""
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index = directory / WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise UserError(f"{directory} has no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME}); {RECONVERT_HINT}")
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{index} is not a valid safetensors index ({e}); {RECONVERT_HINT}") from None
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise UserError(f"{directory} is missing {len(missing)} of {len(names)} weight shards "
                        f"(first: {missing[0]}); {RECONVERT_HINT}")
    return [directory / n for n in names]


def load_engine_checkpoint(directory: Path, device="cpu") -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read a converted checkpoint: (ModelArgs, state dict with the engine's names), validated."""
    directory = Path(directory)
    check_checkpoint_dir(directory)
    args = ModelArgs.load(directory)
    files = engine_weight_files(directory)
    for path in files:  # headers only, before any tensor is read
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path} ({first_line(e)}); {RECONVERT_HINT}") from None
        check_fingerprint(args, metadata, path)
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors = load_file(path, device=str(device))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path} ({first_line(e)}); {RECONVERT_HINT}") from None
        duplicated = sorted(set(tensors) & set(state_dict))
        if duplicated:
            raise UserError(f"tensor {duplicated[0]!r} appears in more than one shard; {RECONVERT_HINT}")
        state_dict.update(tensors)
    validate_state_dict(args, state_dict)
    return args, state_dict


# ---- building models ----------------------------------------------------------------------------
def model_from_state_dict(args: ModelArgs, state_dict: dict, device, dtype):
    """Build on the meta device and adopt the tensors (no second copy of the weights)."""
    from .model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    allowed_missing = {"output.weight"} if args.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise UserError(f"checkpoint does not match the model: missing {sorted(set(missing) - allowed_missing)[:3]}, "
                        f"unexpected {unexpected[:3]}; {RECONVERT_HINT}")
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def random_model(args: ModelArgs, device, dtype, seed: int = 0):
    """Random weights of a preset shape, for benchmarks: the output text is noise."""
    from .model import Transformer

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
            for name, p in model.named_parameters():
                if "norm" not in name:
                    torch.nn.init.normal_(p, std=0.02)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def load_model(checkpoint: Path, device, dtype, shard=None):
    """Load a converted checkpoint; `shard(args, state_dict) -> (args, state_dict)` slices it for TP."""
    args, state_dict = load_engine_checkpoint(checkpoint)
    if shard is not None:
        args, state_dict = shard(args, state_dict)
    return model_from_state_dict(args, state_dict, device, dtype)
