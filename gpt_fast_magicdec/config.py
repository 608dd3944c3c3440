"""Model shape and hyper-parameters: `ModelArgs`, built from a Hugging Face `config.json`,
from the engine's own JSON, or from a named preset for random-weight runs."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError

ENGINE_CONFIG_NAME = "engine_config.json"  # what the converter writes beside model.safetensors
SUPPORTED_ARCHITECTURES = {"llama", "mistral", "ministral", "qwen2", "qwen3"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3"}
# model_type -> the feature that keeps it out, for a refusal that says what is missing.
UNSUPPORTED_FEATURES = {
    "mixtral": "mixture-of-experts MLP layers", "qwen2_moe": "mixture-of-experts MLP layers",
    "qwen3_moe": "mixture-of-experts MLP layers", "deepseek_v3": "mixture-of-experts MLP layers",
    "gemma": "Gemma's GeGLU MLP, (1 + weight) RMSNorm and scaled embeddings",
    "gemma2": "Gemma's GeGLU MLP, (1 + weight) RMSNorm, scaled embeddings and logit soft-capping",
    "gemma3": "Gemma's GeGLU MLP, (1 + weight) RMSNorm, scaled embeddings and per-layer rope bases",
    "gemma3_text": "Gemma's GeGLU MLP, (1 + weight) RMSNorm, scaled embeddings and per-layer rope bases",
}
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names; others (chunked, linear) are refused


class ConfigError(UserError):
    """A configuration the engine cannot run correctly. The message says what to do."""


@dataclasses.dataclass
class RopeScaling:
    """`linear` divides positions by `factor` (LLaMA-2-7B-32K); `llama3` rescales low
    frequencies only (Llama-3.1/3.2, see transformers' `_compute_llama3_parameters`)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(
                f"unknown rope scaling type {self.rope_type!r}: supported are 'linear' and 'llama3'"
            )
        # Checked here, so both a converted config.json and a hand-edited engine_config.json are
        # refused with the parameter's name instead of a ZeroDivisionError (or nan angles) later:
        # `rope_inv_freq` divides by factor, both freq factors and their difference.
        self.factor = _positive_number("rope scaling factor", self.factor)
        if self.rope_type == "linear":
            return
        self.low_freq_factor = _positive_number("rope scaling low_freq_factor", self.low_freq_factor)
        self.high_freq_factor = _positive_number("rope scaling high_freq_factor", self.high_freq_factor)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope scaling high_freq_factor ({self.high_freq_factor:g}) must be larger than "
                              f"low_freq_factor ({self.low_freq_factor:g}): llama3 scaling ramps between them")
        old_len = self.original_max_position_embeddings
        if isinstance(old_len, float) and old_len.is_integer():
            old_len = int(old_len)
        if not _is_int(old_len) or old_len <= 0:
            raise ConfigError(f"rope scaling original_max_position_embeddings must be a positive integer, "
                              f"got {self.original_max_position_embeddings!r}")
        self.original_max_position_embeddings = old_len


