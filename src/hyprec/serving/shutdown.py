"""A bounded graceful shutdown: open requests get ``shutdown_timeout`` seconds after SIGTERM or SIGINT, then fail.

Uvicorn's own handler stops accepting and then waits for open requests however long they take, so one long
stream could hold the server's exit forever; :class:`GracefulShutdown` bounds that wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from hyprec.serving.worker import EngineWorker, ShutdownError

log = logging.getLogger("hyprec")


class GracefulShutdown:
    """The grace period of one server's shutdown: :meth:`begin` starts it; when it ends, every request still in
    ``worker`` fails with a :class:`ShutdownError` (a stream with an error event)."""

    def __init__(self, worker: EngineWorker, timeout: float) -> None:
        self.worker, self.timeout = worker, timeout
        self._timer: asyncio.TimerHandle | None = None  # set once: a second signal does not extend the grace

    def begin(self) -> None:
        """Start the grace period (on the running event loop); a no-op once begun."""
        if self._timer is not None:
            return
        log.info("hyprec: shutting down; open requests get %g s to finish", self.timeout)
        error = ShutdownError(f"the server is shutting down (open requests got {self.timeout:g} s)")
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self.worker.fail_all, error)

    def cancel(self) -> None:
        """Stop the grace period's timer (the server has stopped before it ran out)."""
        if self._timer is not None:
            self._timer.cancel()


def on_termination(callback: Callable[[], None]) -> Callable[[], None]:
    """Also run ``callback`` (on this event loop) when SIGTERM or SIGINT arrives, before the handler the server
    installed (uvicorn's: stop accepting, then wait for open requests, however long they take). Returns the
    function that restores that handler.

    Nothing is chained where there is no such handler (default or ignored signals: no graceful wait to bound) or
    outside the main thread (only it may set handlers: hosts such as Ray Serve run the app elsewhere).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    chained: dict[int, tuple[Any, Any]] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous) or previous is signal.default_int_handler:
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(callback)  # a signal handler may interrupt the loop anywhere: schedule
            previous(signum, frame)

        signal.signal(sig, handler)
        chained[sig] = (handler, previous)

    def restore() -> None:
        for sig, (handler, previous) in chained.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return restore
