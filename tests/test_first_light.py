"""The first-light command (benchmarks/gpu_first_light.py) and its budgeted stage runner
(benchmarks/lease.py): the CPU dry run end to end, and the budget rules with fake stages and a fake
clock. No test asserts how long real work took."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks import gpu_first_light as fl
from benchmarks.lease import Lease, Outcome, Stage
from gpt_fast_magicdec.config import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
RETURNED_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device machine sends back


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def stage(name, estimate, run, limit=100.0, fallback=None):
    return Stage(name, f"checks {name}", estimate, limit, run, fallback)


def advance(clock, seconds, outcome=None):
    """A fake stage's run: `seconds` pass on the fake clock, then it reports `outcome`."""
    def run(ctx):
        clock.t += seconds
        return outcome or Outcome(True, f"took {seconds} s")
    return run


def lease(tmp_path, stages, budget_s=10.0, clock=None):
    return Lease("first_light", stages, budget_s, tmp_path / "out", tmp_path / "work",
                 dict(command="test", commit="abc", date="today"), clock=clock or FakeClock(), echo=lambda line: None)


def by_name(entries):
    return {e["stage"]: e for e in entries}


# ---- the budget rules ---------------------------------------------------------------------------
def test_a_stage_that_would_overrun_is_skipped_and_later_ones_still_run(tmp_path):
    clock = FakeClock()
    entries = by_name(lease(tmp_path, [stage("a", 3, advance(clock, 4)), stage("b", 8, advance(clock, 1)),
                                       stage("c", 2, advance(clock, 1))], clock=clock).run())
    assert entries["a"]["status"] == "ok" and entries["c"]["status"] == "ok"
    assert entries["b"]["status"] == "skipped"
    assert entries["b"]["result"] == "skipped: needs ~8 s, 6 s of the budget left"
    assert "seconds" not in entries["b"] and "commands" not in entries["b"]
    md = (tmp_path / "out" / "first_light.md").read_text()
    assert "| 2 | b | skipped | skipped: needs ~8 s, 6 s of the budget left |" in md


def test_a_stage_limit_is_cut_to_the_budget_left(tmp_path):
    clock = FakeClock()
    seen = {}

    def record(ctx):
        seen["left"] = ctx.deadline - clock()
        return Outcome(None, "measured")
    entries = lease(tmp_path, [stage("a", 1, advance(clock, 7)), stage("b", 2, record, limit=100)], clock=clock).run()
    assert seen["left"] == pytest.approx(3) and entries[1]["limit_s"] == 3 and entries[1]["status"] == "measured"


def test_the_fallback_runs_when_its_stage_does_not_fit(tmp_path):
    clock = FakeClock()
    fallback = stage("eager", 3, advance(clock, 1))
    entries = lease(tmp_path, [stage("a", 5, advance(clock, 5)), stage("compiled", 9, advance(clock, 1),
                                                                        fallback=fallback)], clock=clock).run()
    assert entries[1]["stage"] == "eager" and entries[1]["status"] == "ok"
    assert entries[1]["note"] == "instead of compiled: skipped: needs ~9 s, 5 s of the budget left"


def test_a_crash_is_recorded_with_its_traceback_and_the_next_stage_runs(tmp_path):
    def crash(ctx):
        raise ValueError("bad shape in the stage's own code")
    clock = FakeClock()
    entries = by_name(lease(tmp_path, [stage("a", 1, crash), stage("b", 1, advance(clock, 1))], clock=clock).run())
    assert entries["a"]["status"] == "crashed"
    assert entries["a"]["result"] == "ValueError: bad shape in the stage's own code"
    assert entries["a"]["error_tail"][-1] == "ValueError: bad shape in the stage's own code"
    assert any("in crash" in line for line in entries["a"]["error_tail"])  # the traceback, not just the message
    assert entries["b"]["status"] == "ok"
    assert "ValueError" in (tmp_path / "out" / "first_light.log").read_text()


