"""Spend a short device lease as one command: stages in order, each under its own time limit.

A lease is minutes long and a command that dies takes its unsaved results with it, so:
- a stage is never started when the budget left cannot hold its estimate (it is listed as skipped,
  with the numbers), and its time limit is cut to what is left, so the whole run ends in budget;
- every command runs in its own process group, killed whole at the stage's deadline (a hung CUDA
  call cannot be interrupted from inside its process), and with this process when it is stopped;
- a stage that fails, crashes or times out is recorded (its command and the last lines of its output
  or traceback) and the next stage still runs;
- the report (NAME.json with every stage's raw result, NAME.md with one table row per stage, NAME.log
  with each command's output tail) is rewritten after every stage, so a kill mid-run leaves everything
  completed so far. Full outputs stay in a scratch directory; only these files (and what a stage
  copies next to them) need to come back from the device machine.

The stages themselves (what to run, how to read its output) are in benchmarks/gpu_first_light.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]  # commands run from the repository root
TAIL_LINES = 60  # of a failed command's output, in the stage's JSON entry
LOG_TAIL_LINES = 400  # of every command's output, in NAME.log
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL this much later
TEXT_SUFFIXES = (".md", ".json", ".txt", ".log")  # kept files whose machine paths are hidden
# Each command in a process group of its own, killed whole at its deadline; the same session as this
# process, so whatever stops this run's session (the device machine's end of a call) stops them too.
OWN_GROUP = dict(process_group=0) if sys.version_info >= (3, 11) else dict(preexec_fn=os.setpgrp)


class CommandFailed(Exception):
    """A stage's command exited non-zero (a failed test, a lossless divergence, a crash); `data` is
    what the stage could still read from it."""

    def __init__(self, message: str, data: Optional[dict] = None):
        super().__init__(message)
        self.data = data or {}


class StageTimeout(Exception):
    """A stage's command was still running at the stage's deadline; its process group was killed."""


@dataclasses.dataclass
class Outcome:
    """What a stage found: ok True (checks passed, targets met), False (a target missed, a check
    failed), None (measured, nothing to pass or fail); `result` is its one line in the table."""
    ok: Optional[bool]
    result: str
    data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Stage:
    name: str
    checks: str  # what it checks, and its targets
    estimate_s: float  # planned seconds, process start-up included
    limit_s: float  # hard limit: its commands are killed past it
    run: Callable[["StageRun"], Outcome]
    fallback: Optional["Stage"] = None  # run instead when this one does not fit the budget left


@dataclasses.dataclass
class Command:
    """One finished command of a stage (the recorded line hides the scratch directory's path)."""
    command: str
    rc: Optional[int]  # None: killed at the deadline
    seconds: float
    output: str


class StageRun:
    """What a running stage can do: run commands before its deadline, read earlier stages' data."""

    def __init__(self, stage: Stage, lease: "Lease", deadline: float):
        self.stage, self.deadline = stage, deadline
        self.work_dir, self.out_dir, self.clock, self.show = lease.work_dir, lease.out_dir, lease.clock, lease.show
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", **lease.child_env)  # no progress bars
        self.earlier = lease.earlier()  # name -> data of the stages that ran before
        self.meta = lease.meta  # the report's header: a stage may add what it learnt (the device's name)
        self.commands: list[Command] = []

    def path(self, name: str, stage: Optional[str] = None) -> Path:
        """A file or directory of this stage's (or an earlier stage's) in the scratch directory."""
        return self.work_dir / f"{stage or self.stage.name}-{name}"

    def keep(self, src: Path, name: str) -> None:
        """Copy a file the stage made (a plot, a table) next to the report, if it exists; in text files
        the scratch and output directories are written as $WORK and $OUT, as in the recorded commands."""
        if not src.is_file():
            return
        if src.suffix in TEXT_SUFFIXES:
            (self.out_dir / name).write_text(self.show(src.read_text(encoding="utf-8")), encoding="utf-8")
        else:
            shutil.copyfile(src, self.out_dir / name)

    def sh(self, argv: list, check: bool = True) -> Command:
        """Run argv from the repository root until it exits or the stage's deadline passes.
        check: raise CommandFailed on a non-zero exit (the stage is recorded as failed)."""
        argv = [str(a) for a in argv]
        log = self.path(f"{len(self.commands)}.out")
        start = self.clock()
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    **OWN_GROUP)
            try:
                rc = proc.wait(timeout=max(self.deadline - self.clock(), 0.1))
            except subprocess.TimeoutExpired:
                kill_group(proc)
                rc = None
            except BaseException:  # this process is being stopped (SIGTERM, Ctrl-C): the command goes too
                kill_group(proc)
                raise
        cmd = Command(self.show(shlex.join(argv)), rc, self.clock() - start,
                      log.read_text(encoding="utf-8", errors="replace"))
        self.commands.append(cmd)
        if rc is None:
            raise StageTimeout(f"killed at the stage's time limit after {cmd.seconds:.0f} s: {cmd.command}")
        if check and rc != 0:
            raise CommandFailed(f"exit {rc}: {cmd.command}")
        return cmd


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group started for proc, and SIGKILL whatever is left of it after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a leader that ignored SIGTERM, or children it left behind
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # stuck in the kernel (a wedged driver call): leave it, go on
        pass


