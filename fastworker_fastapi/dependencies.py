"""`get_fastworker`: the running `TaskClient` of the app that serves the request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from fastworker_fastapi import _context
from fastworker_fastapi.client import TaskClient
from fastworker_fastapi.errors import NotRunningError

if TYPE_CHECKING:
    from fastworker_fastapi.extension import FastWorker

__all__ = ["TaskClientDep", "get_fastworker"]


async def get_fastworker(connection: HTTPConnection) -> TaskClient:
    """Dependency: `client: Annotated[TaskClient, Depends(get_fastworker)]`.

    An `async def`, so FastAPI calls it on the event loop (a plain `def` would cost a trip
    through its thread pool on every request). Finds the client attached to `request.app`,
    else (a mounted sub-application) the only running one, and binds it to the request's
    context, so a task handle's `.delay()` in the same route talks to this app's client.
    Raises `NotRunningError` (a 503) when the app's lifespan has not started. While the app
    shuts down the client is still returned: reads work, submissions raise
    `ShuttingDownError`.
    """
    extension: FastWorker | None = getattr(connection.app.state, "fastworker", None)
    client: TaskClient | None
    if extension is not None:
        client = extension.client
    else:
        client = _context.current_client.get() or _only_running()
        if client is None:
            raise NotRunningError(
                "no FastWorker extension is attached to this app: create one with "
                "FastWorker(app) (or fw.init_app(app)) before serving requests"
            )
    if not client.started:
        raise NotRunningError(
            "the FastWorker extension is not running: the app's lifespan has not started "
            "(in tests, use asgi_lifespan.LifespanManager or `with TestClient(app)`)"
        )
    _context.current_client.set(client)  # this request's context only (its own task)
    return client


def _only_running() -> TaskClient | None:
    try:
        return _context.resolve_client()
    except NotRunningError:
        return None


TaskClientDep = Annotated[TaskClient, Depends(get_fastworker)]
"""`client: TaskClientDep` in a route's signature injects this app's `TaskClient`."""