def test_a_failing_command_is_recorded_with_its_output_tail(tmp_path):
    def failing(ctx):
        ctx.sh([sys.executable, "-c", "import sys; print('line 1'); print('the reason'); sys.exit(3)"])
        return Outcome(True, "not reached")
    entries = lease(tmp_path, [stage("a", 1, failing), stage("b", 1, advance(FakeClock(), 0))]).run()
    assert entries[0]["status"] == "failed" and entries[0]["result"].startswith("exit 3: python -c ")
    assert entries[0]["error_tail"] == ["line 1", "the reason"]
    assert entries[0]["commands"][0]["rc"] == 3 and entries[1]["status"] == "ok"


def test_results_are_written_after_each_stage(tmp_path):
    seen = {}

    def look(ctx):
        report = json.loads((tmp_path / "out" / "first_light.json").read_text())
        seen["statuses"] = [e["status"] for e in report["stages"]]
        seen["md"] = (tmp_path / "out" / "first_light.md").read_text()
        return Outcome(None, "looked")
    clock = FakeClock()
    lease(tmp_path, [stage("a", 1, advance(clock, 1, Outcome(True, "first result"))), stage("b", 1, look),
                     stage("c", 1, advance(clock, 1))], clock=clock).run()
    assert seen["statuses"] == ["ok", "pending", "pending"]  # a's result is on disk before b starts
    assert "| 1 | a | ok | first result |" in seen["md"]
    report = json.loads((tmp_path / "out" / "first_light.json").read_text())
    assert [e["status"] for e in report["stages"]] == ["ok", "measured", "ok"]
    assert report["meta"]["commit"] == "abc" and report["meta"]["budget_s"] == 10


def test_a_stopped_run_says_where_it_stopped(tmp_path):
    def stop(ctx):
        raise KeyboardInterrupt  # as SIGTERM does, through the command's SystemExit
    clock = FakeClock()
    with pytest.raises(KeyboardInterrupt):
        lease(tmp_path, [stage("a", 1, advance(clock, 1)), stage("b", 1, stop), stage("c", 1, advance(clock, 1))],
              clock=clock).run()
    report = json.loads((tmp_path / "out" / "first_light.json").read_text())
    assert [e["status"] for e in report["stages"]] == ["ok", "interrupted", "pending"]


@pytest.mark.slow
def test_a_command_past_the_deadline_is_killed_with_its_children(tmp_path):
    """Real processes, a 10-second limit (room for two interpreter starts on a loaded machine): the
    stage times out and the grandchild it spawned is gone."""
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")

    def hang(ctx):
        ctx.sh([sys.executable, "-c", script])
        return Outcome(True, "not reached")
    entries = Lease("first_light", [stage("hang", 1, hang, limit=10)], 60, tmp_path / "out", tmp_path / "work",
                    dict(command="test"), echo=lambda line: None).run()
    assert entries[0]["status"] == "timeout" and entries[0]["commands"][0]["rc"] is None
    grandchild = int(entries[0]["error_tail"][0])
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "zombie" in status.read_text()


# ---- reading the results -----------------------------------------------------------------------------
def headline_rows(verify=1.05, draft=0.2, speedup=1.9, pred=2.0, bw=0.9):
    rows = []
    for b in (1, 32, 48):
        rows.append(dict(batch=b, gamma=None, T_T_ms=20.0, bandwidth_frac=bw, capture_s=1.0))
        rows.append(dict(batch=b, gamma=3, verify_ratio=verify, draft_ratio=draft, speedup=speedup,
                         speedup_pred_measured_T=pred, speedup_pred_cost_model=2.1, capture_s=2.0))
    return dict(rows=rows, skipped=[])


