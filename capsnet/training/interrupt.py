"""Ctrl-C (SIGINT) and SIGTERM as a request to stop cleanly after the current step.

A KeyboardInterrupt raised in the middle of ``optimizer.step()`` could leave some
parameters updated and others not; saving that state would corrupt the run. Instead the
first signal only sets a flag, which the training loop checks between steps: it then saves
a checkpoint and exits. A second Ctrl-C restores Python's default handler and interrupts
at once, without saving.

SIGTERM is handled the same way because ``torchrun`` forwards a Ctrl-C to its workers as
SIGTERM, and batch schedulers send SIGTERM before killing a job.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType


class StopRequest:
    """A flag set by a signal (or by code, e.g. :meth:`request`) and read by the loop."""

    def __init__(self) -> None:
        self._requested = False
        self.reason = ""

    @property
    def requested(self) -> bool:
        return self._requested

    def request(self, reason: str = "requested") -> None:
        self._requested = True
        self.reason = reason


class GracefulInterrupt:
    """Context manager that turns SIGINT/SIGTERM into :class:`StopRequest` ``.request()``.

    Only installs handlers in the main thread (Python allows no others); elsewhere it does
    nothing, and the default behaviour stays.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: StopRequest, announce: bool = True) -> None:
        self.stop = stop
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self.stop

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stop.requested and signum == signal.SIGINT:
            # Second Ctrl-C: the user does not want to wait for the checkpoint.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.stop.request(name)
        if self.announce:
            print(
                f"\n{name} received: stopping after the current step and saving a checkpoint "
                "(press Ctrl-C again to quit without saving).",
                file=sys.stderr,
                flush=True,
            )
