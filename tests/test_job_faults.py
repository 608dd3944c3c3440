"""What clusters do to long jobs, done to a real gfm-generate batch job on the bundled tiny model.

Every case must end with one clear line (or run correctly), keep every finished row, and after
--resume leave the file an uninterrupted run writes, byte for byte: the reference `whole` below.
Signals are delivered at exact phases by tests/fault_driver.py (the real CLI, one patched call
that signals its own process); a resume runs in this process. torchrun cases use gloo replicas.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpt_fast_magicdec import output as output_module
from gpt_fast_magicdec.cli import generate

from processes import ROOT, default_signals, environment, launch
from test_job_cli import error_lines, rows, wait_for_rows, write_prompts

N = 6
JOB = ["--bsz", 2, "--max-new-tokens", 12, "--ignore-eos", "--no-progress", "--draft-budget", 32, "--sink", 4]
LAUNCH_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(scope="module")
def whole(cache, tmp_path_factory) -> tuple[Path, bytes]:
    """The prompt file and the output of the same job run uninterrupted."""
    root = tmp_path_factory.mktemp("whole")
    prompts = write_prompts(root / "p.jsonl", n=N)
    result = invoke("--prompt-file", prompts, "--out", root / "o.jsonl", *JOB)
    assert result.exit_code == 0, result.output
    return prompts, (root / "o.jsonl").read_bytes()


def invoke(*args):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    return result


def resume(prompts: Path, out: Path, *extra):
    return invoke("--prompt-file", prompts, "--out", out, *JOB, *extra, "--resume")


def leftovers(out: Path) -> list[str]:
    """Anything beside `out` that a finished job must not leave: parts, rewrites, its lock."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and p.name.startswith((out.name, "."))
                  and out.name in p.name)


def assert_rows_are_whole_rows(out: Path, expected: bytes) -> int:
    """Every row in `out` (and its parts) is the uninterrupted run's row of its index, none twice -> count."""
    reference = {json.loads(line)["index"]: line for line in expected.decode().splitlines()}
    seen = []
    for path in [out, *output_module.part_paths(out)]:
        for line in (path.read_text().splitlines() if path.exists() else []):
            seen.append(json.loads(line)["index"])
            assert line == reference[seen[-1]], f"row {seen[-1]} in {path.name} differs from the uninterrupted run's"
    assert len(seen) == len(set(seen)), f"a row is written twice: {sorted(seen)}"
    return len(seen)


def faulted(phase: str, sig: str, rank: int, args: list, nproc: int = 1) -> subprocess.CompletedProcess:
    driver = [ROOT / "tests" / "fault_driver.py", phase, sig, rank, "--", *args]
    if nproc == 1:
        return launch([sys.executable, *driver], LAUNCH_TIMEOUT_S)
    return torchrun(nproc, *driver)


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, *args],
                  LAUNCH_TIMEOUT_S)


def said(text: str) -> list[str]:
    """The lines our ranks said (torchrun's own report of a failed child left out)."""
    return [line for line in text.splitlines() if line.startswith(("error:", "interrupted:"))]


def no_rank_traceback(run: subprocess.CompletedProcess) -> None:
    crashed = [line for line in run.stderr.splitlines() if "gpt_fast_magicdec" in line and 'File "' in line]
    assert not crashed, run.stderr


EXIT = {"KILL": -signal.SIGKILL, "TERM": 143, "INT": 130}
FIRST_WORDS = {"TERM": "error: stopped by SIGTERM", "INT": "interrupted: "}