def test_headline_targets_are_judged_on_bench_rows():
    ok = fl.judge_headline(headline_rows(), judged_batch=32, largest=48)
    assert ok.ok is True and ok.result.startswith("all targets met; B1: T_T 20.0 ms")
    assert "compile+capture 3.0 s" in ok.result
    missed = fl.judge_headline(headline_rows(verify=1.2, speedup=1.5, pred=2.0), judged_batch=32, largest=48)
    assert missed.ok is False and missed.result.startswith("missed: T_V/T_T, speedup, vs prediction")
    dry = fl.judge_headline(headline_rows(verify=9.0), judged_batch=32, largest=48, judge=False)
    assert dry.ok is None and dry.result.startswith("dry run: targets not judged")


def test_generate_summary_is_parsed():
    text = """--- [0] 1 2 3 ...
== plain decoding
   prefill: 4994 tokens in 1.013 s (+ 12.5 s compiling and capturing CUDA graphs)
   decode:  128 tokens in 0.450 s = 284.2 tokens/s (batch 1, 127 rounds)
== draft: self, streaming, budget 512 (window 496), gamma 3
   prefill: 4994 tokens in 1.000 s
   decode:  128 tokens in 0.506 s = 253.1 tokens/s (batch 1, 32 rounds)
   speculation: gamma 3, acceptance rate 0.950, mean tokens per round 4.00, 96 draft tokens
== speedup over plain decoding: 0.89x
   greedy outputs identical: no, 1 of 8 sequences diverge (all at near-ties)
     sequence 3: first divergence at new token 7 (plain 5, speculative 9); target top-2 logit gap 1.0e-03 < 1e-02
   memory bandwidth (plain decoding): 10.3 GB/s achieved per rank = 20% of measured copy bandwidth (53 GB/s)
"""
    parsed = fl.parse_generate(text)
    plain, spec = parsed["runs"]
    assert plain == dict(run="plain decoding", prefill_s=1.013, capture_s=12.5, decode_s=0.45, tokens_per_s=284.2,
                         acceptance=None)
    assert spec["capture_s"] == 0.0 and spec["acceptance"] == 0.95 and spec["run"].startswith("draft: self")
    assert parsed["speedup"] == 0.89 and parsed["lossless"].startswith("no, 1 of 8 sequences diverge")
    assert parsed["divergences"] == ["sequence 3: first divergence at new token 7 (plain 5, speculative 9); "
                                     "target top-2 logit gap 1.0e-03 < 1e-02"]
    assert (parsed["bandwidth_GBps"], parsed["bandwidth_frac"], parsed["copy_GBps"]) == (10.3, 0.2, 53.0)


def test_largest_batch_leaves_room_for_prefill():
    """An H200 (143771 MiB) at a 16K prompt: KV of 48 sequences + 16 GB of weights fit in 85%, 56 do not."""
    assert fl.largest_batch(143771 << 20, ModelArgs.from_preset("llama-3.1-8b"), 16384 + 128) == 48


def test_plan_fits_the_first_stages_of_the_budget():
    """On the device the stages before the optional ones fit the default budget."""
    stages = fl.first_light_stages(fl.DEVICE)
    assert [s.name for s in stages] == ["env", "gpu-tests", "cuda-cpu-tests", "lossless-bundled", "lossless-8b",
                                        "headline", "kernels", "roofline-compiled"]
    assert sum(s.estimate_s for s in stages[:6]) <= 500 and stages[-1].fallback.name == "roofline-eager"
    assert all(s.estimate_s <= s.limit_s for s in stages)


# ---- the command ----------------------------------------------------------------------------------------
def test_user_errors_are_one_line():
    runner = CliRunner()
    for args, message in ((["--list", "--only", "nope"], "error: --only: unknown stage(s) nope; the stages are env"),
                          (["--dry-run"], "error: --out-dir is required (or --list to see the plan)")):
        result = runner.invoke(fl.main, args)
        assert result.exit_code == 1 and result.output.startswith(message), result.output
        assert "Traceback" not in result.output