@dataclasses.dataclass
class ModelArgs:
    name: str = "custom"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (multi-head attention)
    head_dim: Optional[int] = None  # None: dim // n_heads
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # bias on wq, wk, wv: Qwen2/2.5, and Llama / Qwen3 with attention_bias
    out_bias: bool = False  # bias on wo: Llama / Qwen3 with attention_bias
    mlp_bias: bool = False  # bias on w1, w2, w3: Llama with mlp_bias
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on every query and key head, before RoPE
    tie_word_embeddings: bool = False  # Llama-3.2-1B, small Qwen2.5, Qwen3-0.6B/1.7B
    # Sliding-window attention (Mistral-7B-v0.1, Qwen2/3 with use_sliding_window, Ministral): a query
    # at position p of a sliding layer reads keys p - sliding_window < s <= p, as transformers'
    # sliding_window_overlay does. layer_types: one of LAYER_TYPES per layer; None: every layer
    # slides when sliding_window is set. See `layer_windows`.
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple] = None
    bos_id: Optional[int] = 1
    eos_ids: tuple = (2,)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        # Sizes first: a hand-edited config with "n_heads": 0 or "dim": "4096" must fail here with
        # its field name, not as a ZeroDivisionError or TypeError further down.
        for field in _SIZE_FIELDS:
            value = getattr(self, field)
            if field == "head_dim" and value is None:
                continue
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if isinstance(self.rope_scaling, dict):
            try:
                self.rope_scaling = RopeScaling(**self.rope_scaling)
            except TypeError as e:
                raise ConfigError(f"rope_scaling: {e}") from None
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        for field in ("norm_eps", "rope_base"):
            setattr(self, field, _positive_number(field, getattr(self, field)))
        if self.bos_id is not None and not _is_int(self.bos_id):
            raise ConfigError(f"bos_id must be an integer or null, got {self.bos_id!r}")
        if not isinstance(self.eos_ids, (list, tuple)) or not all(_is_int(e) for e in self.eos_ids):
            raise ConfigError(f"eos_ids must be a list of integers, got {self.eos_ids!r}")
        self.eos_ids = tuple(self.eos_ids)
        for field in _BOOL_FIELDS:
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"{field} must be true or false, got {getattr(self, field)!r}")
        self._check_windows()
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        # Each parameter can be valid alone and the angles still overflow fp32 (rope_theta 1e-300,
        # a factor of 1e-40): the model would compute cos(inf) = nan at every position.
        top_angle = float(rope_inv_freq(self).max()) * self.max_position_embeddings
        if not top_angle < torch.finfo(torch.float32).max:
            scaling = self.rope_scaling
            with_scaling = f" with {scaling.rope_type} rope scaling factor {scaling.factor:g}" if scaling else ""
            raise ConfigError(f"rope_base {self.rope_base:g}{with_scaling} gives rotary angles that overflow "
                              "float32; check rope_theta and the rope scaling parameters")

    def _check_windows(self) -> None:
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != self.n_layers:
            raise ConfigError(f"layer_types must list one type per layer ({self.n_layers}), got {self.layer_types!r}")
        unknown = [t for t in self.layer_types if t not in LAYER_TYPES]
        if unknown:
            raise ConfigError(f"layer type {unknown[0]!r} is not supported: supported are {', '.join(LAYER_TYPES)}")
        self.layer_types = tuple(self.layer_types)
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ConfigError("layer_types names sliding_attention layers but sliding_window is null: "
                              "the window of those layers is unknown")

    @property
    def layer_windows(self) -> tuple:
        """Each layer's sliding window, None for a full-attention layer."""
        types = self.layer_types or ("sliding_attention",) * self.n_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: Path) -> None:
        (Path(directory) / ENGINE_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "ModelArgs":
        path = Path(directory) / ENGINE_CONFIG_NAME
        check_checkpoint_dir(directory)
        if not path.is_file():
            raise ConfigError(
                f"{directory} has no {ENGINE_CONFIG_NAME}; convert the Hugging Face checkpoint first "
                f"with `{CONVERT_COMMAND}`"
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"cannot read {path} ({' '.join(str(e).split())}); re-run the converter "
                              "with --force to rebuild it") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{path} has unknown key(s) {', '.join(map(repr, unknown))}: it was not written by "
                              "this version's converter; re-convert the checkpoint")
        try:
            return cls(**raw)
        except ConfigError as e:  # say which file: the same check also guards config.json
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_hf_config(cls, hf: dict, generation_config: Optional[dict] = None) -> "ModelArgs":
        """Map a transformers `config.json` dict to ModelArgs, refusing what we cannot run exactly."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type in UNSUPPORTED_FEATURES:
            raise ConfigError(f"unsupported model_type {model_type!r}: {UNSUPPORTED_FEATURES[model_type]} are not "
                              f"supported (supported are {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: supported are {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf.get('hidden_act')!r}: only 'silu' is supported")
        max_pos = _hf_int(hf, "max_position_embeddings", 4096)
        n_layers = _hf_int(hf, "num_hidden_layers")
        sliding_window, layer_types = _hf_windows(hf, model_type, n_layers)
        # Which projections carry a bias, as each transformers class builds them: Qwen2 hard-codes
        # q/k/v; Llama and Qwen3 read attention_bias (all four) and Llama also mlp_bias; Mistral
        # and Ministral have none, whatever their config says.
        attention_bias = model_type in ("llama", "qwen3") and _hf_bool(hf, "attention_bias")
        mlp_bias = model_type == "llama" and _hf_bool(hf, "mlp_bias")
        rope_theta, rope_scaling = _hf_rope(hf)
        n_heads = _hf_int(hf, "num_attention_heads")
        gen = generation_config or {}
        if not isinstance(gen, dict):
            raise ConfigError(f"generation_config.json must hold a JSON object, got {type(gen).__name__}")
        eos = gen.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        bos = gen.get("bos_token_id", hf.get("bos_token_id"))
        fields = dict(
            name=hf.get("_name_or_path") or model_type,
            vocab_size=_hf_int(hf, "vocab_size"),
            dim=_hf_int(hf, "hidden_size"),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=_hf_int(hf, "num_key_value_heads", n_heads),
            head_dim=_hf_int(hf, "head_dim", 128 if model_type == "qwen3" else None),  # Qwen3Config's default
            intermediate_size=_hf_int(hf, "intermediate_size"),
            norm_eps=_hf_float(hf, "rms_norm_eps", 1e-6),
            rope_base=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            qkv_bias=model_type == "qwen2" or attention_bias,
            out_bias=attention_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            layer_types=layer_types,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=bos,
            eos_ids=eos_ids,
        )
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"config.json: {e}") from None

    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
        return cls(name=name, **PRESETS[name])


_BOOL_FIELDS = ("qkv_bias", "out_bias", "mlp_bias", "qk_norm", "tie_word_embeddings")
_SIZE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                "max_position_embeddings")
# The keys each rope type needs (transformers' `_validate_*_rope_parameters`); a missing one is
# refused rather than defaulted, since a guessed factor silently changes every position.
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(name: str, value) -> float:
    """`value` as a float when it is a finite number > 0 (not a bool, not NaN); else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