# ---- signals at every phase of a single-process job ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["KILL", "TERM", "INT"])
@pytest.mark.parametrize("phase", ["first-row", "mid-job", "rewrite"])
def test_a_signal_at_any_phase_loses_nothing_and_resumes_to_the_whole_file(whole, tmp_path, phase, sig):
    prompts, expected = whole
    out = tmp_path / "o.jsonl"
    run = faulted(phase, sig, 0, ["--prompt-file", prompts, "--out", out, *JOB])
    assert run.returncode == EXIT[sig], run.stderr
    kept = assert_rows_are_whole_rows(out, expected)
    assert kept == {"first-row": 0, "mid-job": 3, "rewrite": N}[phase]
    if sig != "KILL":  # one line, and the number it says is safe is what the file holds
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(FIRST_WORDS[sig]) and "--resume" in lines[0], lines
        assert f" {kept} of {N} prompts are safely in {out}" in lines[0]
        assert not list(tmp_path.glob(".o.jsonl.*.tmp"))  # an interrupted rewrite cleans up after itself
    elif phase == "rewrite":
        assert list(tmp_path.glob(".o.jsonl.*.tmp"))  # the complete rewrite a kill left beside the output
    resumed = resume(prompts, out)
    assert resumed.exit_code == 0, resumed.output
    assert out.read_bytes() == expected and leftovers(out) == []


# ---- torchrun replicas -----------------------------------------------------------------------------------
REPLICAS = [*JOB, "--tp", 1]
PEER_WENT = "error: another rank of this job stopped"
STOPPED = "error: stopped by SIGTERM"


@pytest.mark.slow
@pytest.mark.parametrize("phase, sig, rank, resume_with", [
    ("mid-job", "KILL", 1, 2),     # a rank killed while it decodes; the same replica count resumes
    ("gather", "KILL", 1, 1),      # a rank killed while rank 0 waits for its rows; one process resumes
    ("gather", "TERM", 0, 3),      # rank 0 stopped as the ranks exchange; three replicas resume
    ("gather", "INT", 1, 2),       # Ctrl-C reaching one rank as they exchange
], ids=["kill-rank1-mid-job", "kill-rank1-in-gather", "sigterm-rank0-in-gather", "sigint-rank1-in-gather"])
def test_a_replica_stopped_at_any_phase_fails_clearly_and_any_layout_resumes(whole, tmp_path, phase, sig, rank,
                                                                             resume_with):
    prompts, expected = whole
    out = tmp_path / "o.jsonl"
    run = faulted(phase, sig, rank, ["--prompt-file", prompts, "--out", out, *REPLICAS], nproc=2)
    assert run.returncode != 0
    no_rank_traceback(run)
    # The signalled rank says it was stopped; a survivor, that a peer went (or, if torchrun's stop
    # reached it outside a collective, that it was stopped): one line per rank that could speak.
    lines = said(run.stderr)
    assert 1 <= len(lines) <= 2, run.stderr
    if sig == "INT":  # the interrupted rank says so (not an error: the user asked for it)
        assert any(line.startswith("interrupted: ") for line in lines) and len(lines) == 2, run.stderr
    else:
        assert all(line.startswith((PEER_WENT, STOPPED)) for line in lines), run.stderr
        assert len(lines) == (1 if sig == "KILL" else 2) and (sig == "KILL" or any(
            line.startswith(STOPPED) for line in lines)), run.stderr
    assert all("--resume" in line for line in lines)
    assert assert_rows_are_whole_rows(out, expected) >= 3
    assert output_module.part_paths(out), "the replicas' rows stay in their parts until the final rewrite"
    if resume_with == 1:
        resumed = resume(prompts, out)
        assert resumed.exit_code == 0, resumed.output
    else:
        again = torchrun(resume_with, "generate.py", "--prompt-file", prompts, "--out", out, *REPLICAS, "--resume")
        assert again.returncode == 0, again.stderr
    assert out.read_bytes() == expected and leftovers(out) == []


@pytest.mark.slow
def test_a_refused_resume_under_tensor_parallelism_fails_every_rank_without_a_hang(whole, tmp_path):
    """Only a replica's first rank reads --out; what it finds wrong must reach the ranks waiting for
    its indices, or they wait forever."""
    prompts, expected = whole
    out = tmp_path / "o.jsonl"
    out.write_bytes(expected)
    run = torchrun(2, "generate.py", "--prompt-file", prompts, "--out", out, *JOB[:2], "--max-new-tokens", 13,
                   *JOB[4:], "--tp", 2, "--resume")
    assert run.returncode == 1
    no_rank_traceback(run)
    lines = error_lines_of(run)
    assert len(lines) == 1 and "--max-new-tokens 12 there, 13 now" in lines[0], run.stdout + run.stderr
    assert out.read_bytes() == expected


