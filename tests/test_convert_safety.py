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
from pathlib import Path

from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gpt_fast_magicdec.checkpoint import load_engine_checkpoint
from gpt_fast_magicdec.convert import convert_hf_checkpoint as conv
from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint, main
from gpt_fast_magicdec.config import ModelArgs, rope_inv_freq
from gpt_fast_magicdec.errors import UserError
from hf_fixtures import edit_config, make_hf_checkpoint


_LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=64)
_LLAMA3_ENGINE = {k: v for k, v in _LLAMA3.items() if k != "rope_theta"}


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


# ---- concurrent conversions and the final step ------------------------------------------
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
CONVERT = [sys.executable, str(REPO / "convert" / "convert_hf_checkpoint.py")]
HOLD_LOCK = ("import sys\nfrom pathlib import Path\n"
             "from gpt_fast_magicdec.convert.convert_hf_checkpoint import conversion_lock\n"
             "with conversion_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    sys.stdin.readline()\n")


def _tree(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


@pytest.mark.parametrize("force", [False, True])
def test_a_conversion_in_progress_is_never_replaced(hf, tmp_path, force):
    """A conversion holds the lock beside --out (here: another process); a second one to the same
    --out, new or with --force over an earlier checkpoint, fails at once and touches nothing."""
    out = tmp_path / "out"
    if force:
        convert_hf_checkpoint(hf, out)
    before = _tree(out) if force else None
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(["--hf-dir", hf, "--out", out] + (["--force"] if force else []),
                       f"another conversion to it is running (pid {holder.pid})")
        assert (_tree(out) == before) if force else not out.exists()
    finally:
        holder.communicate("\n", timeout=60)
    convert_hf_checkpoint(hf, out, force=force)  # released: the next conversion runs
    assert not list(tmp_path.glob(".out.*"))  # lock file and work directories gone


def test_two_conversions_started_together(hf, tmp_path):
    """Two conversions to one new --out at the same moment: exactly one writes it, the other
    fails with one line (locked out, or finding the first's finished checkpoint)."""
    out = tmp_path / "out"
    procs = [subprocess.Popen(CONVERT + ["--hf-dir", str(hf), "--out", str(out)], env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 1], results
    _, _, err = next(r for r in results if r[0] == 1)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --out"), err
    assert "another conversion" in err or "already holds a checkpoint" in err
    load_engine_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def _appear(path, what, hf):
    """Make `path` appear as `what` while a conversion runs (a writer that ignores the lock)."""
    if what == "checkpoint":
        convert_hf_checkpoint(hf, path, lock=False)
    elif what == "empty directory":  # rename(2) would silently replace this one
        path.mkdir()
    else:
        path.write_text("someone's notes")


@pytest.mark.parametrize("what", ["checkpoint", "empty directory", "file"])
def test_final_step_never_replaces_what_appeared_meanwhile(hf, tmp_path, monkeypatch, what):
    out = tmp_path / "out"
    copy = conv._copy_tokenizer_files

    def meanwhile(src, dst):
        copy(src, dst)
        monkeypatch.setattr(conv, "_copy_tokenizer_files", copy)
        _appear(out, what, hf)

    monkeypatch.setattr(conv, "_copy_tokenizer_files", meanwhile)
    with pytest.raises(UserError, match="changed while this conversion ran") as err:
        convert_hf_checkpoint(hf, out)
    assert "\n" not in str(err.value)
    if what == "file":
        assert out.read_text() == "someone's notes"
    else:
        assert out.is_dir() and (what == "checkpoint") == (out / "engine_config.json").is_file()
    kept = list(tmp_path.glob("out.converted-*"))  # the finished conversion is not thrown away
    assert len(kept) == 1 and str(kept[0]) in str(err.value)
    load_engine_checkpoint(kept[0])


def test_force_never_replaces_a_checkpoint_replaced_meanwhile(hf, tmp_path, monkeypatch):
    out = convert_hf_checkpoint(hf, tmp_path / "out")
    copy = conv._copy_tokenizer_files

    def meanwhile(src, dst):  # another --force conversion, not holding the lock, finished first
        copy(src, dst)
        monkeypatch.setattr(conv, "_copy_tokenizer_files", copy)
        convert_hf_checkpoint(hf, out, force=True, lock=False)
        (out / "tokenizer_config.json").write_text("{}")  # its output, told apart from ours

    monkeypatch.setattr(conv, "_copy_tokenizer_files", meanwhile)
    with pytest.raises(UserError, match="changed while this conversion ran"):
        convert_hf_checkpoint(hf, out, force=True)
    assert (out / "tokenizer_config.json").read_text() == "{}"
    assert len(list(tmp_path.glob("out.converted-*"))) == 1


# ---- where --out cannot go ---------------------------------------------------------------
@pytest.mark.parametrize("where", ["under a file", "two below a file", "under a device", "a symlink to a file"])
def test_out_whose_parent_is_not_a_directory(hf, tmp_path, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "afile")
    out = {"under a file": tmp_path / "afile" / "out", "two below a file": tmp_path / "afile" / "x" / "out",
           "under a device": "/dev/null/out", "a symlink to a file": tmp_path / "link" / "out"}[where]
    one_line_error(["--hf-dir", hf, "--out", out], "is not a directory")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("depth", [1, 2])
def test_out_in_an_unwritable_directory(hf, unwritable_dir, depth):
    out = unwritable_dir.joinpath(*["sub"] * (depth - 1), "gfm-out")
    one_line_error(["--hf-dir", hf, "--out", out], "cannot")
    assert not out.exists()


def test_missing_parents_are_created_and_removed_on_failure(hf, tmp_path):
    edit_config(hf, rms_norm_eps="tiny")  # fails before anything is created
    one_line_error(["--hf-dir", hf, "--out", tmp_path / "a" / "b" / "out"], "rms_norm_eps")
    assert not (tmp_path / "a").exists()
    edit_config(hf, rms_norm_eps=1e-5)
    (hf / "model.safetensors").write_bytes(b"\0" * 64)  # fails while the lock is held
    one_line_error(["--hf-dir", hf, "--out", tmp_path / "a" / "b" / "out"], "cannot read weights file")
    assert not (tmp_path / "a").exists()


def test_file_size_limit_is_one_line_and_keeps_the_old_checkpoint(hf, tmp_path):
    """A real write failure (RLIMIT_FSIZE: the weights cannot be written) during --force."""
    import resource

    out = convert_hf_checkpoint(hf, tmp_path / "out")
    before = _tree(out)
    limit = (out / "model.safetensors").stat().st_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(CONVERT + ["--hf-dir", str(hf), "--out", str(out), "--force"], env=ENV, text=True,
                          capture_output=True, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out") and "--out was left as it was" in lines[0], lines
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


# ---- weights the engine cannot run -------------------------------------------------------
def _retype(hf, name, dtype):
    path = hf / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = tensors[name].to(dtype) if dtype != torch.bool else tensors[name] > 0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool])
def test_integer_weights_are_refused(hf, tmp_path, dtype):
    _retype(hf, "model.layers.1.self_attn.q_proj.weight", dtype)
    one_line_error(["--hf-dir", hf, "--out", tmp_path / "out", "--dtype", "bfloat16"],
                   f"'model.layers.1.self_attn.q_proj.weight' in model.safetensors is {str(dtype)[6:]}, "
                   "not floating point")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", [{"quant_method": "gptq", "bits": 4}, {"quant_method": "bitsandbytes"},
                                   {"quant_method": "fp8"}, {"bits": 4}])
