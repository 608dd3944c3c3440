"""Launching the real CLIs from tests: the repository on PYTHONPATH, one thread per process, SIGINT
as a terminal delivers it, and nothing left running afterwards."""
import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 120


def default_signals() -> None:
    """In the child, before it runs: SIGINT as a terminal delivers it. A pytest started in the
    background of a non-interactive shell (`&`, nohup) ignores SIGINT, and a child inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def environment(**extra) -> dict:
    """The checkout first on PYTHONPATH, and one thread per process: on a busy 2-core runner the
    default thread pools of several processes spin against each other."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1", **extra)


def launch(cmd, timeout=LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run cmd from the repository root in its own session; kill the whole group if anything is left."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_signals)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(map(str, cmd[:8]))} ... still running after {timeout} s (a hang)")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stray ranks, if torchrun left any
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