def error_lines_of(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]


# ---- --resume against what is there ------------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [
    (["--max-new-tokens", 13], "--max-new-tokens 12 there, 13 now"),
    (["--draft", "lookup"], "--draft self there, lookup now"),
    (["--gamma", 2], "--gamma 3 there, 2 now"),
    (["--temperature", 0.8], "--temperature 0.0 there, 0.8 now"),
])
def test_resume_with_other_options_is_refused_naming_them(whole, tmp_path, change, named):
    prompts, expected = whole
    out = tmp_path / "o.jsonl"
    out.write_bytes(expected)
    result = resume(prompts, out, *change)
    assert result.exit_code == 1 and len(error_lines(result)) == 1 and named in error_lines(result)[0], result.output
    assert out.read_bytes() == expected


def test_the_seed_is_part_of_a_sampled_run_only(whole, tmp_path):
    prompts, _ = whole
    out = tmp_path / "sampled.jsonl"
    sampled = ["--temperature", 0.9, "--seed", 1]
    assert invoke("--prompt-file", prompts, "--out", out, *JOB, *sampled).exit_code == 0
    refused = resume(prompts, out, "--temperature", 0.9, "--seed", 2)
    assert refused.exit_code == 1 and "--seed 1 there, 2 now" in error_lines(refused)[0]
    greedy = tmp_path / "greedy.jsonl"
    greedy.write_bytes(whole[1])
    assert resume(prompts, greedy, "--seed", 5).exit_code == 0  # greedy text does not depend on it
    assert greedy.read_bytes() == whole[1]


def test_an_edited_prompt_file_is_refused_unless_prompts_were_only_added(whole, tmp_path):
    prompts, expected = whole
    texts = [json.loads(line)["text"] for line in prompts.read_text().splitlines()]
    out = tmp_path / "o.jsonl"
    edits = {"changed": [texts[0] + " and more", *texts[1:]], "removed": texts[:-1],
             "reordered": [texts[1], texts[0], *texts[2:]]}
    for name, edited in edits.items():
        out.write_bytes(expected)
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in edited))
        result = resume(path, out)
        assert result.exit_code == 1 and len(error_lines(result)) == 1, (name, result.output)
        assert ("only 5 prompts now" if name == "removed" else "another prompt text") in error_lines(result)[0]
        assert out.read_bytes() == expected
    added = tmp_path / "added.jsonl"
    added.write_text(prompts.read_text() + json.dumps({"text": "The rain fell on the roofs"}) + "\n")
    result = resume(added, out)
    assert result.exit_code == 0 and f"{N} of {N + 1} prompts are already complete" in result.output
    assert out.read_bytes().startswith(expected) and rows(out)[N]["prompt"] == "The rain fell on the roofs"


def test_a_cut_short_or_empty_output_resumes_a_garbage_line_is_refused(whole, tmp_path):
    prompts, expected = whole
    out = tmp_path / "o.jsonl"
    lines = expected.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:40])  # a crash in the middle of a write
    assert resume(prompts, out).exit_code == 0 and out.read_bytes() == expected
    out.write_bytes(b"")
    assert resume(prompts, out).exit_code == 0 and out.read_bytes() == expected
    damaged = b"".join(lines[:2]) + b"{not json\n" + b"".join(lines[2:4])
    out.write_bytes(damaged)
    result = resume(prompts, out)
    assert result.exit_code == 1 and f"{out} line 3 is not a batch-run row" in error_lines(result)[0]
    assert out.read_bytes() == damaged


def test_resume_refuses_another_jobs_output_and_a_directory_and_starts_a_missing_one(whole, tmp_path):
    prompts, expected = whole
    other = tmp_path / "other.jsonl"
    assert invoke("--prompt", "Once upon a time", "--out", other, "--max-new-tokens", 3, "--no-progress").exit_code == 0
    before = other.read_bytes()
    result = resume(prompts, other)
    assert result.exit_code == 1 and "was written with other options" in error_lines(result)[0]
    assert other.read_bytes() == before
    (tmp_path / "adir").mkdir()
    result = resume(prompts, tmp_path / "adir")
    assert result.exit_code == 2 and "Invalid value for '--out'" in result.output and "is a directory" in result.output
    missing = tmp_path / "new.jsonl"
    result = resume(prompts, missing)
    assert result.exit_code == 0 and missing.read_bytes() == expected


