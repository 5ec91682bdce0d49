"""Which client a task handle talks to, without a process-wide "current app".

A handle's `.delay()` has no client argument, so it looks one up, in this order:

1. the client bound to the current context: set for a request by `get_fastworker` (the
   `TaskClientDep` dependency; no per-request middleware) and inside every task the
   extension runs, so two apps in one process each reach their own client;
2. otherwise, the only running client in the process (scripts, tests, CLI commands);
3. otherwise a `NotRunningError` that says which case it is and how to fix it.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING

from fastworker_fastapi.errors import NotRunningError

if TYPE_CHECKING:
    from fastworker_fastapi.client import TaskClient
    from fastworker_fastapi.scheduler import _Run

current_client: ContextVar[TaskClient | None] = ContextVar(
    "fastworker_fastapi_client", default=None
)
current_run: ContextVar[_Run | None] = ContextVar("fastworker_fastapi_run", default=None)
"""The run of the task executing in this context (set by the scheduler's worker loop)."""

_running: weakref.WeakSet[TaskClient] = weakref.WeakSet()
# The client when exactly one is registered: `resolve_client` then skips walking the
# WeakSet (Python code) on every handle's `.delay()` outside a request that bound one.
_sole: weakref.ref[TaskClient] | None = None


def mark_running(client: TaskClient) -> None:
    _running.add(client)
    _find_sole()


def mark_stopped(client: TaskClient) -> None:
    _running.discard(client)
    _find_sole()


def _find_sole() -> None:
    global _sole
    clients = list(_running)
    _sole = weakref.ref(clients[0]) if len(clients) == 1 else None


def resolve_client() -> TaskClient:
    client = current_client.get()
    if client is not None and client.running:
        return client
    sole = _sole() if _sole is not None else None
    if sole is not None and sole.running:
        return sole
    running = [c for c in _running if c.running]
    if len(running) == 1:
        return running[0]
    if not running:
        raise NotRunningError(
            "No running FastWorker extension: start the app's lifespan first (uvicorn does; "
            "in tests use asgi_lifespan.LifespanManager or `with TestClient(app)`)."
        )
    raise NotRunningError(
        f"{len(running)} FastWorker extensions are running and this call is not inside a "
        "request or task of one of them; pick one explicitly: "
        "`await handle.options(client=fw.client).delay(...)`."
    )
