"""The output file of a batch run: one JSON line per prompt, written as each completion finishes.

The protocol, all of it here:
  row            make_row / row_problem: what a line holds, and the check every line read back passes
  writing        JobOutput.write appends a row and flushes it; a thread syncs to disk every SYNC_EVERY_S,
                 so a crash, an OOM kill or Ctrl-C loses only the prompts in flight
  exclusion      the run holds `.NAME.lock` beside the file (locks.py): a second run on the same file
                 fails at once instead of interleaving its rows
  resuming       JobOutput.done_indices: the indices already complete, every row checked against this
                 run (its prompts' hashes and the options that decide the text); replicas exchange
                 these integers, never rows
  finishing      JobOutput.finish: the file rewritten in input order (a temporary file renamed over it),
                 then the part files removed

With several data-parallel replicas each replica's first rank appends to its own part file,
`OUT.partR`; `finish` collects every row (rank 0 reads what it sees and receives only the rows it
cannot see, from the leaders of other machines), writes OUT and removes the parts. A row may be in
OUT and in a part at once (a run killed between the rewrite and the removal): rows are merged by
index. A target that is not a regular file (a FIFO, a character device such as /dev/stdout, a
symlink to one) is written directly, in completion order: it is never renamed over, locked or resumed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from .data import check_writable
from .errors import ParameterError, UserError, literal
from .locks import output_lock

SYNC_EVERY_S = 2.0


def text_hash(text) -> str:
    """sha256 of a prompt: its text, or (prompts given as token ids) its ids."""
    data = text if isinstance(text, str) else json.dumps(list(text))
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(options: dict) -> str:
    """A short hash of the options that decide a run's output (`run` in every row)."""
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_regular_target(path: Path) -> bool:
    """A regular file, or nothing yet (it will be one); False for FIFOs, devices and links to them."""
    try:
        mode = os.stat(path).st_mode  # follows a symlink to what it names
    except (FileNotFoundError, NotADirectoryError):  # nothing there (check_writable says why, if anything)
        return True
    return stat.S_ISREG(mode)


def file_mode(path: Path) -> int:
    """The permission bits `path` has, or a new file would get from the umask: what the final
    rewrite gives the output, so a shared results directory stays as readable as the user made it."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def part_path(out: Path, replica: int) -> Path:
    return out.with_name(f"{out.name}.part{replica}")


def part_paths(out: Path) -> list[Path]:
    """Every replica part of `out` there is, whichever run's replica count wrote it."""
    return sorted(p for p in out.parent.glob(f"{out.name}.part*") if p.name[len(out.name) + 5:].isdigit())


# ---- the row ---------------------------------------------------------------------------------------
# field -> the types its value may have. "options" is absent from rows written before it existed.
ROW_TYPES = {"index": (int,), "prompt_sha256": (str,), "prompt": (str, type(None)), "completion": (str, type(None)),
             "completion_ids": (list,), "ids_without_piece": (int,), "prompt_tokens": (int,), "new_tokens": (int,),
             "finish_reason": (str,), "run": (str,)}


def make_row(completion, prompt_sha256: str, prompt: Optional[str], text: Optional[str], ids_without_piece: int,
             run: str, options: dict) -> dict:
    """The line of one finished prompt. completion: a stats.Completion; prompt: its text (None for
    prompts given as ids); text: the completion decoded (None without a tokenizer)."""
    return {"index": completion.index, "prompt_sha256": prompt_sha256, "prompt": prompt, "completion": text,
            "completion_ids": completion.tokens, "ids_without_piece": ids_without_piece,
            "prompt_tokens": completion.prompt_tokens, "new_tokens": len(completion.tokens),
            "finish_reason": completion.finish_reason, "run": run, "options": options}


