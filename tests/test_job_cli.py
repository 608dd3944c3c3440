"""gfm-generate as a batch job: --out receives each completion as it finishes and ends in input
order, --resume continues a killed or interrupted job exactly, nothing the user has is replaced,
and Ctrl-C says what is safe. On the bundled tiny model."""
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpt_fast_magicdec.cli import generate
from gpt_fast_magicdec import output as output_module

from processes import ROOT, default_signals, environment

PASSAGE = (ROOT / "tests" / "data" / "long_passage.txt").read_text()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_prompts(path: Path, n: int = 8, step: int = 150) -> Path:
    path.write_text("".join(json.dumps({"text": PASSAGE[i * step:i * step + 300 + 17 * i]}) + "\n" for i in range(n)))
    return path


def invoke(*args):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    return result


JOB = ["--bsz", 3, "--max-new-tokens", 12, "--no-progress", "--draft-budget", 32, "--sink", 4]


def rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def error_lines(result) -> list:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_out_streams_rows_and_ends_in_input_order(cache, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl")
    seen = []  # the file's row count each time a completion is written: it grows one by one
    write = output_module.JobOutput.write

    def watching(self, row):
        write(self, row)
        seen.append(len((tmp_path / "o.jsonl").read_text().splitlines()))

    monkeypatch.setattr(output_module.JobOutput, "write", watching)
    result = invoke("--prompt-file", prompts, "--out", tmp_path / "o.jsonl", *JOB)
    assert result.exit_code == 0, result.output
    assert seen == list(range(1, 9))
    out = rows(tmp_path / "o.jsonl")
    assert [r["index"] for r in out] == list(range(8))
    texts = [json.loads(line)["text"] for line in prompts.read_text().splitlines()]
    assert [r["prompt"] for r in out] == texts
    assert len({r["run"] for r in out}) == 1 and all(len(r["prompt_sha256"]) == 64 for r in out)
    assert "refills" in result.output and "latency per prompt (s): p50" in result.output
    assert "--- [" not in result.output  # with --out the completions go to the file, not the screen


def test_fewer_prompts_than_slots_write_one_row_each(cache, tmp_path):
    result = invoke("--prompt", "It was a dark night", "--prompt", "The rain", "--bsz", 5, "--max-new-tokens", 6,
                    "--no-progress", "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 0, result.output
    assert [r["index"] for r in rows(tmp_path / "o.jsonl")] == [0, 1]
    assert "batch 5" in result.output  # the copies still filled the batch


def test_an_existing_out_is_never_replaced(cache, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("my earlier results\n")
    result = invoke("--prompt", "hi", "--max-new-tokens", 3, "--no-progress", "--out", out)
    assert result.exit_code == 1 and len(error_lines(result)) == 1 and "--resume" in error_lines(result)[0]
    assert out.read_text() == "my earlier results\n"
    resumed = invoke("--prompt", "hi", "--max-new-tokens", 3, "--no-progress", "--out", out, "--resume")
    assert resumed.exit_code == 1 and "not written by a generation job" in error_lines(resumed)[0]
    assert out.read_text() == "my earlier results\n"


def test_out_naming_the_prompt_file_is_refused(cache, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", n=2)
    before = prompts.read_text()
    for target in (prompts, tmp_path / "link.jsonl"):
        if target.name == "link.jsonl":
            target.symlink_to(prompts)
        result = invoke("--prompt-file", prompts, "--out", target, "--no-progress", "--max-new-tokens", 2)
        assert result.exit_code == 1 and "is the --prompt-file" in error_lines(result)[0]
    assert prompts.read_text() == before


def test_special_files_are_written_directly_never_replaced(cache, tmp_path):
    link = tmp_path / "null-link"
    link.symlink_to("/dev/null")
    for target in ("/dev/null", link):
        result = invoke("--prompt", "hi", "--max-new-tokens", 3, "--no-progress", "--out", target)
        assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and link.is_symlink()
    assert not list(Path("/dev").glob(".null.*"))  # no temporary file beside the device
    resumed = invoke("--prompt", "hi", "--no-progress", "--out", "/dev/null", "--resume")
    assert resumed.exit_code == 1 and "regular file" in error_lines(resumed)[0]


def test_a_fifo_receives_the_rows_as_they_finish(cache, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.extend(open(fifo).read().splitlines()), daemon=True)
    reader.start()
    result = invoke("--prompt", "hi", "--prompt", "there", "--max-new-tokens", 3, "--no-progress", "--out", fifo)
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(line)["index"] for line in received) == [0, 1] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_resume_refuses_other_options_and_other_prompts(cache, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", n=3)
    out = tmp_path / "o.jsonl"
    assert invoke("--prompt-file", prompts, "--out", out, *JOB).exit_code == 0
    done = out.read_text()
    finished = invoke("--prompt-file", prompts, "--out", out, *JOB, "--resume")
    assert finished.exit_code == 0 and "3 of 3 prompts are already complete" in finished.output
    assert out.read_text() == done
    other = invoke("--prompt-file", prompts, "--out", out, *JOB[:2], "--max-new-tokens", 13, *JOB[4:], "--resume")
    assert other.exit_code == 1 and "other options" in error_lines(other)[0]
    write_prompts(prompts, n=3, step=151)  # the prompts changed under the file
    edited = invoke("--prompt-file", prompts, "--out", out, *JOB, "--resume")
    assert edited.exit_code == 1 and "another prompt text" in error_lines(edited)[0]
    assert out.read_text() == done
    slots = invoke("--prompt-file", write_prompts(tmp_path / "p.jsonl", n=3), "--out", out, *JOB[2:], "--bsz", 1,
                   "--resume")
    assert slots.exit_code == 0, slots.output  # --bsz decides speed, not text: a resume may change it


def test_a_write_that_fails_mid_job_keeps_what_was_written(cache, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl", n=6)
    out = tmp_path / "o.jsonl"
    writes = []
    write = output_module.JobOutput.write

    def full_disk(self, row):
        if len(writes) == 2:
            self._file.write = lambda line: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        writes.append(row["index"])
        write(self, row)

    monkeypatch.setattr(output_module.JobOutput, "write", full_disk)
    result = invoke("--prompt-file", prompts, "--out", out, *JOB)
    assert result.exit_code == 1 and len(error_lines(result)) == 1, result.output
    assert "No space left on device" in error_lines(result)[0] and "--resume" in error_lines(result)[0]
    assert [r["index"] for r in rows(out)] == writes[:2]  # the two completions written before are intact


def cli(*args) -> list:
    return [sys.executable, "generate.py", *map(str, args)]


def spawn(args, cache_dir) -> subprocess.Popen:
    return subprocess.Popen(cli(*args), cwd=ROOT, env=environment(XDG_CACHE_HOME=str(cache_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)


def wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"{path} never reached {n} rows (exit {proc.poll()})")


LONG_JOB = ["--bsz", 2, "--max-new-tokens", 40, "--ignore-eos", "--no-progress", "--draft-budget", 32, "--sink", 4]


@pytest.mark.slow
def test_a_killed_job_resumes_to_the_uninterrupted_file(cache, tmp_path):
    """kill -9 in the middle of a real job, then the same command with --resume: the file equals
    the one an uninterrupted run writes."""
    prompts = write_prompts(tmp_path / "p.jsonl", n=10)
    whole, killed = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    run = spawn(["--prompt-file", prompts, "--out", whole, *LONG_JOB], cache)
    assert run.wait(timeout=300) == 0, run.stderr.read()
    proc = spawn(["--prompt-file", prompts, "--out", killed, *LONG_JOB], cache)
    wait_for_rows(killed, 3, proc)
    proc.kill()
    proc.wait()
    written = len(killed.read_text().splitlines())
    assert 3 <= written < 10
    resumed = spawn(["--prompt-file", prompts, "--out", killed, *LONG_JOB, "--resume"], cache)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resuming: {written} of 10 prompts are already complete" in stdout
    assert killed.read_text() == whole.read_text()


def signal_mid_job(sig, cache, tmp_path) -> tuple[int, list, Path, Path]:
    """A real 10-prompt job sent `sig` once two completions are in --out ->
    (exit code, its non-blank stderr lines, --out, the prompt file)."""
    prompts = write_prompts(tmp_path / "p.jsonl", n=10)
    out = tmp_path / "o.jsonl"
    proc = spawn(["--prompt-file", prompts, "--out", out, *LONG_JOB], cache)
    wait_for_rows(out, 2, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, [line for line in stderr.splitlines() if line.strip()], out, prompts


@pytest.mark.slow
def test_ctrl_c_says_what_is_safe_and_exits_130(cache, tmp_path):
    code, said, out, _ = signal_mid_job(signal.SIGINT, cache, tmp_path)
    assert code == 130 and len(said) == 1, said
    assert said[0].startswith("interrupted: ") and "--resume" in said[0]
    assert int(said[0].split()[1]) == len(out.read_text().splitlines()) >= 2  # what it says is safe, is


@pytest.mark.slow
def test_sigterm_stops_the_job_with_one_error_line(cache, tmp_path):
    """What a scheduler's stop (or torchrun, after another rank failed) sends: the job closes --out,
    says on one error line what is safe, exits 143; --resume then finishes it."""
    code, said, out, prompts = signal_mid_job(signal.SIGTERM, cache, tmp_path)
    assert code == 143 and len(said) == 1 and said[0].startswith("error: stopped by SIGTERM"), said
    resumed = spawn(["--prompt-file", prompts, "--out", out, *LONG_JOB, "--resume"], cache)
    assert resumed.wait(timeout=300) == 0
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == list(range(10))