def tail(text: str, lines: int) -> list[str]:
    return text.rstrip("\n").splitlines()[-lines:]


# ---- the run --------------------------------------------------------------------------------------------
class Lease:
    """Runs stages within budget_s and keeps NAME.json / NAME.md / NAME.log in out_dir current."""

    def __init__(self, name: str, stages: list[Stage], budget_s: float, out_dir: Path, work_dir: Path, meta: dict,
                 clock: Callable[[], float] = time.monotonic, echo: Callable[[str], None] = print,
                 child_env: Optional[dict] = None):
        self.name, self.stages, self.budget_s, self.meta = name, stages, budget_s, meta
        self.child_env = child_env or {}  # added to every command's environment
        self.out_dir, self.work_dir = Path(out_dir).resolve(), Path(work_dir).resolve()  # show() replaces them whole
        self.clock, self.echo = clock, echo
        self.entries = [planned(s) for s in stages]
        self.t0 = clock()

    @property
    def paths(self) -> dict:
        return {ext: self.out_dir / f"{self.name}.{ext}" for ext in ("json", "md", "log")}

    def left(self) -> float:
        return self.budget_s - (self.clock() - self.t0)

    def show(self, command: str) -> str:
        """A command as recorded: `python`, and $WORK / $OUT for the scratch and output directories."""
        return (command.replace(shlex.quote(sys.executable), "python").replace(str(self.work_dir), "$WORK")
                .replace(str(self.out_dir), "$OUT"))

    def run(self) -> list[dict]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.paths["log"].write_text("")
        self.write()
        for i, stage in enumerate(self.stages):
            try:
                self.entries[i] = self.run_stage(stage)
            except BaseException:  # this run is being stopped: say where, then stop
                self.entries[i] = dict(planned(stage), status="interrupted", result="the run was stopped here")
                self.write()
                raise
            self.write()
            e = self.entries[i]
            self.echo(f"[{self.clock() - self.t0:5.0f} s] {e['stage']}: {e['status']} - {e['result']}")
        self.echo(summary_table(self.entries))
        return self.entries

    def run_stage(self, stage: Stage) -> dict:
        left = self.left()
        if stage.estimate_s > left:
            if stage.fallback is not None and stage.fallback.estimate_s <= left:
                entry = self.run_stage(stage.fallback)
                entry["note"] = f"instead of {stage.name}: {skip_reason(stage, left)}"
                return entry
            return dict(planned(stage), status="skipped", result=skip_reason(stage, left))
        limit = min(stage.limit_s, left)
        self.echo(f"[{self.clock() - self.t0:5.0f} s] {stage.name}: starting (estimate {stage.estimate_s:.0f} s, "
                  f"limit {limit:.0f} s)")
        run = StageRun(stage, self, self.clock() + limit)
        start = self.clock()
        error = None
        try:
            outcome = stage.run(run)
            status = {True: "ok", False: "missed", None: "measured"}[outcome.ok]
        except (StageTimeout, CommandFailed) as err:
            status = "timeout" if isinstance(err, StageTimeout) else "failed"
            outcome = Outcome(False, str(err), getattr(err, "data", {}))
            error = run.commands[-1].output if run.commands else ""
        except Exception as err:  # a bug in the stage's own code must not stop the next stage
            status, outcome, error = "crashed", Outcome(False, f"{type(err).__name__}: {err}"), traceback.format_exc()
        self.append_log(stage, run.commands, error if status == "crashed" else None)
        entry = dict(planned(stage), status=status, result=outcome.result, data=outcome.data,
                     seconds=round(self.clock() - start, 1), limit_s=round(limit),
                     commands=[dict(command=c.command, rc=c.rc, seconds=round(c.seconds, 1)) for c in run.commands])
        if error is not None:
            entry["error_tail"] = tail(error, TAIL_LINES)
        return entry

    def earlier(self) -> dict:
        """name -> data of the stages that have run (the plan of later stages may depend on them)."""
        return {e["stage"]: e.get("data", {}) for e in self.entries if e["status"] not in ("pending", "skipped")}

    def append_log(self, stage: Stage, commands: list[Command], traceback_text: Optional[str]) -> None:
        with open(self.paths["log"], "a", encoding="utf-8") as log:
            for c in commands:
                rc = "killed at the time limit" if c.rc is None else f"exit {c.rc}"
                log.write(f"===== {stage.name}: {c.command}\n===== {rc}, {c.seconds:.1f} s; last lines:\n")
                log.write("\n".join(tail(c.output, LOG_TAIL_LINES)) + "\n\n")
            if traceback_text:
                log.write(f"===== {stage.name}: the stage's own code raised\n{traceback_text}\n")

    def write(self) -> None:
        """NAME.json (meta and every stage's entry) and NAME.md, written whole each time."""
        meta = dict(self.meta, elapsed_s=round(self.clock() - self.t0, 1), budget_s=self.budget_s)
        self.paths["json"].write_text(json.dumps(dict(meta=meta, stages=self.entries), indent=1,
                                                 ensure_ascii=False) + "\n")
        self.paths["md"].write_text(markdown(self.name, meta, self.entries))


