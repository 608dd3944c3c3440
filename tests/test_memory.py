"""memory.py on faked /proc and cgroup trees: what is available, what a model and its caches need,
and the one-line refusal with the numbers."""
from __future__ import annotations

import pytest
import torch

from gpt_fast_magicdec import memory
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.memory import available, check_fits, fits_reason, kv_cache_bytes, model_bytes
from gpt_fast_magicdec.model import Transformer

GiB = 2**30


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake /proc/meminfo, /proc/self/cgroup and /sys/fs/cgroup; `set(...)` fills them in."""
    meminfo, cgroup, root = tmp_path / "meminfo", tmp_path / "cgroup", tmp_path / "sys-fs-cgroup"
    root.mkdir()
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "PROC_SELF_CGROUP", cgroup)
    monkeypatch.setattr(memory, "CGROUP_ROOT", root)

    class Machine:
        def set(self, available=None, cgroup_line="0::/", files=None):
            if available is not None:
                meminfo.write_text(f"MemTotal:       {64 * GiB // 1024} kB\nMemFree:  1 kB\n"
                                   f"MemAvailable:   {int(available) // 1024} kB\n")
            cgroup.write_text(cgroup_line + "\n")
            for rel, text in (files or {}).items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(text)

    return Machine()


def test_memavailable_without_a_cgroup_limit(machine):
    machine.set(available=21.3 * GiB, files={"memory.max": "max\n", "memory.current": str(5 * GiB)})
    assert available("cpu")[0] == pytest.approx(21.3 * GiB, abs=1024)


@pytest.mark.parametrize("layout", ["v2", "v2 limit on a parent", "v2 hybrid", "v1"])
def test_a_cgroup_limit_tighter_than_memavailable_wins(machine, layout):
    usage = dict(limit=str(8 * GiB), current=str(6 * GiB), stat=f"anon 1\ninactive_file {GiB}\n")
    if layout == "v2":
        files = {"a/memory.max": usage["limit"], "a/memory.current": usage["current"], "a/memory.stat": usage["stat"]}
        line = "0::/a"
    elif layout == "v2 limit on a parent":  # the child has no limit of its own, its parent does
        files = {"a/b/memory.max": "max", "a/b/memory.current": str(GiB), "a/memory.max": usage["limit"],
                 "a/memory.current": usage["current"], "a/memory.stat": usage["stat"]}
        line = "0::/a/b"
    elif layout == "v2 hybrid":
        files = {f"unified/a/{k}": v for k, v in {"memory.max": usage["limit"], "memory.current": usage["current"],
                                                  "memory.stat": usage["stat"]}.items()}
        line = "0::/a"
    else:
        files = {"memory/docker/x/memory.limit_in_bytes": usage["limit"],
                 "memory/docker/x/memory.usage_in_bytes": usage["current"],
                 "memory/docker/x/memory.stat": f"cache 5\ntotal_inactive_file {GiB}\n",
                 "memory/memory.limit_in_bytes": "9223372036854771712"}  # v1's "no limit"
        line = "4:memory:/docker/x\n0::/"
    machine.set(available=40 * GiB, cgroup_line=line, files=files)
    assert available("cpu")[0] == 3 * GiB  # 8 - 6 + 1 reclaimable
    assert "cgroup memory limit" in fits_reason("x", 10 * GiB, "cpu")


def test_no_meminfo_falls_back_to_sysconf(machine, monkeypatch):
    machine.set()
    monkeypatch.setattr(memory.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}[name])
    assert available("cpu")[0] == 4096 * 1000


def test_cuda_uses_free_device_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * GiB, 80 * GiB))
    assert available("cuda:0")[0] == 5 * GiB
    assert fits_reason("KV cache", 6 * GiB, "cuda:0") == "KV cache needs 6.0 GiB but 5.0 GiB are free on cuda:0"


def test_unknown_devices_never_block():
    assert available("meta")[0] is None and fits_reason("x", 10**18, "meta") is None


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama3", "tiny-qwen2", "llama-3.2-1b", "llama-3.1-8b"])
def test_model_bytes_counts_every_parameter_once(preset):
    args = ModelArgs.from_preset(preset)
    with torch.device("meta"):
        model = Transformer(args)  # meta: shapes without memory; tied weights are listed once
    params = sum(p.numel() for p in model.parameters())
    assert model_bytes(args, torch.bfloat16) == 2 * params and model_bytes(args, torch.float32) == 4 * params


def test_published_sizes():
    args = ModelArgs.from_preset("llama-3.1-8b")
    assert model_bytes(args, torch.bfloat16) == pytest.approx(16.06e9, rel=1e-3)  # 8.03B parameters
    assert kv_cache_bytes(args, 1, 1, torch.bfloat16) == 128 * 1024  # Llama-3.1-8B: 128 KiB per token
    assert kv_cache_bytes(args, 32, 16384, torch.bfloat16) == 64 * GiB


def test_refusal_is_one_line_with_the_numbers(machine):
    machine.set(available=21.3 * GiB)
    need = model_bytes(ModelArgs.from_preset("llama-3.1-70b"), torch.bfloat16)
    with pytest.raises(UserError) as err:
        check_fits("the weights of llama-3.1-70b", need, "cpu", advice="use a smaller preset")
    assert str(err.value) == ("the weights of llama-3.1-70b needs 131.4 GiB but 21.3 GiB are available "
                              "(MemAvailable) on cpu; use a smaller preset")
    check_fits("a little", 10 * GiB, "cpu")


def test_headroom_and_freed_memory(machine):
    machine.set(available=10 * GiB)
    assert fits_reason("x", 9 * GiB, "cpu") is None  # within 90 %
    tight = fits_reason("x", 9.5 * GiB, "cpu")  # fits, but not with room for activations
    assert "9.5 GiB but 10.0 GiB" in tight and "10% of it is kept for activations" in tight
    assert fits_reason("x", 9.5 * GiB, "cpu", headroom=1.0) is None
    assert fits_reason("x", 12 * GiB, "cpu", freed_bytes=4 * GiB) is None  # the old caches go first
    with pytest.raises(ValueError):
        fits_reason("x", 1, "cpu", headroom=0)
