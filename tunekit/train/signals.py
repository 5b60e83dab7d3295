"""Graceful stop on SIGINT / SIGTERM: finish the step, checkpoint, exit cleanly.

``StopOnSignal`` installs handlers only inside its ``with`` block and puts
the previous ones back on exit, so importing tunekit changes nothing and a
second Ctrl-C after the first falls through to the previous handler (the
usual "press again to force quit").

One rank of a multi-process job (``repeat_quits=False``) ignores repeats
instead: a Ctrl-C in a terminal reaches every worker and then the launcher
forwards it once more, and that second signal must not break the checkpoint
being written; the launcher's grace period (then SIGKILL) is the force quit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager whose ``requested`` turns true when SIGINT or SIGTERM arrives.

    Example:
        >>> with StopOnSignal() as stop:
        ...     stop.requested
        False
    """

    def __init__(self, repeat_quits: bool = True) -> None:
        self.repeat_quits = repeat_quits
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        # A second signal gets the previous behaviour (e.g. KeyboardInterrupt): a way out if a step hangs.
        if self.repeat_quits:
            signal.signal(signum, self._previous[signum])

    def __enter__(self) -> StopOnSignal:
        # signal.signal only works in the main thread; elsewhere (a notebook worker) run without it.
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                previous = signal.signal(sig, self._handle)
                # None means a handler installed from C: the closest Python equivalent is the default.
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