def test_quantized_checkpoints_are_refused_naming_the_method(hf, tmp_path, quant):
    edit_config(hf, quantization_config=quant)
    method = quant.get("quant_method")
    one_line_error(["--hf-dir", hf, "--out", tmp_path / "out"],
                   f"quantized checkpoint (quantization_config{f'.quant_method {method!r}' if method else ''})")


def test_integer_weights_in_an_engine_checkpoint_are_refused_at_load(hf, tmp_path):
    ckpt = convert_hf_checkpoint(hf, tmp_path / "ckpt")
    path = ckpt / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["layers.0.feed_forward.w2.weight"] = tensors["layers.0.feed_forward.w2.weight"].to(torch.int8)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(UserError, match="'layers.0.feed_forward.w2.weight' is int8, not floating point"):
        load_engine_checkpoint(ckpt)


# ---- rope scaling that would divide by zero ------------------------------------------------
BAD_ROPE = {  # rope_parameters -> the parameter named in the one error line
    "llama3 low_freq_factor 0": (dict(_LLAMA3, low_freq_factor=0.0), "low_freq_factor must be a positive number, got 0"),
    "llama3 equal freq factors": (dict(_LLAMA3, high_freq_factor=1.0), "high_freq_factor (1) must be larger than "
                                                                         "low_freq_factor (1)"),
    "llama3 inverted freq factors": (dict(_LLAMA3, low_freq_factor=4.0, high_freq_factor=1.0), "must be larger"),
    "llama3 factor 0": (dict(_LLAMA3, factor=0), "factor must be a positive number, got 0"),
    "llama3 factor NaN": (dict(_LLAMA3, factor=float("nan")), "factor must be a positive number, got nan"),
    "llama3 original length 0": (dict(_LLAMA3, original_max_position_embeddings=0),
                                 "original_max_position_embeddings must be a positive integer, got 0"),
    "llama3 original length fractional": (dict(_LLAMA3, original_max_position_embeddings=64.5),
                                          "original_max_position_embeddings must be a positive integer"),
    "linear factor negative": (dict(rope_type="linear", rope_theta=1e4, factor=-2.0), "factor must be a positive"),
    "linear factor tiny": (dict(rope_type="linear", rope_theta=1e4, factor=1e-300), "overflow"),
    "theta 0": (dict(rope_type="default", rope_theta=0.0), "rope_theta must be a positive number, got 0.0"),
    "theta tiny": (dict(rope_type="default", rope_theta=1e-300), "rotary angles that overflow"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROPE))
