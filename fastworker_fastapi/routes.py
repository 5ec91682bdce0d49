"""The status routes mounted under the extension's prefix (default `/tasks`).

Each extension builds its own router bound to its own client, so two apps never share state.
Fixed paths (`/tasks/events`, `/tasks/dashboard`, ...) are added before the id routes,
and the id routes match only UUIDs (`{task_id:uuid}`), so `DELETE /tasks/events` is a 405
and `/tasks/not-an-id` a 404. Routes the app declares itself for the same path and method
take precedence over these (see `_yielding`).
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query
from fastapi.params import Depends as DependsParam
from fastworker.tasks.models import TaskStatus
from pydantic import BaseModel

from fastworker_fastapi._yielding import yielding_route_class
from fastworker_fastapi.client import TaskClient
from fastworker_fastapi.errors import NotRunningError, TaskNotFoundError
from fastworker_fastapi.models import TaskInfo, TaskList

if TYPE_CHECKING:
    from fastworker_fastapi.extension import FastWorker

__all__ = ["ErrorDetail", "build_router"]


class ErrorDetail(BaseModel):
    """The body of every error answer: what went wrong and, where it helps, what to do."""

    detail: str


TaskId = Annotated[UUID, Path(description="The id returned by delay() / submit_task().")]

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorDetail, "description": "Unknown or expired task id."},
    503: {"model": ErrorDetail, "description": "The extension is not running."},
}


def build_router(
    extension: "FastWorker", prefix: str, dependencies: Sequence[DependsParam] = ()
) -> APIRouter:
    """The status router of one extension; `dependencies` guard every route (auth...)."""

    def client() -> TaskClient:
        if not extension.client.started:
            raise NotRunningError("the FastWorker extension has not started yet")
        return extension.client

    Client = Annotated[TaskClient, Depends(client)]
    assert extension.app is not None
    router = APIRouter(
        prefix=prefix,
        dependencies=list(dependencies),
        tags=list(extension.tags),
        route_class=yielding_route_class(extension.app.router),
    )

    @router.get(
        "",
        response_model=TaskList,
        summary="List recent tasks",
        responses={503: _ERRORS[503]},
    )
    async def list_tasks(
        client: Client,
        status: Annotated[TaskStatus | None, Query(description="Only this status.")] = None,
        name: Annotated[str | None, Query(description="Only this task name.")] = None,
        limit: Annotated[int, Query(ge=1, le=500, description="At most this many.")] = 50,
    ) -> TaskList:
        """Recent tasks, newest first (finished ones are kept up to `result_ttl`)."""
        records = client.store.recent(limit=limit, status=status, name=name)
        return TaskList(tasks=[TaskInfo.from_record(r) for r in records], count=len(records))

    extension._add_fixed_routes(router)

    @router.get(
        "/{task_id:uuid}",
        response_model=TaskInfo,
        summary="Get a task's status",
        responses=_ERRORS,
    )
    async def get_task(task_id: TaskId, client: Client) -> TaskInfo:
        """The task's status, attempts, timings, result or error, progress and callback."""
        info = client.get_info(str(task_id))
        if info is None:
            raise TaskNotFoundError(f"no task with id {task_id} (unknown or expired)")
        return info

    @router.delete(
        "/{task_id:uuid}",
        response_model=TaskInfo,
        summary="Cancel a task",
        responses={
            **_ERRORS,
            409: {"model": ErrorDetail, "description": "The task already finished."},
        },
    )
    async def cancel_task(task_id: TaskId, client: Client) -> TaskInfo:
        """Cancel a queued, scheduled or running task; 409 once it has finished."""
        record = client.scheduler.cancel(str(task_id))
        return TaskInfo.from_record(record)

    return router
