"""Test-session set-up.

Without a GPU the Triton kernels run in Triton's interpreter. triton reads TRITON_INTERPRET when it
is first imported (that is when `@triton.jit` picks compiled or interpreted kernels), so it is set
here, before any test module imports triton. `--attention auto` still picks the plain-torch path
on CPU; only tests that ask for the kernels run them.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CLI tests (generate.py, bench.py, torchrun launches, which inherit the environment) check exact
# fp32 output on CPU; on a CUDA machine they would otherwise default to bf16 with compile and graphs.
# A test that names --device still gets that device; the GPU-only tests build their models directly.
os.environ.setdefault("GPT_FAST_MAGICDEC_DEVICE", "cpu")
# The bundled model's cache: tests choose theirs with XDG_CACHE_HOME, which this would override.
os.environ.pop("GPT_FAST_MAGICDEC_CACHE", None)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory in which nothing can be created: a read-only one, or as root (who ignores
    permissions) /sys, where the kernel refuses new entries even to root. Skipped where neither."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    d = Path("/sys")
    probe = d / f"gpt-fast-magicdec-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        yield d
        return
    probe.rmdir()
    pytest.skip("running as root and /sys accepts new entries: no unwritable directory to test with")


@pytest.fixture(scope="session")
def bundled_checkpoints(tmp_path_factory):
    """(target, draft): the bundled tiny models converted once per session into a fresh user cache
    ($XDG_CACHE_HOME), checking where they land and that a second use reuses the conversion."""
    from gpt_fast_magicdec.tiny import (BUNDLED_DRAFT_NAME, bundled_checkpoint, bundled_draft_checkpoint,
                                        resolve_draft_checkpoint)

    cache = tmp_path_factory.mktemp("xdg-cache")
    converted = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        for convert, prefix in ((bundled_checkpoint, "tiny-"), (bundled_draft_checkpoint, "tiny-draft-")):
            first = convert()
            assert first.parent == cache / "gpt-fast-magicdec" and first.name.startswith(prefix)
            mtime = (first / "model.safetensors").stat().st_mtime_ns
            assert convert() == first  # the second use reuses the conversion
            assert (first / "model.safetensors").stat().st_mtime_ns == mtime
            converted.append(first)
        target, draft = converted
        assert target != draft
        assert resolve_draft_checkpoint(Path(BUNDLED_DRAFT_NAME)) == draft
    return target, draft
