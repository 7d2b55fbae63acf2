"""Stopping on a signal: SIGTERM, SIGUSR1 or a first Ctrl-C finish the step, save, and raise ``Preempted``.

Under DDP the ranks agree on the stop (so they all save at the same step) through a CPU vote
read one step later (``StopVote``), never a sync with the device.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from ..distributed import StopVote


class Preempted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; exits with 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Optional[str]):
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint

    def __str__(self) -> str:
        return f"training stopped by signal {self.signum}; checkpoint saved at {self.checkpoint}"


def submitit_signal() -> Optional[int]:
    """Inside a submitit job (``SUBMITIT_EXECUTOR`` set, as hydra-submitit-launcher's jobs are): the
    signal submitit sends before a time-out or on pre-emption and answers with checkpoint-and-requeue
    (``SUBMITIT_PREEMPT_SIGNAL``, default USR2); None elsewhere or when the name is no signal."""
    import os
    import signal
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").strip().upper()
    sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    return int(sig) if isinstance(sig, int) else None


class _SignalStop:
    """SIGTERM, SIGUSR1 and SIGINT (and, inside a submitit job, submitit's pre-emption signal, USR2 by
    default) ask the loop to stop after the current step.

    A repeated SIGTERM/SIGUSR1 changes nothing; a second SIGINT aborts at once. Only the
    main thread of the main process installs handlers; the previous ones come back after (so
    submitit's own handler, which requeues the job, is there again once the checkpoint is saved).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.signum = 0
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_SignalStop":
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self
        signals = [getattr(signal, name, None) for name in self.SIGNALS] + [submitit_signal()]
        for sig in signals:
            if sig is not None and sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        if not self.signum:
            self.signum = signum
        if signum == signal.SIGINT:  # the next Ctrl-C aborts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class StopRequests:
    """The loop's one question after each optimizer step: was it asked to stop, and by which signal?

    ``handle_signals`` installs the signal handlers (inside the ``with`` block); ``agree`` makes
    the ranks vote, so that a signal one rank got stops every rank at the same step.
    """

    def __init__(self, handle_signals: bool, agree: bool):
        self.signals = _SignalStop() if handle_signals else None
        self.vote = StopVote() if agree else None

    def __enter__(self) -> "StopRequests":
        if self.signals is not None:
            self.signals.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.signals is not None:
            self.signals.__exit__(None, None, None)

    def requested(self, settle: bool = False) -> int:
        """The signal that asks to stop, or 0; ``settle`` waits for the ranks' vote (between epochs)."""
        signum = self.signals.signum if self.signals is not None else 0
        if self.vote is not None:
            signum = self.vote.settle(signum) if settle else self.vote.poll(signum)
        return signum


def preempt(signum: int, save: Optional[Callable[..., Optional[str]]], logger: logging.Logger) -> None:
    """Save a checkpoint tagged "preempt" (when there is somewhere to save) and raise ``Preempted``."""
    path = save("preempt") if save is not None else None
    if path is None:
        logger.warning("stopping on signal %d with no checkpoint_dir: nothing was saved", signum)
    raise Preempted(signum, None if path is None else str(path))
