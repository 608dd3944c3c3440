"""HF -> engine checkpoint conversion: exact round trips for every family and storage format, dtype
casting, and one-line errors (no traceback, no half-written output) for every bad input."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from gpt_fast_magicdec.convert import convert_hf_checkpoint as conv
from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint, main
from gpt_fast_magicdec.checkpoint import (expected_shapes, hf_to_engine_name, load_engine_checkpoint,
                                          validate_state_dict)
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.errors import UserError
from hf_fixtures import FAMILIES, FORMATS, edit_config, make_hf_checkpoint, make_hf_model

REPO = Path(__file__).resolve().parents[1]
SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# The name contract, spelled out independently of the converter's own table.
CONTRACT = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
            "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attention.q_norm",
            "self_attn.k_norm": "attention.k_norm"}


def contract_name(hf_name):
    if hf_name.startswith("model.layers."):
        _, _, i, rest = hf_name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"layers.{i}.{CONTRACT[module]}.{kind}"
    return {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def engine_reference(family, **kw):
    """The HF model's weights under engine names (tied lm_head dropped): what conversion must give."""
    model = make_hf_model(family, **kw)
    ref = {contract_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del ref["output.weight"]
    return ref


def rewrite(path, edit):
    """Apply `edit` to the tensors of one safetensors file, in place."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, needle):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a crash
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def assert_no_output_left(out):
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_exact(tmp_path, family, fmt):
    hf = make_hf_checkpoint(tmp_path / "hf", family, fmt)
    out = convert_hf_checkpoint(hf, tmp_path / "out")
    args, sd = load_engine_checkpoint(out)
    ref = engine_reference(family)
    assert set(sd) == set(ref) == set(expected_shapes(args))
    for name, tensor in ref.items():
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], tensor), name


def test_fixture_tensors_are_distinguishable():
    # Swapped names (w1/w3, wk/wv, the two norms) only fail the round trip if the tensors differ.
    sd = make_hf_model("qwen2").state_dict()
    values = [(k, v) for k, v in sd.items() if k != "lm_head.weight"]
    for i, (a, ta) in enumerate(values):
        for b, tb in values[i + 1:]:
            assert ta.shape != tb.shape or not torch.equal(ta, tb), (a, b)
    assert not torch.equal(sd["model.norm.weight"], torch.ones(64))
    assert not torch.equal(make_hf_model("qwen2", seed=1).state_dict()["model.norm.weight"], sd["model.norm.weight"])


@pytest.mark.parametrize("family,check", [
    ("llama2", dict(n_heads=4, n_kv_heads=4, head_dim=16, rope_scaling=None, rope_base=10000.0)),
    ("llama3", dict(n_kv_heads=2, rope_base=500000.0, vocab_size=512)),
    ("llama-linear", dict(max_position_embeddings=2048)),
    ("qwen2", dict(qkv_bias=True, tie_word_embeddings=True, n_kv_heads=1, bos_id=None, eos_ids=(3, 4),
                   rope_base=1e6, norm_eps=1e-6)),
    ("mistral", dict(n_kv_heads=2, rope_base=1e6, tie_word_embeddings=False)),
    ("llama32", dict(head_dim=32, tie_word_embeddings=True, qkv_bias=False)),
    ("qwen3", dict(qk_norm=True, head_dim=32, dim=64, n_heads=4, qkv_bias=False, out_bias=False, bos_id=None,
                   eos_ids=(3, 4), rope_base=1e6, tie_word_embeddings=True, layer_windows=(None, None))),
    ("llama-bias", dict(qkv_bias=True, out_bias=True, mlp_bias=True, qk_norm=False)),
    ("mistral-window", dict(sliding_window=8, layer_types=None, layer_windows=(8, 8))),
    # Qwen2's max_window_layers = 1: the layers from index 1 on slide, not the first one.
    ("qwen2-window", dict(sliding_window=8, layer_types=("full_attention", "sliding_attention"),
                          layer_windows=(None, 8), qkv_bias=True, out_bias=False)),
    ("qwen3-window", dict(layer_windows=(8, None), qkv_bias=True, out_bias=True, tie_word_embeddings=False)),
    ("ministral", dict(layer_windows=(None, 8), qkv_bias=False)),
])
def test_engine_config(tmp_path, family, check):
    out = convert_hf_checkpoint(make_hf_checkpoint(tmp_path / family, family, "safetensors"), tmp_path / "out")
    args = ModelArgs.load(out)
    assert args.name == family  # transformers 5 stores no _name_or_path: named after the folder
    for key, value in check.items():
        assert getattr(args, key) == value, key
    scaling = {"llama3": ("llama3", 8.0, 64), "llama32": ("llama3", 32.0, 64), "llama-linear": ("linear", 4.0, None)}
    if family in scaling:
        kind, factor, orig = scaling[family]
        assert (args.rope_scaling.rope_type, args.rope_scaling.factor) == (kind, factor)
        if orig:
            assert args.rope_scaling.original_max_position_embeddings == orig


@pytest.mark.parametrize("src,dtype,want", [
    (torch.float32, "bfloat16", torch.bfloat16), (torch.float32, "float16", torch.float16),
    (torch.bfloat16, "auto", torch.bfloat16), (torch.bfloat16, "float32", torch.float32),
])
def test_dtype(tmp_path, src, dtype, want):
    hf = make_hf_checkpoint(tmp_path / "hf", "llama3", "bin", weights_dtype=src)
    result = run_cli("--hf-dir", hf, "--out", tmp_path / "out", "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert f"dtype {SAFETENSORS_DTYPE[want]}," in result.output and "output :" in result.output
    _, sd = load_engine_checkpoint(tmp_path / "out")
    for name, tensor in engine_reference("llama3", weights_dtype=src).items():
        assert sd[name].dtype == want and torch.equal(sd[name], tensor.to(want)), name


def test_sharded_output_and_tokenizer_files(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf", "llama3", "safetensors")
    (hf / "tokenizer_config.json").write_text("{}")
    (hf / "original").mkdir()
    (hf / "original" / "tokenizer.model").write_bytes(b"tiktoken ranks")
    out = convert_hf_checkpoint(hf, tmp_path / "out", max_shard_gb=40e3 / 2**30)
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.model").read_bytes() == b"tiktoken ranks"
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    _, sd = load_engine_checkpoint(out)
    assert all(torch.equal(sd[k], v) for k, v in engine_reference("llama3").items())


# ---- bad inputs ----------------------------------------------------------------------------
def _drop_tensor(hf):
    rewrite(hf / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _bad_shape(hf):
    rewrite(hf / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))


def _extra_tensor(hf):
    rewrite(hf / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.gate_proj.lora_A": torch.zeros(128)}))


def _bias_the_config_lacks(hf):
    rewrite(hf / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.gate_proj.bias": torch.zeros(128)}))


def _pickled_object(hf):
    (hf / "model.safetensors").unlink()
    torch.save({"model.norm.weight": argparse.Namespace(evil=True)}, hf / "pytorch_model.bin")


BAD_INPUTS = {  # name -> (family, fmt, how to break it, substring of the error)
    "no-config": ("llama2", "safetensors", lambda hf: (hf / "config.json").unlink(), "has no config.json"),
    "bad-json": ("llama2", "safetensors", lambda hf: (hf / "config.json").write_text("{oops"), "cannot read"),
    "config-key": ("llama2", "safetensors", lambda hf: edit_config(hf, hidden_size=None), "'hidden_size'"),
    "no-weights": ("llama2", "safetensors", lambda hf: (hf / "model.safetensors").unlink(), "no weights in"),
    "missing-shard": ("llama3", "safetensors-sharded", lambda hf: (hf / "model-00002-of-00004.safetensors").unlink(),
                      "missing 1 of 4 weight shards"),
    "missing-bin-shard": ("llama3", "bin-sharded", lambda hf: (hf / "pytorch_model-00001-of-00002.bin").unlink(),
                          "missing 1 of 2 weight shards"),
    "dropped-tensor": ("llama2", "safetensors", _drop_tensor,
                       "missing 1 of 21 tensors (first: 'layers.1.feed_forward.w3.weight')"),
    "untied-no-lm-head": ("qwen2", "safetensors", lambda hf: edit_config(hf, tie_word_embeddings=False),
                          "'output.weight'"),
    "wrong-shape": ("llama2", "safetensors", _bad_shape, "'layers.0.attention.wk.weight' has shape (16, 64)"),
    "unknown-tensor": ("llama2", "safetensors", _extra_tensor, "'model.layers.0.mlp.gate_proj.lora_A'"),
    "bias-without-mlp_bias": ("llama2", "safetensors", _bias_the_config_lacks,
                              "unexpected tensor(s) (first: 'layers.0.feed_forward.w1.bias')"),
    "bias-missing": ("llama-bias", "safetensors", lambda hf: rewrite(
        hf / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.o_proj.bias")),
        "(first: 'layers.1.attention.wo.bias')"),
    "corrupt-file": ("llama2", "safetensors", lambda hf: (hf / "model.safetensors").write_bytes(b"\0" * 64),
                     "cannot read weights file"),
    "pickled-object": ("llama2", "safetensors", _pickled_object, "cannot read weights file"),
    "gpt2": ("llama2", "safetensors", lambda hf: edit_config(hf, model_type="gpt2"), "unsupported model_type 'gpt2'"),
    "yarn": ("llama3", "safetensors", lambda hf: edit_config(
        hf, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope scaling type 'yarn'"),
    "dynamic-v4-keys": ("llama2", "safetensors", lambda hf: edit_config(
        hf, rope_parameters=None, rope_theta=1e4, rope_scaling=dict(type="dynamic", factor=2.0)),
        "rope scaling type 'dynamic'"),
    # What stays unsupported is one line naming the feature.
    "moe": ("qwen3", "safetensors", lambda hf: edit_config(hf, model_type="qwen3_moe"),
            "'qwen3_moe': mixture-of-experts MLP layers are not supported"),
    "mixtral": ("mistral", "safetensors", lambda hf: edit_config(hf, model_type="mixtral"),
                "'mixtral': mixture-of-experts MLP layers are not supported"),
    "gemma": ("llama2", "safetensors", lambda hf: edit_config(hf, model_type="gemma2"),
              "'gemma2': Gemma's GeGLU MLP"),
    "chunked-layers": ("qwen3-window", "safetensors", lambda hf: edit_config(
        hf, layer_types=["chunked_attention", "full_attention"]), "layer type 'chunked_attention' is not supported"),
    "layer-types-length": ("qwen3-window", "safetensors", lambda hf: edit_config(hf, layer_types=["full_attention"]),
                           "layer_types must list one type per layer (2)"),
    "sliding-without-window": ("qwen3-window", "safetensors", lambda hf: edit_config(hf, use_sliding_window=False),
                               "names sliding_attention layers but there is no window"),
    "window-not-int": ("mistral-window", "safetensors", lambda hf: edit_config(hf, sliding_window="8"),
                       "sliding_window must be an integer"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_error(tmp_path, case):
    family, fmt, breaker, needle = BAD_INPUTS[case]
    hf = make_hf_checkpoint(tmp_path / "hf", family, fmt)
    breaker(hf)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        convert_hf_checkpoint(hf, out)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert_one_line_error(run_cli("--hf-dir", hf, "--out", out, "--dtype", "bfloat16"), needle)
    assert_no_output_left(out)


def test_missing_hf_dir(tmp_path):
    assert_one_line_error(run_cli("--hf-dir", tmp_path / "nope", "--out", tmp_path / "out"), "is not a directory")
    assert_no_output_left(tmp_path / "out")


def test_existing_output_needs_force(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf", "mistral", "safetensors")
    out = convert_hf_checkpoint(hf, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    assert_one_line_error(run_cli("--hf-dir", hf, "--out", out), "pass --force")
    assert run_cli("--hf-dir", hf, "--out", out, "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == before
    load_engine_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temp or backup dirs left
    # The input directory itself is never a valid --out, even with --force.
    assert_one_line_error(run_cli("--hf-dir", hf, "--out", hf, "--force"), "holds the input checkpoint")
    assert (hf / "config.json").is_file()


def test_empty_output_dir_is_fine(tmp_path):
    (tmp_path / "out").mkdir()
    convert_hf_checkpoint(make_hf_checkpoint(tmp_path / "hf", "llama2", "bin"), tmp_path / "out")
    load_engine_checkpoint(tmp_path / "out")


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    hf = make_hf_checkpoint(tmp_path / "hf", "llama2", "safetensors")
    old = convert_hf_checkpoint(hf, tmp_path / "old")

    def disk_full(*_):
        raise OSError("No space left on device")

    monkeypatch.setattr(conv, "_copy_tokenizer_files", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        convert_hf_checkpoint(hf, tmp_path / "new")
    assert_no_output_left(tmp_path / "new")
    before = sorted(p.name for p in old.iterdir())
    with pytest.raises(UserError, match="--out was left as it was"):
        convert_hf_checkpoint(hf, old, force=True)
    assert sorted(p.name for p in old.iterdir()) == before  # the previous output survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "old"]


# ---- loading an engine checkpoint ----------------------------------------------------------
def test_load_engine_checkpoint_errors(tmp_path):
    out = convert_hf_checkpoint(make_hf_checkpoint(tmp_path / "hf", "qwen2", "safetensors"), tmp_path / "out")
    weights = out / "model.safetensors"
    pristine = weights.read_bytes()
    cases = [
        (lambda t: t.pop("layers.0.attention.wk.bias"), "missing 1 of 26 tensors (first: 'layers.0.attention.wk.bias')"),
        (lambda t: t.update({"norm.weight": torch.ones(65)}), "'norm.weight' has shape (65,)"),
        (lambda t: t.update({"output.weight": torch.ones(320, 64)}), "unexpected tensor(s) (first: 'output.weight')"),
    ]
    for edit, needle in cases:
        weights.write_bytes(pristine)
        rewrite(weights, edit)
        with pytest.raises(UserError) as err:
            load_engine_checkpoint(out)
        assert needle in str(err.value) and "convert_hf_checkpoint.py" in str(err.value), str(err.value)
    weights.unlink()
    with pytest.raises(UserError, match="has no model.safetensors"):
        load_engine_checkpoint(out)
    with pytest.raises(UserError, match="does not exist"):
        load_engine_checkpoint(tmp_path / "nope")
    (out / "engine_config.json").unlink()
    with pytest.raises(UserError, match="engine_config.json"):
        load_engine_checkpoint(out)


def test_load_sharded_engine_checkpoint_missing_shard(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf", "llama2", "safetensors")
    out = convert_hf_checkpoint(hf, tmp_path / "out", max_shard_gb=40e3 / 2**30)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(UserError, match=f"missing 1 of {len(shards)} weight shards"):
        load_engine_checkpoint(out)


def test_names_and_shapes():
    assert hf_to_engine_name("model.layers.11.mlp.gate_proj.weight") == "layers.11.feed_forward.w1.weight"
    assert hf_to_engine_name("model.layers.0.post_attention_layernorm.weight") == "layers.0.ffn_norm.weight"
    assert hf_to_engine_name("lm_head.weight") == "output.weight"
    assert hf_to_engine_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert hf_to_engine_name("transformer.h.0.attn.c_attn.weight") is None
    args = ModelArgs.from_preset("tiny-qwen2")
    shapes = expected_shapes(args)
    assert len(shapes) == 2 + 12 * args.n_layers + 1
    assert shapes["layers.1.attention.wk.weight"] == (16, 64) and shapes["layers.1.attention.wk.bias"] == (16,)
    validate_state_dict(args, {k: torch.empty(s) for k, s in shapes.items()})


# ---- the command line ----------------------------------------------------------------------
def test_help_explains_every_option():
    result = run_cli("--help")
    assert result.exit_code == 0
    for option in ("--hf-dir", "--out", "--dtype", "bfloat16", "float16", "auto", "--force", "--max-shard-gb"):
        assert option in result.output


def test_script_runs_as_a_file(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf", "llama2", "bin-sharded")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    script = ["convert/convert_hf_checkpoint.py", "--hf-dir", str(hf), "--out", str(tmp_path / "out")]
    ok = subprocess.run([sys.executable, *script], cwd=REPO, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "params :" in ok.stdout and str(tmp_path / "out") in ok.stdout
    bad = subprocess.run([sys.executable, *script], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: --out {tmp_path / 'out'} already holds a checkpoint; "
                                               "pass --force to replace it"]


# ---- which layers slide, read as transformers reads config.json ---------------------------
WINDOW_CONFIGS = {  # name -> (config class, its arguments, keys dropped from the saved config.json)
    # Older config.json files have no layer_types: Qwen's rule makes layers >= max_window_layers slide.
    "qwen2 max_window_layers": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=16, max_window_layers=3),
                                ("layer_types",)),
    "qwen3 max_window_layers": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
                                ("layer_types",)),
    "qwen3 window off": ("Qwen3Config", dict(use_sliding_window=False, sliding_window=16), ("layer_types",)),
    "qwen2 default window": ("Qwen2Config", dict(use_sliding_window=True, max_window_layers=2),
                             ("layer_types", "sliding_window")),
    "qwen3 layer_types": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=16, max_window_layers=9,
                                              layer_types=["full_attention", "sliding_attention"] * 2 + ["full_attention"]),
                          ()),
    "mistral window": ("MistralConfig", dict(sliding_window=16), ()),
    "mistral default window": ("MistralConfig", dict(), ("sliding_window",)),
    "mistral no window": ("MistralConfig", dict(sliding_window=None), ()),
    "ministral": ("MinistralConfig", dict(sliding_window=16, head_dim=16), ("layer_types",)),
    "ministral mix": ("MinistralConfig", dict(sliding_window=16, head_dim=16,
                                              layer_types=["sliding_attention"] * 4 + ["full_attention"]), ()),
}


@pytest.mark.parametrize("case", WINDOW_CONFIGS)
def test_layer_windows_are_the_ones_transformers_builds(tmp_path, case):
    """Each layer's window from a config.json equals what transformers builds from the same file
    (its class defaults for missing keys included): the window of its sliding layers, None elsewhere."""
    import json

    import transformers

    name, kwargs, dropped = WINDOW_CONFIGS[case]
    shape = dict(num_hidden_layers=5, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    getattr(transformers, name)(**shape, **kwargs).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in dropped:
        raw.pop(key, None)
    hf = getattr(transformers, name).from_dict(raw)  # what transformers reads from this config.json
    types = getattr(hf, "layer_types", None) if name != "MistralConfig" else None  # MistralModel ignores them
    expected = tuple(hf.sliding_window if (types is None or t == "sliding_attention") else None
                     for t in (types or [None] * 5))
    assert ModelArgs.from_hf_config(raw).layer_windows == expected
