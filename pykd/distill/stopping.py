"""Stopping a training run cleanly on SIGINT or SIGTERM.

The handlers only record the request; the training loop finishes the step in flight, writes a
checkpoint at that step boundary and raises `TrainingInterrupted`, so resuming replays nothing
and loses nothing. No heavy imports: the command line catches the exception without the KD extra.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training at a step boundary, after a checkpoint was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
                         "(run the same command again to resume)")

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class NonFiniteTraining(ValueError):
    """A loss term or the gradient norm of an optimiser step was NaN or infinite: the step was not applied,
    and the run stopped with its last checkpoint as it was (pykd.distill.callbacks.NonFiniteStop)."""


class StopRequests:
    """While active, SIGINT and SIGTERM only record a request to stop, which the loop honours at the
    next step boundary; the first one also restores the previous handlers, so a second signal stops
    the process as it would without pykd. Signal handlers exist only in the main thread: elsewhere
    this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._request) for number in self.SIGNALS}
        return self

    def _request(self, signum, frame) -> None:
        self.signum = signum
        self._restore()
        print(f"pykd: {signal.Signals(signum).name} received: stopping with a checkpoint after the current step "
              "(send it again to stop at once, losing the steps since the last checkpoint)", file=sys.stderr,
              flush=True)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
