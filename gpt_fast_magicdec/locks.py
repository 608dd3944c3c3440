"""An exclusive lock file beside an output, held for a whole conversion or batch run.

Two writers of one output (a command started twice, two shells, a scheduler retrying a job that is
still running) would interleave or replace each other's work minutes later; the second one fails at
once instead. The lock is an flock on `.NAME.lock` in the output's directory: the kernel releases it
when its process dies, so a killed run never leaves it held, and the file records the holder's pid
for the message.

  with output_lock(path, "--out", "a generation job is writing it"):
      ...
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no locking (the callers' final renames still refuse to replace)
    fcntl = None


def lock_path(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: Path, option: str, busy: str, wait: bool = False) -> Iterator[None]:
    """Hold `.NAME.lock` beside `target` for the block. Held by another process: UserError
    "{option} {target}: {busy} (pid N); wait for it to finish, or choose another {option}", or with
    wait=True, wait for it. A file system without locks (some network mounts) runs unlocked."""
    target = Path(target)
    path = lock_path(target)
    if fcntl is None:
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{option} {target}: cannot write into {target.parent} ({e.strerror}); choose "
                            "another path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{option} {target}: {busy}{f' (pid {holder})' if holder.isdigit() else ''}; wait "
                            f"for it to finish, or choose another {option}") from None
        except OSError:
            break
        # The holder we waited for may have removed the file on its way out: lock the current one.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held, so a waiter finds it gone and retries
        os.close(fd)