def planned(stage: Stage) -> dict:
    return dict(stage=stage.name, checks=stage.checks, status="pending", result="",
                estimate_s=round(stage.estimate_s), limit_s=round(stage.limit_s))


def skip_reason(stage: Stage, left: float) -> str:
    return f"skipped: needs ~{stage.estimate_s:.0f} s, {max(left, 0):.0f} s of the budget left"


# ---- reports -------------------------------------------------------------------------------------------
def markdown(name: str, meta: dict, entries: list[dict]) -> str:
    lines = [f"# {name.replace('_', ' ')}: {meta.get('device_name') or meta.get('device')}", ""]
    lines += [f"- {key}: `{meta[key]}`" for key in meta if meta[key] is not None and key != "device_name"]
    lines += ["", "| # | stage | status | result | seconds (est. / limit) | commands |", "|---|---|---|---|---|---|"]
    for i, e in enumerate(entries, 1):
        seconds = f"{e['seconds']:.0f}" if "seconds" in e else "–"
        commands = "<br>".join(f"`{c['command']}`" for c in e.get("commands", [])) or "–"
        result = e["result"] + (f" ({e['note']})" if e.get("note") else "")
        lines.append(f"| {i} | {e['stage']} | {e['status']} | {_cell(result)} | {seconds} ({e['estimate_s']} / "
                     f"{e['limit_s']}) | {_cell(commands)} |")
    lines += ["", "What each stage checks:", ""] + [f"- **{e['stage']}**: {e['checks']}" for e in entries]
    failed = [e for e in entries if e.get("error_tail")]
    for e in failed:
        lines += ["", f"## {e['stage']}: last lines", "", "```", *e["error_tail"], "```"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_table(entries: list[dict]) -> str:
    """The short table printed last (the device's reply carries the end of the output)."""
    width = max(len(e["stage"]) for e in entries)
    rows = [f"{'stage':<{width}}  {'status':<8}  {'s':>5}  result"]
    for e in entries:
        seconds = f"{e['seconds']:.0f}" if "seconds" in e else "-"
        rows.append(f"{e['stage']:<{width}}  {e['status']:<8}  {seconds:>5}  {e['result'][:160]}")
    return "\n".join(rows)
