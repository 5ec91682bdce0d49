"""The status routes mounted under the extension's prefix (default `/tasks`).

Each extension builds its own router bound to its own client, so two apps never share state;
the router knows the client and its settings, not the extension. Every route reads the store,
so any process of the app answers for tasks submitted in any other. The id routes match
only UUIDs (`{task_id:uuid}`), so they never take a fixed path (`/tasks/events`,
`/tasks/dashboard`, ...): `DELETE /tasks/events` is a 405 and `/tasks/not-an-id` a 404.
They come first, after the list: a status poll is the request these routes get most, and
FastAPI tries routes one by one at a few microseconds each. These routes take their client
from the router, not from a dependency (FastAPI spends more than ten microseconds a request
on any dependency). Routes the app declares itself for the same path and method take
precedence over these (see `_yielding`).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Path, Query
from fastapi.params import Depends as DependsParam
from fastapi.routing import APIRoute
from fastworker.tasks.models import TaskStatus
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Router
from starlette.types import Scope

from fastworker_fastapi._yielding import yielding_route_class
from fastworker_fastapi.client import TaskClient
from fastworker_fastapi.dashboard import add_dashboard_route
from fastworker_fastapi.errors import NotRunningError, TaskNotFoundError
from fastworker_fastapi.live import add_event_routes
from fastworker_fastapi.models import TaskInfo, TaskList, task_json
from fastworker_fastapi.periodic import PeriodicTasks, add_schedule_routes

__all__ = ["ErrorDetail", "RouteSettings", "build_router"]


class ErrorDetail(BaseModel):
    """The body of every error answer: what went wrong and, where it helps, what to do."""

    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RouteSettings:
    """What the status routes need besides the client."""

    prefix: str
    dependencies: Sequence[DependsParam] = ()
    tags: Sequence[str] = ("tasks",)
    dashboard: bool = True
    event_heartbeat: float = 15.0
    event_buffer: int = 256
    app_router: Router | None = None  # the app's own routes there take precedence
    schedules: PeriodicTasks | None = None


TaskId = Annotated[UUID, Path(description="The id returned by delay() / submit_task().")]

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorDetail, "description": "Unknown or expired task id."},
    503: {"model": ErrorDetail, "description": "The extension is not running."},
}


class _JSON(JSONResponse):
    """JSON built by the route itself (one serialisation per record), documented as the
    route's `response_model` like any JSON answer."""

    def render(self, content: Any) -> bytes:
        return content.encode("utf-8") if isinstance(content, str) else super().render(content)


class _StatusRouter(APIRouter):
    """Refuses a path without its prefix before FastAPI matches each of its routes: the app
    includes this router ahead of its own routes, so every request asks it first (about
    20 us a request otherwise, measured with `make bench`)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if self.prefix not in scope["path"]:
            return Match.NONE, {}
        return super().matches(scope)


def build_router(client: TaskClient, settings: RouteSettings) -> APIRouter:
    """The status router of one extension's `client`; `settings.dependencies` guard every
    route (auth...)."""

    def running() -> TaskClient:
        if not client.started:
            raise NotRunningError("the FastWorker extension has not started yet")
        return client

    async def started() -> TaskClient:
        """`running()` as a dependency (the schedule routes'). An `async def`: FastAPI runs
        a plain `def` dependency in its thread pool, a hop on every request."""
        return running()

    router = _StatusRouter(
        prefix=settings.prefix,
        dependencies=list(settings.dependencies),
        tags=list(settings.tags),
        route_class=APIRoute
        if settings.app_router is None
        else yielding_route_class(settings.app_router, settings.prefix),
    )

    @router.get(
        "",
        response_model=TaskList,
        response_class=_JSON,
        summary="List recent tasks",
        responses={503: _ERRORS[503]},
    )
    async def list_tasks(
        status: Annotated[TaskStatus | None, Query(description="Only this status.")] = None,
        name: Annotated[str | None, Query(description="Only tasks with this name.")] = None,
        limit: Annotated[int, Query(ge=1, le=500, description="At most this many.")] = 50,
    ) -> Response:
        """Recent tasks of every process, newest first (finished ones are kept up to
        `result_ttl`)."""
        records = await running().store.recent(limit=limit, status=status, name=name)
        body = ",".join(task_json(record) for record in records)
        return _JSON(f'{{"tasks":[{body}],"count":{len(records)}}}')

    @router.get(
        "/{task_id:uuid}",
        response_model=TaskInfo,
        response_class=_JSON,
        summary="Get a task's status",
        responses=_ERRORS,
    )
    async def get_task(task_id: TaskId) -> Response:
        """The task's status, attempts, timings, result or error, progress and callback."""
        record = await running().store.get(str(task_id))
        if record is None:
            raise TaskNotFoundError(f"no task with id {task_id} (unknown or expired)")
        return _JSON(task_json(record))

    @router.delete(
        "/{task_id:uuid}",
        response_model=TaskInfo,
        response_class=_JSON,
        summary="Cancel a task",
        responses={
            **_ERRORS,
            409: {"model": ErrorDetail, "description": "The task already finished."},
        },
    )
    async def cancel_task(task_id: TaskId) -> Response:
        """Cancel a queued, scheduled or running task, in whichever process runs it; 409
        once it has finished. Answers with the task's state once it is final (or, when
        another process runs it, after at most ~2 s with `status` as it then stands)."""
        record = await running().scheduler.cancel(str(task_id))
        return _JSON(task_json(record))

    add_event_routes(
        router, running, heartbeat=settings.event_heartbeat, max_buffer=settings.event_buffer
    )
    if settings.dashboard:
        add_dashboard_route(router)
    if settings.schedules is not None:
        add_schedule_routes(router, started, settings.schedules, _ERRORS)

    return router
