"""A generation job's --out: one JSON line per prompt, written as each completion finishes.

Each line is flushed when written and synced to disk at least every SYNC_EVERY_S seconds, so a
crash, an OOM kill or Ctrl-C loses only the prompts in flight. A line carries the prompt's index
in the input and a hash of its text, and the fingerprint of the options that decide the output,
so `--resume` can skip what is done and refuse a file written for other prompts or options. On a
clean finish the file is rewritten in input order (atomically: a temporary file renamed over it).

With several data-parallel replicas each replica's first rank appends to its own part file,
`OUT.partR`; at the end the rows are gathered to global rank 0, which writes OUT, and the parts
are removed. A target that is not a regular file (a FIFO, a character device such as /dev/stdout,
a symlink to one) is written directly, in completion order: it is never renamed over or resumed.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from ..data import check_writable
from ..errors import UserError

SYNC_EVERY_S = 2.0


def text_hash(text) -> str:
    """sha256 of a prompt: its text, or (random-weight prompts) its token ids."""
    data = text if isinstance(text, str) else json.dumps(list(text))
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


def options_fingerprint(options: dict) -> str:
    """A short hash of the options that decide a job's output (the caller picks which)."""
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_regular_target(path: Path) -> bool:
    """A regular file, or nothing yet (it will be one); False for FIFOs, devices and links to them."""
    try:
        mode = os.stat(path).st_mode  # follows a symlink to what it names
    except (FileNotFoundError, NotADirectoryError):  # nothing there (check_writable says why, if anything)
        return True
    return stat.S_ISREG(mode)


def probe_append(path: Path) -> None:
    """Refuse now, before any work, a --out this process cannot append to (a read-only file, a
    full quota where even creating fails); a probe that created the file removes it again."""
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise UserError(f"cannot write --out {path}: {err.strerror}; choose another path") from None
    if not existed:
        path.unlink(missing_ok=True)


def part_path(out: Path, replica: int) -> Path:
    return out.with_name(f"{out.name}.part{replica}")


def part_paths(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(f"{out.name}.part*") if p.name[len(out.name) + 5:].isdigit())


def read_rows(path: Path) -> list[dict]:
    """The rows of a job output; a last line cut short by a crash is dropped (and truncated away,
    so appending continues on a clean line). Anything else unreadable is one clear error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):  # a partial last line: the write a crash interrupted
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    rows = []
    for n, line in enumerate(complete.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {n} is not JSON: it was not written by a generation job; choose "
                            "another --out") from None
        if not isinstance(row, dict) or not {"index", "prompt_sha256", "run"} <= set(row):
            raise UserError(f"{path} line {n} is not a job output row (no index, prompt_sha256 and run): it was "
                            "not written by a generation job; choose another --out")
        rows.append(row)
    return rows


class JobOutput:
    """--out of one job on this process. `done` holds the rows a resumed job skips; `write`
    appends a finished row (only on the process that writes for its replica)."""

    def __init__(self, path: Path, run: str, resume: bool, prompt_file: Optional[Path] = None):
        self.path, self.run = Path(path), run
        self.direct = not is_regular_target(self.path)
        if prompt_file is not None and self.path.exists() and os.path.samefile(self.path, prompt_file):
            raise UserError(f"--out {path} is the --prompt-file: writing completions there would destroy the "
                            "prompts; choose another --out")
        if self.direct and resume:
            raise UserError(f"--resume needs --out to be a regular file; {path} is not one (a device or a pipe "
                            "is written as the job runs and cannot be read back)")
        if not self.direct:
            check_writable(self.path)
            existing = [p for p in [self.path, *part_paths(self.path)] if p.exists() and p.stat().st_size > 0]
            if existing and not resume:
                raise UserError(f"--out {existing[0]} already exists: pass --resume to continue the job that wrote "
                                "it, or choose another --out (it is never replaced)")
            probe_append(self.path)
        self.done: dict[int, dict] = {}
        self._file = None
        self._dirty = False
        self._lock = threading.Lock()
        self._syncer: Optional[threading.Thread] = None

    # -- resuming -------------------------------------------------------------------------------------
    def read_done(self, prompt_hashes: dict) -> dict[int, dict]:
        """Rows already complete in --out (and its parts), checked against this job: every row's
        run fingerprint must be this command's, and its prompt hash that of the prompt at its index."""
        if self.direct:
            return {}
        for path in [self.path, *part_paths(self.path)]:
            for row in read_rows(path):
                if row["run"] != self.run:
                    raise UserError(f"{path} was written by a run with other options (run {row['run']}, this command's "
                                    f"is {self.run}): resume with the options that wrote it, or choose another --out")
                index = row["index"]
                if prompt_hashes.get(index) != row["prompt_sha256"]:
                    raise UserError(f"{path}: the completion of prompt {index} was written for another prompt text "
                                    "(the prompts changed since): choose another --out")
                self.done[index] = row
        return self.done

    # -- writing --------------------------------------------------------------------------------------
    def open(self, replica: Optional[int] = None) -> None:
        """Start appending: to OUT, or with replicas to this replica's part file."""
        target = self.path if replica is None else part_path(self.path, replica)
        try:
            self._file = open(target, "a", encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write --out {target}: {err.strerror}") from None
        self._target = target
        if not self.direct:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True)
            self._syncer.start()

    def write(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        try:
            with self._lock:
                self._file.write(line)
                self._file.flush()  # in the OS from now on: a killed process loses nothing written
                self._dirty = True
        except OSError as err:
            raise UserError(f"cannot write --out {self._target} ({err.strerror}); {self.safe_line()}") from None

    def _sync_loop(self) -> None:
        while self._file is not None:
            time.sleep(SYNC_EVERY_S)
            self.sync()

    def sync(self) -> None:
        with self._lock:
            if self._file is not None and self._dirty:
                try:
                    os.fsync(self._file.fileno())
                except OSError:
                    pass  # reported by the next write or by close
                self._dirty = False

    def close(self) -> None:
        if self._file is None:
            return
        self.sync()
        with self._lock:
            self._file.close()
            self._file = None

    def safe_line(self) -> str:
        return f"the completions written so far are safe in {self._target}; re-run the same command with --resume"

    # -- finishing -------------------------------------------------------------------------------------
    def rewrite_in_order(self, rows: list[dict]) -> Optional[str]:
        """Replace OUT by `rows` sorted by index (atomically) and remove the part files. None, or
        why it could not (OUT then still holds every row, in completion order)."""
        if self.direct:
            return None
        rows = sorted({r["index"]: r for r in rows}.values(), key=lambda r: r["index"])
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.resolve().parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path.resolve())  # a symlink to a regular file keeps pointing at it
        except OSError as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return err.strerror or type(err).__name__
        for part in part_paths(self.path):
            part.unlink(missing_ok=True)
        return None
