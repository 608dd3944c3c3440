"""The bundled model's cache: where it goes, what happens when it cannot be written, and how a
damaged entry is repaired. Each test converts the bundled model into its own temporary cache."""
from __future__ import annotations

import os
import tempfile
import threading
import warnings

import pytest

from gpt_fast_magicdec import tiny
from gpt_fast_magicdec.checkpoint import load_engine_checkpoint
from gpt_fast_magicdec.convert import convert_hf_checkpoint as conv
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.tiny import CACHE_VARIABLE, bundled_checkpoint, bundled_draft_checkpoint


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No cache variable set, HOME in tmp_path, and a private temporary directory."""
    for var in (CACHE_VARIABLE, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path


def convert_quietly(convert=bundled_checkpoint):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = convert()
    return path, [str(w.message) for w in caught]


@pytest.mark.parametrize("where", ["own variable", "XDG_CACHE_HOME", "home", "own variable over XDG"])
def test_where_the_cache_goes(env, monkeypatch, where):
    expected = {"own variable": env / "mine", "XDG_CACHE_HOME": env / "xdg" / "gpt-fast-magicdec",
                "home": env / "home" / ".cache" / "gpt-fast-magicdec", "own variable over XDG": env / "mine"}[where]
    if "own variable" in where:
        monkeypatch.setenv(CACHE_VARIABLE, str(env / "mine"))
    if "XDG" in where:
        monkeypatch.setenv("XDG_CACHE_HOME", str(env / "xdg"))
    path, said = convert_quietly()
    assert path.parent == expected and not said
    load_engine_checkpoint(path)


def test_a_read_only_home_falls_back_to_the_temporary_directory(env, monkeypatch, unwritable_dir):
    monkeypatch.setenv("HOME", str(unwritable_dir))
    path, said = convert_quietly()
    assert path.parent == env / "tmp" / f"gpt-fast-magicdec-{os.getuid()}"
    assert len(said) == 1 and CACHE_VARIABLE in said[0] and "\n" not in said[0], said
    again, said_again = convert_quietly()  # reused, and said again: the HOME is still read-only
    assert again == path and len(said_again) == 1


@pytest.mark.parametrize("blocker", ["a file", "a file above it"])
def test_a_cache_path_through_a_file_falls_back(env, monkeypatch, blocker):
    (env / "afile").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(env / "afile" if blocker == "a file" else env / "afile" / "sub"))
    path, said = convert_quietly(bundled_draft_checkpoint)
    assert path.parent.parent == env / "tmp" and len(said) == 1 and CACHE_VARIABLE in said[0]


def test_an_unwritable_cache_the_user_chose_is_refused(env, monkeypatch, unwritable_dir):
    monkeypatch.setenv(CACHE_VARIABLE, str(unwritable_dir / "cache"))
    with pytest.raises(UserError, match=f"{CACHE_VARIABLE}=.*cannot write the bundled model's cache there") as err:
        bundled_checkpoint()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("planted", ["a symlink", "world-writable"])
def test_a_fallback_planted_by_someone_else_is_refused(env, monkeypatch, unwritable_dir, planted):
    monkeypatch.setenv("HOME", str(unwritable_dir))
    fallback = env / "tmp" / f"gpt-fast-magicdec-{os.getuid()}"
    if planted == "a symlink":
        (env / "elsewhere").mkdir()
        fallback.symlink_to(env / "elsewhere")
    else:
        fallback.mkdir()
        fallback.chmod(0o777)
    with pytest.raises(UserError, match=f"set {CACHE_VARIABLE} to a writable directory"):
        bundled_checkpoint()
    if planted == "a symlink":
        assert not list((env / "elsewhere").iterdir())  # nothing was written through it


def test_a_healthy_entry_in_a_cache_now_read_only_is_used(env, monkeypatch):
    monkeypatch.setenv(CACHE_VARIABLE, str(env / "cache"))
    path, _ = convert_quietly()
    monkeypatch.setattr(tiny, "_unwritable", lambda d: "Read-only file system")
    assert convert_quietly() == (path, [])


DAMAGE = {
    "truncated weights": lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:999]),
    "no weights": lambda p: (p / "model.safetensors").unlink(),
    "no engine_config.json": lambda p: (p / "engine_config.json").unlink(),
    "garbage engine_config.json": lambda p: (p / "engine_config.json").write_text("{oops"),
    "a file instead": lambda p: __import__("shutil").rmtree(p) or p.write_text("x"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_entry_is_converted_again(env, monkeypatch, case):
    monkeypatch.setenv(CACHE_VARIABLE, str(env / "cache"))
    path, _ = convert_quietly()
    DAMAGE[case](path)
    again, said = convert_quietly()
    assert again == path and len(said) == 1 and "is damaged" in said[0] and "converting it again" in said[0]
    assert "--hf-dir" not in said[0]  # advice for the bundled model, not a user's checkpoint
    load_engine_checkpoint(path)


def test_a_damaged_entry_that_cannot_be_removed_says_which_directory_to_delete(env, monkeypatch):
    monkeypatch.setenv(CACHE_VARIABLE, str(env / "cache"))
    path, _ = convert_quietly()
    (path / "engine_config.json").unlink()

    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tiny.shutil, "rmtree", refuse)
    with pytest.raises(UserError, match=f"is damaged .* cannot be removed .*; delete {path} and run again") as err:
        convert_quietly()
    assert "--hf-dir" not in str(err.value)


def test_concurrent_first_uses_convert_once(env, monkeypatch):
    monkeypatch.setenv(CACHE_VARIABLE, str(env / "cache"))
    calls = []
    real = conv.convert_hf_checkpoint

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(conv, "convert_hf_checkpoint", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(bundled_checkpoint())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(calls) == 1
    assert sorted(p.name for p in (env / "cache").iterdir()) == [results[0].name]  # no lock or work dirs left