# ---- two jobs, and a prompt file that changes, while a job runs ----------------------------------------------
SLOW_JOB = [*JOB[:2], "--max-new-tokens", 40, *JOB[4:]]


def spawn_job(prompts: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "generate.py", "--prompt-file", str(prompts), "--out", str(out),
                             *map(str, SLOW_JOB)], cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)


@pytest.mark.slow
def test_a_second_job_on_the_same_out_is_refused_and_a_changing_prompt_file_is_not_read_twice(whole, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", n=N)
    reference = tmp_path / "reference.jsonl"
    assert invoke("--prompt-file", prompts, "--out", reference, *SLOW_JOB).exit_code == 0
    out = tmp_path / "o.jsonl"
    first = spawn_job(prompts, out)
    wait_for_rows(out, 1, first)
    # Refused at once: without --resume because rows are there, with it by the lock, naming the holder.
    for extra, says in (([], "already exists: pass --resume"),
                        (["--resume"], f"another generation job is writing it (pid {first.pid})")):
        second = invoke("--prompt-file", prompts, "--out", out, *SLOW_JOB, *extra)
        assert second.exit_code == 1 and len(error_lines(second)) == 1 and says in error_lines(second)[0], second.output
    original = prompts.read_text()
    prompts.write_text(original + json.dumps({"text": "A prompt added while the job ran"}) + "\n")
    assert first.wait(timeout=LAUNCH_TIMEOUT_S) == 0, first.stderr.read()
    assert out.read_bytes() == reference.read_bytes()  # the job ran the prompts it read when it started
    result = invoke("--prompt-file", prompts, "--out", out, *SLOW_JOB, "--resume")
    assert result.exit_code == 0 and [r["index"] for r in rows(out)] == list(range(N + 1))  # the addition, resumed
    changed = [json.loads(line) for line in original.splitlines()]
    changed[0]["text"] += " changed"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in changed))
    result = invoke("--prompt-file", prompts, "--out", out, *SLOW_JOB, "--resume")
    assert result.exit_code == 1 and "another prompt text" in error_lines(result)[0]


# ---- the disk and the directory failing mid-job -------------------------------------------------------------
def test_a_full_disk_mid_job_keeps_the_rows_so_far_and_resumes(whole, tmp_path, monkeypatch):
    prompts, expected = whole
    out = tmp_path / "o.jsonl"
    write, calls = output_module.JobOutput.write, []

    def fills_up(self, row):
        calls.append(row["index"])
        if len(calls) == 3:
            self._file.write = lambda line: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        write(self, row)

    with monkeypatch.context() as patch:
        patch.setattr(output_module.JobOutput, "write", fills_up)
        result = invoke("--prompt-file", prompts, "--out", out, *JOB)
    assert result.exit_code == 1 and len(error_lines(result)) == 1 and "No space left" in error_lines(result)[0]
    assert assert_rows_are_whole_rows(out, expected) == 2
    assert resume(prompts, out).exit_code == 0 and out.read_bytes() == expected


@pytest.mark.parametrize("failure", [PermissionError(13, "Permission denied"), OSError(28, "No space left on device")],
                         ids=["read-only directory", "full disk"])
def test_a_final_rewrite_that_cannot_be_written_says_so_and_resumes(whole, tmp_path, monkeypatch, failure):
    """The directory made read-only (or the disk filled) after the rows were written: appending to the
    open file went on, the in-order rewrite beside it cannot be made. (Simulated at the rewrite's
    temporary file: chmod does not stop root, which CI runs as.)"""
    prompts, expected = whole
    out = tmp_path / "o.jsonl"
    mkstemp = output_module.tempfile.mkstemp

    def cannot(*args, **kwargs):
        raise failure

    with monkeypatch.context() as patch:
        patch.setattr(output_module.tempfile, "mkstemp", cannot)
        result = invoke("--prompt-file", prompts, "--out", out, *JOB)
    assert result.exit_code == 1 and len(error_lines(result)) == 1, result.output
    assert f"could not rewrite {out} in input order ({failure.strerror})" in error_lines(result)[0]
    assert "--resume" in error_lines(result)[0] and assert_rows_are_whole_rows(out, expected) == N
    assert output_module.tempfile.mkstemp is mkstemp
    assert resume(prompts, out).exit_code == 0 and out.read_bytes() == expected