def row_problem(row) -> Optional[str]:
    """None for a well-formed row; else what is wrong with it."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for field, types in ROW_TYPES.items():
        if field not in row:
            return f"no {field!r}"
        if not isinstance(row[field], types) or isinstance(row[field], bool):
            return f"{field!r} is {type(row[field]).__name__}"
    if row["index"] < 0 or len(row["prompt_sha256"]) != 64:
        return "a negative index or a malformed prompt_sha256"
    if not isinstance(row.get("options", {}), dict):
        return "'options' is not an object"
    return None


def read_rows(path: Path) -> list[dict]:
    """The rows of an output file. A last line cut short (the write a crash interrupted) is dropped
    and truncated away, so appending continues on a clean line; any other line that is not a row is
    one UserError naming the file and the line, and nothing is changed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    complete = data[:data.rfind(b"\n") + 1]
    rows = []
    for n, raw in enumerate(complete.split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        problem = "not JSON" if row is None else row_problem(row)
        if problem:
            raise UserError(f"{path} line {n} is not a batch-run row ({problem}): it was not written by a generation "
                            "job, or was damaged; choose another --out (or remove that line to resume)")
        rows.append(row)
    if len(complete) < len(data):
        try:
            with open(path, "r+b") as f:
                f.truncate(len(complete))
        except OSError as err:
            raise UserError(f"cannot repair the cut-short last line of {path}: {err.strerror}") from None
    return rows


def changed_options(written: dict, now: dict) -> list[str]:
    """The option names whose values differ between a row's options and this run's."""
    return sorted(k for k in set(written) | set(now) if written.get(k) != now.get(k))


# ---- the file ---------------------------------------------------------------------------------------
class JobOutput:
    """The output file of one batch run, on this process.

    Built before any work: it refuses a path it must not write (the prompt file itself, an existing
    file without resume, a directory, an unwritable place) and, with lock=True, takes the file's lock
    for the run's whole life (lock=False: the caller calls `acquire` on the one process that should)."""

    def __init__(self, path, resume: bool = False, protect: Optional[Path] = None, lock: bool = True):
        self.path, self.resume = Path(path), resume
        self.direct = not is_regular_target(self.path)
        if protect is not None and self.path.exists() and os.path.samefile(self.path, protect):
            raise ParameterError(f"{{out}} {literal(path)} is the {{prompt_file}}: writing completions there would "
                                 "destroy the prompts; choose another {out}")
        if self.direct and resume:
            raise ParameterError(f"{{resume}} needs {{out}} to be a regular file; {literal(path)} is not one (a device "
                                 "or a pipe is written as the job runs and cannot be read back)")
        self._locked = contextlib.ExitStack()
        if not self.direct:
            check_writable(self.path)
            self._refuse_existing()
            self._probe_append()
        self.done: set[int] = set()
        self.written = 0  # rows this process appended
        self._file = None
        self._target = self.path
        self._dirty = False
        self._mutex = threading.Lock()
        self._syncer: Optional[threading.Thread] = None
        if lock:
            self.acquire()

    def acquire(self) -> None:
        """Take the file's lock for the rest of the run (one process per run: under torchrun global
        rank 0, inside the ranks' shared failure check), then check again what needed it."""
        if self.direct:
            return
        self._locked.enter_context(output_lock(self.path, "--out", "another generation job is writing it"))
        try:
            self._refuse_existing()  # a run that finished while we waited for nothing: checked under the lock
            self._remove_stale_rewrites()
        except BaseException:
            self._locked.close()
            raise

    def _refuse_existing(self) -> None:
        existing = [p for p in [self.path, *part_paths(self.path)] if p.exists() and p.stat().st_size > 0]
        if existing and not self.resume:
            raise ParameterError(f"{{out}} {literal(existing[0])} already exists: pass {{resume}} to continue the "
                                 "job that wrote it, or choose another {out} (it is never replaced)")

    def _probe_append(self) -> None:
        """Refuse now, before any work, a file this process cannot append to (read-only, a full
        quota where even creating fails); a probe that created the file removes it again."""
        existed = self.path.exists()
        try:
            with open(self.path, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise UserError(f"cannot write --out {self.path}: {err.strerror}; choose another path") from None
        if not existed:
            self.path.unlink(missing_ok=True)

    def _remove_stale_rewrites(self) -> None:
        """Temporary files of a final rewrite that a kill interrupted (we hold the lock, so none is
        in progress): the file they were meant to replace is intact beside them."""
        for tmp in self.path.resolve().parent.glob(f".{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)

    # -- resuming -------------------------------------------------------------------------------------
    def done_indices(self, run: str, options: dict, prompt_hashes: list, layout=None) -> set[int]:
        """The prompt indices already complete in the file and its parts, every row checked against
        this run: its options (`run`, their fingerprint) and the hash of the prompt at its index.
        With replicas (layout), each replica's leader reads what it sees and all exchange indices."""
        reads = not self.direct and self.resume and (layout is None or layout.leader)
        done, error = set(), None
        try:
            for path in [self.path, *part_paths(self.path)] if reads else ():
                for row in read_rows(path):
                    self._check_row(path, row, run, options, prompt_hashes)
                    done.add(row["index"])
        except UserError as err:
            if layout is None:
                raise
            error = err  # raised below on every rank: the others would otherwise wait at the exchange
        if layout is not None:
            import torch.distributed as dist

            views = [None] * layout.world_size
            dist.all_gather_object(views, (sorted(done), error))
            errors = [err for _, err in views if err is not None]
            if errors:
                raise errors[0]
            done = {i for view, _ in views for i in view}
        self.done = done
        return done

    def _check_row(self, path: Path, row: dict, run: str, options: dict, prompt_hashes: list) -> None:
        index = row["index"]
        if row["run"] != run:
            written = row.get("options")
            if isinstance(written, dict):
                said = ", ".join(f"{{{k}}} {literal(written.get(k, '(unset)'))} there, {literal(options.get(k, '(unset)'))} "
                                 "now" for k in changed_options(written, options))
                raise ParameterError(f"{literal(path)} was written with other options ({said}): resume with the "
                                     "options that wrote it, or choose another {out}")
            raise ParameterError(f"{literal(path)} was written by a run with other options (run {row['run']}, this "
                                 f"one's is {run}): resume with the options that wrote it, or choose another {{out}}")
        if index >= len(prompt_hashes):
            raise ParameterError(f"{literal(path)} holds the completion of prompt {index}, but there are only "
                                 f"{len(prompt_hashes)} prompts now (prompts were removed since): choose another {{out}}")
        if prompt_hashes[index] != row["prompt_sha256"]:
            raise ParameterError(f"{literal(path)}: the completion of prompt {index} was written for another prompt "
                                 "text (the prompts changed since, or were reordered): choose another {out}")

    # -- writing --------------------------------------------------------------------------------------
    def open(self, replica: Optional[int] = None) -> None:
        """Start appending: to the file, or with replicas to this replica's part file."""
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
            with self._mutex:
                self._file.write(line)
                self._file.flush()  # in the OS from now on: a killed process loses nothing written
                self.written += 1
                self._dirty = True
        except OSError as err:
            raise UserError(f"cannot write --out {self._target} ({err.strerror}); {self.safe_line()}") from None

    def _sync_loop(self) -> None:
        while self._file is not None:
            time.sleep(SYNC_EVERY_S)
            self.sync()

    def sync(self) -> None:
        with self._mutex:
            if self._file is not None and self._dirty:
                with contextlib.suppress(OSError):  # reported by the next write, or by close
                    os.fsync(self._file.fileno())
                self._dirty = False

    def close(self) -> None:
        """Stop appending (synced). The lock is kept until `release`."""
        if self._file is None:
            return
        self.sync()
        with self._mutex:
            try:
                self._file.close()
            except OSError:
                pass  # a failed flush of nothing: every row was flushed when written
            self._file = None

    def release(self) -> None:
        self.close()
        self._locked.close()

    def safe_line(self) -> str:
        return f"the completions written so far are safe in {self._target}; re-run the same command with --resume"

    # -- finishing -------------------------------------------------------------------------------------
    def finish(self, n_prompts: int, layout=None) -> Optional[str]:
        """Every row of the run (the file, every part) into the file in input order, then the parts
        removed. Called on every rank of a torchrun world. None, or why it could not (the rows are
        then all still in the file and its parts, in the order they finished)."""
        self.close()
        if self.direct:
            return None
        if layout is None or layout.replicas == 1:
            if layout is not None and layout.rank != 0:
                return None
            problem = self._rewrite(self._visible_rows(), n_prompts)
        else:
            problem = self._gather_and_rewrite(n_prompts, layout)
        if problem is None and (layout is None or layout.leader):
            for part in part_paths(self.path):
                part.unlink(missing_ok=True)
        return problem

    def _visible_rows(self) -> dict[int, dict]:
        return {row["index"]: row for path in [self.path, *part_paths(self.path)] for row in read_rows(path)}

    def _gather_and_rewrite(self, n_prompts: int, layout) -> Optional[str]:
        """Rank 0 reads what it sees and tells the other leaders which indices it has; they send
        only the rows it lacks (none on one machine or a shared file system)."""
        import torch.distributed as dist

        from .tp import broadcast_object

        rows = self._visible_rows() if layout.rank == 0 or layout.leader else {}
        have = broadcast_object(sorted(rows) if layout.rank == 0 else None)
        missing = [row for i, row in rows.items() if i not in set(have)] if layout.rank != 0 else []
        gathered = [None] * layout.world_size if layout.rank == 0 else None
        dist.gather_object(missing, gathered, dst=0)
        problem = None
        if layout.rank == 0:
            for part in gathered:
                rows.update((row["index"], row) for row in part)
            problem = self._rewrite(rows, n_prompts)
        return broadcast_object(problem)

    def _rewrite(self, rows: dict[int, dict], n_prompts: int) -> Optional[str]:
        """Replace the file by `rows` sorted by index (atomically)."""
        if len(rows) < n_prompts:
            return f"only {len(rows)} of {n_prompts} prompts have a completion"
        target = self.path.resolve()  # a symlink to a regular file keeps pointing at it
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            os.chmod(fd, file_mode(target))  # mkstemp's file is private (0600); the output's is not
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for index in sorted(rows):
                    f.write(json.dumps(rows[index], ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
        except OSError as err:
            return err.strerror or type(err).__name__
        finally:  # a failed write, or an interrupt before the rename: the output beside it is intact
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return None
