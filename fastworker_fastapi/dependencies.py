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


def get_fastworker(connection: HTTPConnection) -> TaskClient:
    """Dependency: `client: Annotated[TaskClient, Depends(get_fastworker)]`.

    Finds the client bound to this request by the extension's middleware (which also works
    in mounted sub-applications), else the one attached to `request.app`. Raises
    `NotRunningError` (a 503) when the app's lifespan has not started. While the app shuts
    down the client is still returned: reads work, submissions raise `ShuttingDownError`.
    """
    client = _context.current_client.get()
    if client is None:
        extension: FastWorker | None = getattr(connection.app.state, "fastworker", None)
        if extension is None:
            raise NotRunningError(
                "no FastWorker extension is attached to this app: create one with "
                "FastWorker(app) (or fw.init_app(app)) before serving requests"
            )
        client = extension.client
    if not client.started:
        raise NotRunningError(
            "the FastWorker extension is not running: the app's lifespan has not started "
            "(in tests, use asgi_lifespan.LifespanManager or `with TestClient(app)`)"
        )
    return client


TaskClientDep = Annotated[TaskClient, Depends(get_fastworker)]
"""`client: TaskClientDep` in a route's signature injects this app's `TaskClient`."""