def test_the_final_rewrite_keeps_the_outputs_permissions(whole, tmp_path):
    prompts, expected = whole
    out = tmp_path / "o.jsonl"
    out.touch()
    os.chmod(out, 0o640)
    assert resume(prompts, out).exit_code == 0 and out.read_bytes() == expected
    assert oct(out.stat().st_mode & 0o777) == oct(0o640)  # not mkstemp's 0600


# ---- edge jobs ------------------------------------------------------------------------------------------------
def jsonl(path: Path, texts: list) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_whitespace_and_duplicate_prompts_each_get_their_row_an_empty_one_is_named(cache, tmp_path):
    prompts = jsonl(tmp_path / "p.jsonl", ["   ", "\n\t", "The rain fell", "The rain fell"])
    out = tmp_path / "o.jsonl"
    result = invoke("--prompt-file", prompts, "--out", out, "--bsz", 3, "--max-new-tokens", 5, "--no-progress")
    assert result.exit_code == 0, result.output
    got = rows(out)
    assert [r["prompt"] for r in got] == ["   ", "\n\t", "The rain fell", "The rain fell"]
    assert got[2]["completion_ids"] == got[3]["completion_ids"] and got[2]["prompt_sha256"] == got[3]["prompt_sha256"]
    empty = jsonl(tmp_path / "e.jsonl", ["fine", ""])
    result = invoke("--prompt-file", empty, "--out", tmp_path / "e.out", "--no-progress")
    assert result.exit_code == 1 and error_lines(result) == [f"error: {empty} line 2: the object has an empty 'text'"]
    assert not (tmp_path / "e.out").exists()


@pytest.mark.parametrize("n_prompts, bsz", [(1, 8), (3, 5)])
def test_more_slots_than_prompts_write_each_prompt_once(cache, tmp_path, n_prompts, bsz):
    prompts = jsonl(tmp_path / "p.jsonl", ["It was a dark night", "The rain", "She said nothing"][:n_prompts])
    out = tmp_path / "o.jsonl"
    result = invoke("--prompt-file", prompts, "--out", out, "--bsz", bsz, "--max-new-tokens", 6, "--no-progress")
    assert result.exit_code == 0, result.output
    assert [r["index"] for r in rows(out)] == list(range(n_prompts)) and all(r["new_tokens"] == 6 for r in rows(out))


def test_one_new_token_comes_from_the_prefill(cache, tmp_path):
    prompts = jsonl(tmp_path / "p.jsonl", ["It was a dark night", "The rain"])
    out = tmp_path / "o.jsonl"
    result = invoke("--prompt-file", prompts, "--out", out, "--max-new-tokens", 1, "--no-progress")
    assert result.exit_code == 0, result.output
    assert [r["new_tokens"] for r in rows(out)] == [1, 1]
    assert "decode:  none (batch 1): every completion's 2 tokens came from the prefill" in result.output


def test_a_prompt_longer_than_the_context_is_named_before_any_work(cache, tmp_path, monkeypatch):
    long_text = (ROOT / "tests" / "data" / "long_passage.txt").read_text() * 30
    prompts = jsonl(tmp_path / "p.jsonl", ["a short one", long_text])
    out = tmp_path / "o.jsonl"
    started = []
    monkeypatch.setattr(generate.BatchRun, "execute", lambda *a, **k: started.append(1))
    result = invoke("--prompt-file", prompts, "--out", out, "--max-new-tokens", 4, "--no-progress")
    assert result.exit_code == 1 and len(error_lines(result)) == 1, result.output
    line = error_lines(result)[0]
    assert line.startswith("error: prompt 1 has ") and "with 4 new tokens it does not fit the model's context" in line
    assert not started and not out.exists() and leftovers(out) == []
