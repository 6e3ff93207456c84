"""Preemption: SIGTERM, SIGUSR1 or SIGINT makes every process finish its step, save a checkpoint
that resumes exactly, and exit; under SLURM, SIGUSR1 (`#SBATCH --signal=USR1@...`) also requeues
the job, which continues with `--resume auto`. A second Ctrl-C stops at once."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from types import FrameType
from typing import Optional

from utils.dist import any_process

log = logging.getLogger("groco")

SIGUSR1: Optional[int] = getattr(signal, "SIGUSR1", None)  # None on Windows, which has no SIGUSR1
STOP_SIGNALS = tuple(sig for sig in (signal.SIGTERM, SIGUSR1, signal.SIGINT) if sig is not None)


class Preempted(Exception):
    """Training stopped on a signal after saving; `signum` is the signal that asked for it."""

    def __init__(self, signum: int, checkpoint: Optional[str]):
        cause = signal.Signals(signum).name if signum else "a signal to another process"
        super().__init__(f"stopped by {cause}; checkpoint: {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


class StopSignal:
    """Context manager that records SIGTERM / SIGUSR1 / SIGINT instead of dying, restoring the
    previous handlers on exit; a second SIGINT raises KeyboardInterrupt. `requested()` is
    collective: true on every process once any received one."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        again = " (Ctrl-C again stops at once; the last saved checkpoint stays)" if signum == signal.SIGINT else ""
        log.warning("received %s: stopping after the current step or evaluation%s", signal.Signals(signum).name,
                    again)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return any_process(self.signum is not None)


def requeue_under_slurm(signum: int) -> None:
    """After SIGUSR1 inside a SLURM job, put the job back in the queue (`scontrol requeue`)."""
    job = os.environ.get("SLURM_JOB_ID")
    if SIGUSR1 is None or signum != SIGUSR1 or not job:
        return
    if shutil.which("scontrol") is None:
        log.warning("SLURM job %s: scontrol not found, the job is not requeued", job)
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("SLURM job %s requeued; it will continue with --resume auto", job)
    else:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