def test_rope_scaling_that_breaks_the_frequencies_is_refused_at_conversion(hf, tmp_path, case):
    rope, needle = BAD_ROPE[case]
    edit_config(hf, rope_parameters=rope, rope_theta=None)
    one_line_error(["--hf-dir", hf, "--out", tmp_path / "out"], needle)
    assert not (tmp_path / "out").exists()


ENGINE_ROPE = {  # engine_config.json's rope fields edited after conversion
    "low_freq_factor 0": (dict(rope_scaling=dict(_LLAMA3_ENGINE, low_freq_factor=0)), "low_freq_factor"),
    "equal freq factors": (dict(rope_scaling=dict(_LLAMA3_ENGINE, high_freq_factor=1.0)), "must be larger"),
    "factor 0": (dict(rope_scaling=dict(_LLAMA3_ENGINE, factor=0)), "factor must be a positive number"),
    "original length 0": (dict(rope_scaling=dict(_LLAMA3_ENGINE, original_max_position_embeddings=0)),
                          "original_max_position_embeddings"),
    "rope_base negative": (dict(rope_base=-1.0), "rope_base must be a positive number"),
    "rope_base tiny": (dict(rope_base=1e-300), "overflow"),
    "rope_scaling a string": (dict(rope_scaling="llama3"), "rope_scaling must be an object or null"),
}


@pytest.mark.parametrize("case", sorted(ENGINE_ROPE))
def test_rope_scaling_edited_in_engine_config_is_refused_at_load(tmp_path, case):
    ckpt = convert_hf_checkpoint(make_hf_checkpoint(tmp_path / "hf", "llama3", "safetensors"), tmp_path / "ckpt")
    path = ckpt / "engine_config.json"
    change, needle = ENGINE_ROPE[case]
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    for load in (ModelArgs.load, load_engine_checkpoint):
        with pytest.raises(UserError, match=needle) as err:
            load(ckpt)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# ---- engine_config.json edited against its weights ------------------------------------------
EDITED = {  # mostly edits that keep every tensor's shape but change what the numbers mean
    "twice the heads, half the head size": (dict(n_heads=8, n_kv_heads=8, head_dim=8), "n_heads is 8 there, 4 at"),
    "kv heads halved": (dict(n_kv_heads=2), "n_kv_heads is 2 there, 4 at conversion"),
    "norm eps": (dict(norm_eps=0.1), "norm_eps is 0.1 there"),
    "rope base": (dict(rope_base=500000.0), "rope_base is 500000.0 there, 10000.0 at conversion"),
}


@pytest.mark.parametrize("case", sorted(EDITED))
def test_engine_config_edited_against_its_weights(hf, tmp_path, case):
    ckpt = convert_hf_checkpoint(hf, tmp_path / "ckpt", max_shard_gb=0 if "eps" in case else 100e3 / 2**30)
    path = ckpt / "engine_config.json"
    change, needle = EDITED[case]
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    ModelArgs.load(ckpt)  # a valid config by itself
    with pytest.raises(UserError, match=needle) as err:
        load_engine_checkpoint(ckpt)
    assert "no longer matches the weights it was converted with" in str(err.value)
    assert "convert_hf_checkpoint.py" in str(err.value) and "\n" not in str(err.value)


def test_fields_outside_the_fingerprint_may_be_edited_and_old_checkpoints_load(hf, tmp_path):
    ckpt = convert_hf_checkpoint(hf, tmp_path / "ckpt")
    path = ckpt / "engine_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), name="mine", eos_ids=[2, 3],
                                    max_position_embeddings=1024)))
    assert load_engine_checkpoint(ckpt)[0].name == "mine"
    weights = ckpt / "model.safetensors"  # a conversion by an earlier version: no record at all
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    path.write_text(json.dumps(dict(json.loads(path.read_text()), norm_eps=0.1)))
    load_engine_checkpoint(ckpt)


# ---- --checkpoint naming a file ------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "engine_config.json", "tokenizer.model"])
def test_checkpoint_that_is_a_file_says_so(hf, tmp_path, name):
    ckpt = convert_hf_checkpoint(hf, tmp_path / "ckpt")
    target = ckpt / name if name != "tokenizer.model" else tmp_path / name
    target.touch()
    for load in (ModelArgs.load, load_engine_checkpoint):
        with pytest.raises(UserError, match="is a file, not a directory") as err:
            load(target)
        assert (f"here {ckpt}" in str(err.value)) == (target.parent == ckpt)
