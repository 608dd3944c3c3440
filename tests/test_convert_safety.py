"""The converter never deletes what is not its own output, cleans up after killed runs, reads every
rope form transformers 5 writes, and refuses malformed configs with one line."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint, main
from gpt_fast_magicdec.config import ModelArgs, rope_inv_freq
from gpt_fast_magicdec.errors import UserError
from hf_fixtures import edit_config, make_hf_checkpoint


def one_line_error(args, needle):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.output.count("error:") == 1 and needle in result.output, result.output
    assert "Traceback" not in result.output


@pytest.fixture
def hf(tmp_path):
    return make_hf_checkpoint(tmp_path / "hf", "llama2", "safetensors")


# ---- data safety ---------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["", "  ", "."])
def test_out_never_means_the_current_directory(hf, tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    one_line_error(["--hf-dir", hf, "--out", out, "--force"], "--out")
    assert (work / "notes.txt").read_text() == "mine"


def test_force_replaces_only_an_engine_checkpoint(hf, tmp_path):
    other = tmp_path / "project"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    one_line_error(["--hf-dir", hf, "--out", other, "--force"], "not an engine checkpoint")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    # A checkpoint with a stranger file inside is no longer recognisably ours either.
    ckpt = convert_hf_checkpoint(hf, tmp_path / "ckpt")
    (ckpt / "results.csv").write_text("1,2")
    one_line_error(["--hf-dir", hf, "--out", ckpt, "--force"], "not an engine checkpoint")
    (ckpt / "results.csv").unlink()
    convert_hf_checkpoint(hf, ckpt, force=True)


def test_parent_of_cwd_is_refused(hf, tmp_path, monkeypatch):
    ckpt = convert_hf_checkpoint(hf, tmp_path / "ckpt")
    (ckpt / "sub").mkdir()  # (an unexpected entry anyway, but the cwd check comes first)
    monkeypatch.chdir(ckpt / "sub")
    one_line_error(["--hf-dir", hf, "--out", "..", "--force"], "current directory")


def test_stale_partials_are_removed_live_ones_kept(hf, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-0123abcd"
    live = tmp_path / f".out.partial-{os.getpid()}-89abcdef"  # this process is alive
    legacy_old, legacy_new = tmp_path / ".out.partial-deadbeef", tmp_path / ".out.partial-cafef00d"
    unrelated = tmp_path / ".other.partial-1-0123abcd"
    for d in (stale, live, legacy_old, legacy_new, unrelated):
        d.mkdir()
    hour_ago = time.time() - 7200
    os.utime(legacy_old, (hour_ago, hour_ago))
    convert_hf_checkpoint(hf, tmp_path / "out")
    left = {p.name for p in tmp_path.iterdir()}
    assert stale.name not in left and legacy_old.name not in left
    assert {live.name, legacy_new.name, unrelated.name, "out", "hf"} <= left


# ---- transformers 5 configs ----------------------------------------------------------------
ROPES = {
    "llama3-v5": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64)),
    "llama3-v4": dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                             high_freq_factor=4.0, original_max_position_embeddings=64)),
    "linear-v5": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    "linear-v4": dict(rope_theta=10000.0, rope_scaling=dict(type="linear", factor=4.0)),
}


def saved_by_transformers(path, **rope):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **rope)
    cfg.save_pretrained(path)
    return cfg


@pytest.mark.parametrize("case", sorted(ROPES))
def test_rope_from_configs_saved_by_transformers(tmp_path, case):
    cfg = saved_by_transformers(tmp_path, **ROPES[case])
    raw = json.loads((tmp_path / "config.json").read_text())
    args = ModelArgs.from_hf_config(raw)
    # A top-level rope_theta beside rope_parameters (hand-edited or older tooling) changes nothing.
    raw_mixed = dict(raw, rope_theta=args.rope_base)
    assert ModelArgs.from_hf_config(raw_mixed) == args
    rope_type = cfg.rope_parameters["rope_type"]
    expected, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    assert args.rope_scaling is not None and args.rope_scaling.rope_type == rope_type
    torch.testing.assert_close(rope_inv_freq(args).float(), expected.float(), rtol=1e-6, atol=0)


def test_conflicting_or_incomplete_rope_is_refused():
    base = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4)
    cases = [
        (dict(rope_scaling=dict(rope_type="linear", factor=2.0), rope_parameters=dict(rope_type="linear", factor=4.0)),
         "disagree"),
        (dict(rope_theta=10000.0, rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
         "two rope_theta values"),
        (dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0)), "lacks a numeric 'low_freq_factor'"),
        (dict(rope_scaling="linear"), "must be an object"),
    ]
    for extra, needle in cases:
        with pytest.raises(UserError, match=needle):
            ModelArgs.from_hf_config(dict(base, **extra))


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unknown_rope_types_are_refused(hf, tmp_path, rope_type):
    edit_config(hf, rope_parameters=dict(rope_type=rope_type, rope_theta=1e4, factor=4.0))
    one_line_error(["--hf-dir", hf, "--out", tmp_path / "out"], f"rope scaling type {rope_type!r}")


# ---- malformed configs ---------------------------------------------------------------------
MALFORMED_HF = {
    "not an object": ("[1, 2]", "must hold a JSON object"),
    "string size": ({"hidden_size": "64"}, "hidden_size must be an integer"),
    "fractional size": ({"intermediate_size": 127.5}, "intermediate_size must be an integer"),
    "zero heads": ({"num_attention_heads": 0}, "n_heads must be a positive integer"),
    "negative layers": ({"num_hidden_layers": -1}, "n_layers must be a positive integer"),
    "bool vocab": ({"vocab_size": True}, "vocab_size must be an integer"),
    "string eps": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number"),
    "not utf-8": (b"\xff\xfe{", "cannot read"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_HF))
def test_malformed_hf_config(hf, tmp_path, case):
    change, needle = MALFORMED_HF[case]
    if isinstance(change, dict):
        edit_config(hf, **change)
    elif isinstance(change, bytes):
        (hf / "config.json").write_bytes(change)
    else:
        (hf / "config.json").write_text(change)
    one_line_error(["--hf-dir", hf, "--out", tmp_path / "out"], needle)
    assert not (tmp_path / "out").exists()


MALFORMED_ENGINE = {
    "invalid json": ("{oops", "cannot read"),
    "not an object": ("[]", "must hold a JSON object"),
    "unknown key": (lambda c: dict(c, flash=True), "unknown key(s) 'flash'"),
    "zero heads": (lambda c: dict(c, n_heads=0), "n_heads must be a positive integer"),
    "string dim": (lambda c: dict(c, dim="64"), "dim must be a positive integer"),
    "bad rope": (lambda c: dict(c, rope_scaling={"rope_type": "linear", "factr": 2}), "rope_scaling"),
    "bad eos": (lambda c: dict(c, eos_ids="2"), "eos_ids"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_ENGINE))
def test_malformed_engine_config(hf, tmp_path, case):
    ckpt = convert_hf_checkpoint(hf, tmp_path / "ckpt")
    path = ckpt / "engine_config.json"
    change, needle = MALFORMED_ENGINE[case]
    text = change if isinstance(change, str) else json.dumps(change(json.loads(path.read_text())))
    path.write_text(text)
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        ModelArgs.load(ckpt)
    assert "\n" not in str(err.value)
