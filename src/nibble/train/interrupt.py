"""Ctrl-C and SIGTERM during training: the first asks the loop to stop after the current step (which then
writes a checkpoint and raises :class:`nibble.errors.Interrupted`); a second stops the run at once."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from nibble.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """While the ``with`` block runs (in the main thread), SIGINT/SIGTERM set :attr:`signum` instead of
    stopping the process; a second signal raises :class:`Interrupted` (``step=None``) wherever the code is.
    The previous handlers come back on exit. Elsewhere than the main thread it does nothing (Python only
    delivers signals there). ``speak`` False keeps the first signal's line unsaid (ranks other than 0)."""

    def __init__(self, speak: bool = True) -> None:
        self.signum: int | None = None
        self.speak = speak  # whether the first signal prints its line (under torchrun: rank 0 alone)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        if not self.speak:
            return
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping after this step with a checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