CONVERT_COMMAND = "python convert/convert_hf_checkpoint.py --hf-dir HF_DIR --out DIR"


def check_checkpoint_dir(directory) -> None:
    """Refuse a `--checkpoint` that is not a directory, saying what to pass instead."""
    directory = Path(directory)
    if directory.is_dir():
        return
    if directory.exists():
        inside = (directory.parent / ENGINE_CONFIG_NAME).is_file()
        raise ConfigError(f"checkpoint {directory} is a file, not a directory: pass the converted checkpoint's "
                          "directory (the one holding engine_config.json)"
                          + (f", here {directory.parent}" if inside else ""))
    raise ConfigError(f"checkpoint directory {directory} does not exist; convert a Hugging Face model first "
                      f"with `{CONVERT_COMMAND}`")


def _hf_int(hf: dict, key: str, default=...):
    """An integer field of config.json: 4096 and 4096.0 are fine, "4096", 4096.5 and true are not.
    A missing or null key takes `default` (required when there is none)."""
    value = hf.get(key)
    if value is None:
        if default is ...:
            raise ConfigError(f"config.json lacks {key!r}; the file looks incomplete")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise ConfigError(f"config.json: {key} must be an integer, got {value!r}")
    return value


def _hf_float(hf: dict, key: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: {key} must be a number, got {value!r}")
    return float(value)


def _hf_bool(hf: dict, key: str) -> bool:
    value = hf.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: {key} must be true or false, got {value!r}")
    return value


# The window transformers gives a sliding layer when config.json has no sliding_window key (the
# default of MistralConfig, MinistralConfig, Qwen2Config and Qwen3Config), and Qwen's default
# max_window_layers.
HF_DEFAULT_WINDOW = 4096
HF_DEFAULT_MAX_WINDOW_LAYERS = 28


def _hf_windows(hf: dict, model_type: str, n_layers: int) -> tuple[Optional[int], Optional[tuple]]:
    """(sliding_window, layer_types) the way transformers 5 builds the attention masks:
      llama     no window (LlamaConfig has none);
      mistral   the window on every layer (MistralModel ignores layer_types);
      ministral layer_types, default every layer sliding when the window is set;
      qwen2/3   the window only with use_sliding_window; layer_types, default sliding for the
                layers i >= max_window_layers (the *last* layers), full before.
    Normalised: no window when no layer slides, layer_types None when every layer does."""
    if model_type == "llama":
        return None, None
    window = hf.get("sliding_window", HF_DEFAULT_WINDOW)
    if model_type in ("qwen2", "qwen3") and not _hf_bool(hf, "use_sliding_window"):
        window = None
    if window is not None:
        window = _hf_int({"sliding_window": window}, "sliding_window")
    if model_type == "mistral":
        types = ["sliding_attention" if window is not None else "full_attention"] * n_layers
    elif hf.get("layer_types") is not None:
        types = hf["layer_types"]
        if not isinstance(types, list) or len(types) != n_layers:
            raise ConfigError(f"config.json: layer_types must list one type per layer ({n_layers}), got {types!r}")
    elif model_type == "ministral":
        types = ["sliding_attention" if window is not None else "full_attention"] * n_layers
    else:
        first = _hf_int(hf, "max_window_layers", HF_DEFAULT_MAX_WINDOW_LAYERS)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(n_layers)]
    unknown = [t for t in types if t not in LAYER_TYPES]
    if unknown:
        raise ConfigError(f"config.json: layer type {unknown[0]!r} is not supported: supported are "
                          f"{', '.join(LAYER_TYPES)}")
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and window is None:
        raise ConfigError("config.json: layer_types names sliding_attention layers but there is no window "
                          "(sliding_window is null, or use_sliding_window is false); transformers cannot run it either")
    if not any(sliding):
        return None, None
    return window, None if all(sliding) else tuple(types)