def test_recorded_command_hides_the_output_directory():
    assert (fl.recorded_command(["--out-dir", "/tmp/x", "--budget-s", "500"])
            == "python -m benchmarks.gpu_first_light --out-dir $OUT --budget-s 500")
    assert fl.recorded_command(["--out-dir=/tmp/x"]) == "python -m benchmarks.gpu_first_light --out-dir=$OUT"


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """The CPU rehearsal of the device command, as CI runs it: every stage runs its real commands at
    tiny shapes and the report parses them (so a changed CLI or output format fails here, not on the GPU)."""
    out = tmp_path / "out"
    env = dict(os.environ, GPT_FAST_MAGICDEC_DEVICE="cpu")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_first_light", "--out-dir", str(out), "--dry-run",
                           "--work-dir", str(tmp_path / "work"), "--commit", "0123abc"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "first_light.json").read_text())
    stages = by_name(report["stages"])
    assert list(stages) == ["env", "gpu-tests", "cuda-cpu-tests", "lossless-bundled", "lossless-8b", "headline",
                            "kernels", "roofline-eager"]
    assert all(e["status"] in ("ok", "measured") for e in stages.values()), {n: e["result"] for n, e in stages.items()}
    assert report["meta"]["commit"] == "0123abc" and report["meta"]["device_name"].startswith("cpu")
    assert report["meta"]["command"].startswith("python -m benchmarks.gpu_first_light --out-dir $OUT --dry-run")
    bundled = stages["lossless-bundled"]["data"]
    assert set(bundled) == {"self streaming", "self snapkv", "bundled draft"}
    assert all(v["lossless"].startswith("yes") and len(v["runs"]) == 2 and v["runs"][1]["tokens_per_s"]
               for v in bundled.values())
    assert {r["batch"] for r in stages["headline"]["data"]["rows"]} == {1, 2}
    assert all("capture_s" in r for r in stages["headline"]["data"]["rows"])
    assert stages["roofline-eager"]["data"]["bandwidth_frac"] is not None
    assert stages["gpu-tests"]["data"]["tests"] > 0 and stages["cuda-cpu-tests"]["data"]["files"]
    for e in stages.values():  # every command is recorded without machine paths
        assert all("$WORK" in c["command"] or str(tmp_path) not in c["command"] for c in e["commands"])
        assert all(not c["command"].startswith(sys.executable) for c in e["commands"])
    files = sorted(p.name for p in out.iterdir())
    assert {"first_light.json", "first_light.md", "first_light.log"} <= set(files) and len(files) <= 8
    assert all(RETURNED_NAME.match(f) for f in files)
    assert proc.stdout.rstrip().splitlines()[-8].startswith("env ")  # the short table comes last


def test_figures_stage_set_plans_and_judges():
    from benchmarks import gpu_figures

    names = [s.name for s in gpu_figures.figures_stages(fl.DEVICE)]
    assert names == ["env", "speedup-16k", "speedup-32k", "speedup-4k", "speedup-plot", "kernels-sweep",
                     "where-loses", "drafts", "cost-model"]
    result = CliRunner().invoke(fl.main, ["--list", "--stages", "figures", "--dry-run"])
    assert result.exit_code == 0 and result.output.splitlines()[2].startswith("speedup-256 ")
    rows = [dict(batch=b, gamma=g, speedup=x, speedup_pred_measured_T=p, speedup_pred_cost_model=2.0)
            for b, g, x, p in ((8, 4, 1.2, 1.3), (48, 4, 1.9, 2.0), (48, 3, 1.7, 1.8))]
    met = gpu_figures.judge_speedup(rows, [], judge=True)
    assert met.ok is True and met.result.startswith("targets met; B8: 1.2x (gamma 4")
    assert "B48: 1.9x (gamma 4" in met.result  # the best gamma at each batch
    rows[1]["speedup_pred_measured_T"] = 2.4  # 1.9x against a predicted 2.4x: more than 10% off
    assert gpu_figures.judge_speedup(rows, [], judge=True).ok is False
