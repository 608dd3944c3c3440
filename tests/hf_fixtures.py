"""Tiny random-weight Hugging Face checkpoints of each supported family, for converter and model
tests. Built with transformers and saved the way the Hub stores them; no downloads."""
from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama2", "llama3", "llama-linear", "qwen2", "mistral", "llama32", "qwen3", "llama-bias",
            "mistral-window", "qwen2-window", "qwen3-window", "ministral")
WINDOW = 8  # the sliding window of the *-window families: every test prompt is longer
FORMATS = ("safetensors-sharded", "safetensors", "bin", "bin-sharded")

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)
# family -> (transformers class prefix, config kwargs on top of _COMMON)
_FAMILY_CONFIGS = {
    "llama2": ("Llama", dict(num_key_value_heads=4)),
    "llama3": ("Llama", dict(vocab_size=512, rope_parameters=_LLAMA3_ROPE)),
    "llama-linear": ("Llama", dict(num_key_value_heads=4, max_position_embeddings=2048,
                                   rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "qwen2": ("Qwen2", dict(vocab_size=320, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True,
                            bos_token_id=None, eos_token_id=[3, 4],
                            rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "mistral": ("Mistral", dict(sliding_window=None, max_position_embeddings=32768,
                                rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "llama32": ("Llama", dict(vocab_size=384, head_dim=32, tie_word_embeddings=True,
                              rope_parameters=dict(_LLAMA3_ROPE, factor=32.0))),
    # Qwen3: per-head q/k norms, head_dim 32 with 4 heads (4 x 32 != hidden 64), tied, no BOS.
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=None,
                            eos_token_id=[3, 4], rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # Llama with a bias on every projection (q/k/v/o and gate/up/down).
    "llama-bias": ("Llama", dict(attention_bias=True, mlp_bias=True)),
    # Mistral-7B-v0.1 style: every layer attends to its last WINDOW keys.
    "mistral-window": ("Mistral", dict(sliding_window=WINDOW,
                                       rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Qwen2 use_sliding_window: layers >= max_window_layers slide (here layer 1 of 0..1).
    "qwen2-window": ("Qwen2", dict(vocab_size=320, use_sliding_window=True, sliding_window=WINDOW,
                                   max_window_layers=1, bos_token_id=None)),
    # Qwen3 with layer_types naming a sliding / full mix, q/k/v/o biases, untied head.
    "qwen3-window": ("Qwen3", dict(head_dim=32, attention_bias=True, use_sliding_window=True, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"], bos_token_id=None,
                                   rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # Ministral: Mistral's layers with per-layer layer_types (full first, then sliding).
    "ministral": ("Ministral", dict(head_dim=16, sliding_window=WINDOW,
                                   layer_types=["full_attention", "sliding_attention"])),
}


def make_hf_model(family: str, seed: int = 0, weights_dtype: torch.dtype = torch.float32, **overrides):
    """A tiny `*ForCausalLM` of `family` whose every weight is random and distinct (norms near 1,
    not all ones; biases non-zero), reproducible from `seed`. `overrides` go to the config."""
    import transformers

    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    prefix, kwargs = _FAMILY_CONFIGS[family]
    config = getattr(transformers, f"{prefix}Config")(**{**_COMMON, **kwargs, **overrides})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((0.1 if name.endswith("bias") else 0.02) * noise)
    return model.to(weights_dtype).eval()


def make_hf_checkpoint(path, family: str, fmt: str = "safetensors-sharded", seed: int = 0,
                       weights_dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Save `make_hf_model(family, seed, weights_dtype, **overrides)` into `path` and return it.

    fmt: `safetensors-sharded` (>= 2 shards + model.safetensors.index.json), `safetensors` (one
    model.safetensors), `bin` (one pytorch_model.bin) or `bin-sharded` (pytorch_model-0000k-of-
    00002.bin + pytorch_model.bin.index.json). transformers 5 dropped `safe_serialization=False`,
    so .bin files are written with torch.save the way transformers 4 did: full state dict, tied
    `lm_head.weight` included, plus the `rotary_emb.inv_freq` buffers older versions saved."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; choose from {FORMATS}")
    path = Path(path)
    model = make_hf_model(family, seed, weights_dtype, **overrides)
    if fmt.startswith("safetensors"):
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(path, max_shard_size=total // 3 if fmt == "safetensors-sharded" else "50GB")
        if fmt == "safetensors-sharded":
            assert len(list(path.glob("model-*.safetensors"))) >= 2, "fixture failed to shard"
        return path
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    state_dict = dict(model.state_dict())
    hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    for i in range(model.config.num_hidden_layers):
        state_dict[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    if fmt == "bin":
        torch.save(state_dict, path / "pytorch_model.bin")
        return path
    names = list(state_dict)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map = {}
    for k, half in enumerate(halves, 1):
        fname = f"pytorch_model-{k:05d}-of-00002.bin"
        torch.save({n: state_dict[n] for n in half}, path / fname)
        weight_map.update({n: fname for n in half})
    index = {"metadata": {"total_size": total_bytes(state_dict)}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return path


def total_bytes(state_dict: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def edit_config(path, **changes) -> None:
    """Overwrite keys of `path/config.json` (None deletes a key), e.g. to make it unsupported."""
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_path.write_text(json.dumps(cfg, indent=2))


def max_logit_diff_vs_transformers(hf_dir, model, tokens: list[int]) -> float:
    """Max |logit difference| between transformers' LlamaForCausalLM loaded from `hf_dir` (fp32) and
    the engine `model`'s cache-free causal pass, on one sequence of `tokens`."""
    import transformers

    from tools.tiny_model.causal import causal_logits

    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    batch = torch.tensor([tokens])
    with torch.no_grad():
        return float((causal_logits(model, batch) - hf(batch).logits).abs().max())