def _hf_rope(hf: dict) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, scaling) from every form transformers writes: `rope_theta` + `rope_scaling`
    (transformers 4), `rope_parameters` holding both (transformers 5), or a mix. When both dicts
    are present they must agree: picking one would silently drop the other's scaling."""
    forms = {key: hf[key] for key in ("rope_scaling", "rope_parameters") if hf.get(key) is not None}
    for key, raw in forms.items():
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json: {key} must be an object, got {raw!r}")
    parsed = {key: _parse_rope_scaling(raw, key) for key, raw in forms.items()}
    if len(parsed) == 2 and parsed["rope_scaling"] != parsed["rope_parameters"]:
        raise ConfigError("config.json has both rope_scaling and rope_parameters and they disagree; "
                          "keep the one the model was trained with")
    thetas = {float(v) for v in (hf.get("rope_theta"), forms.get("rope_parameters", {}).get("rope_theta"))
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if len(thetas) > 1:
        raise ConfigError(f"config.json gives two rope_theta values {sorted(thetas)}; keep the right one")
    theta = _hf_float({"rope_theta": thetas.pop() if thetas else hf.get("rope_theta", 10000.0)},
                      "rope_theta", 10000.0)
    if not 0 < theta < math.inf:
        raise ConfigError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    return theta, next(iter(parsed.values()), None)


def _parse_rope_scaling(raw: dict, key: str = "rope_scaling") -> Optional[RopeScaling]:
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"config.json: unsupported rope scaling type {rope_type!r} ({key}): supported are 'linear' and 'llama3' "
            "(or none); running it anyway would give wrong output"
        )
    if rope_type == "default":
        return None
    missing = [k for k in _ROPE_KEYS[rope_type] if not isinstance(raw.get(k), (int, float))]
    if missing:
        raise ConfigError(f"config.json: {key} of type {rope_type!r} lacks a numeric {missing[0]!r}")
    try:
        return RopeScaling(rope_type=rope_type, **{k: raw[k] for k in _ROPE_KEYS[rope_type]})
    except ConfigError as e:
        raise ConfigError(f"config.json: {key}: {e}") from None


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float64 for exact scaling math), scaling applied."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths divided by factor, short ones kept, a smooth ramp between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


_LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)

# What every Qwen3 dense checkpoint shares (their config.json / generation_config.json).
_QWEN3 = dict(vocab_size=151936, n_kv_heads=8, head_dim=128, qk_norm=True, rope_base=1000000.0, norm_eps=1e-6,
              max_position_embeddings=40960, bos_id=None, eos_ids=(151645, 151643))

# Shapes of the public checkpoints, for random-weight runs (benchmarks) and cost-model checks.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008,
                       max_position_embeddings=4096),
    "llama-2-7b-32k": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008,
                           max_position_embeddings=32768,
                           rope_scaling=dict(rope_type="linear", factor=8.0)),
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         intermediate_size=14336, rope_base=500000.0, max_position_embeddings=131072,
                         rope_scaling=_LLAMA3_SCALING, bos_id=128000, eos_ids=(128001, 128008, 128009)),
    "llama-3.1-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                          intermediate_size=28672, rope_base=500000.0, max_position_embeddings=131072,
                          rope_scaling=_LLAMA3_SCALING, bos_id=128000, eos_ids=(128001, 128008, 128009)),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                         intermediate_size=8192, rope_base=500000.0, max_position_embeddings=131072,
                         rope_scaling=dict(_LLAMA3_SCALING, factor=32.0), tie_word_embeddings=True,
                         bos_id=128000, eos_ids=(128001, 128008, 128009)),
    "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                           intermediate_size=5632, max_position_embeddings=2048),
    "qwen2.5-7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                       intermediate_size=18944, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True,
                       max_position_embeddings=32768, bos_id=None, eos_ids=(151643, 151645)),
    "mistral-7b": dict(vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       intermediate_size=14336, rope_base=1000000.0, max_position_embeddings=32768),
    # Mistral-7B-v0.1: every layer attends to the last 4096 keys only.
    "mistral-7b-v0.1": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                            intermediate_size=14336, max_position_embeddings=32768, sliding_window=4096),
    **{f"qwen3-{size}": dict(_QWEN3, **shape) for size, shape in {
        "0.6b": dict(dim=1024, n_layers=28, n_heads=16, intermediate_size=3072, tie_word_embeddings=True),
        "1.7b": dict(dim=2048, n_layers=28, n_heads=16, intermediate_size=6144, tie_word_embeddings=True),
        "8b": dict(dim=4096, n_layers=36, n_heads=32, intermediate_size=12288),
        "14b": dict(dim=5120, n_layers=40, n_heads=40, intermediate_size=17408),
    }.items()},
    # Tiny shapes for tests and CPU smoke runs.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                 max_position_embeddings=4096),
    "tiny-llama3": dict(vocab_size=512, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                        intermediate_size=160, rope_base=500000.0, max_position_embeddings=8192,
                        rope_scaling=dict(_LLAMA3_SCALING, original_max_position_embeddings=64)),
    "tiny-qwen2": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, intermediate_size=128,
                       qkv_bias=True, norm_eps=1e-6, max_position_embeddings=4096, bos_id=None),
    # Qwen3's form: explicit head_dim (4 x 32 != dim 64) and per-head q/k norms.
    "tiny-qwen3": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=128,
                       qk_norm=True, rope_base=1000000.0, norm_eps=1e-6, max_position_embeddings=4096, bos_id=None),
}
