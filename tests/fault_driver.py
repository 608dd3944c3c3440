"""generate.py's command line with a signal sent to itself at one phase of the job: how the fault
tests deliver kill -9, SIGTERM or Ctrl-C at an exact point, with no test hook in the package.

    python tests/fault_driver.py PHASE SIGNAL RANK -- <generate.py arguments>
    torchrun --nproc_per_node 2 tests/fault_driver.py PHASE SIGNAL RANK -- <arguments>

PHASE: first-row (the first completion is about to be written), mid-job (the third has been
written), rewrite (the final in-order file is complete beside the output, not yet renamed over
it), gather (a replica job's ranks are about to exchange what each has). SIGNAL: KILL, TERM or
INT. RANK: the global rank that signals itself (0 without torchrun).
"""
import os
import signal
import sys


def signal_self(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    signal.sigtimedwait([], 0.01) if sig == signal.SIGKILL else None  # SIGKILL: never returns


def arm(phase: str, sig: signal.Signals) -> None:
    """Patch the one call that marks `phase` so that it signals this process the first time."""
    from gpt_fast_magicdec import output

    fired = []

    def once() -> None:
        if not fired:
            fired.append(True)
            signal_self(sig)

    if phase in ("first-row", "mid-job"):
        write = output.JobOutput.write
        calls = []

        def write_then_signal(self, row):
            if phase == "first-row":
                once()
            write(self, row)
            calls.append(row["index"])
            if phase == "mid-job" and len(calls) == 3:
                once()

        output.JobOutput.write = write_then_signal
    elif phase == "rewrite":
        replace = os.replace

        def signal_then_replace(src, dst, **kwargs):
            once()
            return replace(src, dst, **kwargs)

        output.os.replace = signal_then_replace  # this process only: it is the driver's own
    elif phase == "gather":
        gather = output.JobOutput._gather_and_rewrite

        def signal_then_gather(self, *args):
            once()
            return gather(self, *args)

        output.JobOutput._gather_and_rewrite = signal_then_gather
    else:
        raise SystemExit(f"unknown phase {phase!r}")


def main() -> None:
    phase, sig_name, rank = sys.argv[1:4]
    assert sys.argv[4] == "--", "usage: fault_driver.py PHASE SIGNAL RANK -- <generate.py arguments>"
    if int(os.environ.get("RANK", "0")) == int(rank):
        arm(phase, signal.Signals[f"SIG{sig_name}"])
    from gpt_fast_magicdec.cli import generate

    sys.argv = ["generate.py", *sys.argv[5:]]
    generate.console_main()


if __name__ == "__main__":
    main()
