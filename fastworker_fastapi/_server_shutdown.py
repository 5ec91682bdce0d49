"""Notice that the server has begun to shut down, to end event streams then.

uvicorn, on SIGTERM, stops accepting and then waits for every open connection to finish
*before* it runs the lifespan shutdown, so streams that never end by themselves (`GET
/tasks/events`, the dashboard's) would hold it for ever. This module installs no signal
handler: it *reads* the handler uvicorn installed (`Server.handle_exit`, a bound method) to
find the server, and watches its `should_exit` flag at the pace of uvicorn's own main loop.
Under another server nothing is found, and `FastWorker.end_event_streams()` does the same on
demand.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio

__all__ = ["find_server_exit_flag", "watch"]

_INTERVAL = 0.1  # uvicorn's main loop checks `should_exit` every 0.1 s too


def find_server_exit_flag() -> Callable[[], bool] | None:
    """A function telling whether the server has begun its shutdown, or None if unknown."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            handler = signal.getsignal(sig)
        except ValueError:  # pragma: no cover - not a signal on this platform
            continue
        server = getattr(handler, "__self__", None)
        if isinstance(getattr(server, "should_exit", None), bool):
            return lambda: bool(server.should_exit)  # type: ignore[union-attr]
    return None


async def watch(should_exit: Callable[[], bool], on_exit: Callable[[], None]) -> None:
    """Call `on_exit()` once `should_exit()` turns true (cancel to stop watching)."""
    while not should_exit():  # noqa: ASYNC110 - a flag of the server's, nothing to await
        await anyio.sleep(_INTERVAL)
    on_exit()
