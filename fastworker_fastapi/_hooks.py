"""fastworker's `@task(before=..., after=...)` hooks, called in-process as its worker does.

fastworker's worker, for each attempt of a task:

```
status RUNNING, started_at set ──► before(task) ──► the function ──► after(task) ──► SUCCESS
                                       │ raises         │ raises         │ raises
                                       ▼                ▼                ▼
                                    FAILURE (the function does not run; `after` is skipped)
```

Both hooks get the same `fastworker.tasks.models.Task` describing the attempt (id, name,
args, kwargs, priority, `status` RUNNING, `started_at`, `retry_count`, the retry and timeout
policy, the callback); `after` runs only when the function succeeded and sees no result. A
hook that raises fails the attempt like the function raising would (and the task's retry
policy applies). Async hooks are awaited on the event loop; sync ones run in a worker
thread, as sync tasks do, so a slow hook never blocks the app. One difference: the task's
`timeout` covers its hooks too (fastworker times the function alone).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from fastworker.tasks.models import Task, TaskStatus

if TYPE_CHECKING:
    from fastworker_fastapi.records import TaskRecord
    from fastworker_fastapi.tasks import TaskDefinition

__all__ = ["fastworker_task", "run_with_hooks"]


def fastworker_task(record: TaskRecord) -> Task:
    """The running attempt as fastworker's `Task` model: what its hooks receive."""
    policy = record.policy
    return Task(
        id=record.id,
        name=record.name,
        args=tuple(record.args),
        kwargs=dict(record.kwargs),
        priority=record.priority,
        created_at=record.created_at,
        started_at=record.started_at,
        status=TaskStatus.RUNNING,
        callback=record.callback,
        retry_count=max(record.attempts - 1, 0),
        max_retries=policy.max_retries,
        retry_delay=policy.retry_delay,
        retry_backoff=policy.retry_backoff,
        retry_backoff_max=policy.retry_backoff_max,
        timeout=policy.timeout,
        eta=record.eta,
    )


async def run_with_hooks(
    definition: TaskDefinition,
    record: TaskRecord,
    call: Callable[[], Awaitable[Any]],
    limiter: anyio.CapacityLimiter | None,
) -> Any:
    """`before`, then `call()` (the function), then `after` on success: one attempt."""
    task = fastworker_task(record)
    if definition.before is not None:
        await _call_hook(definition.before, task, limiter)
    value = await call()
    if definition.after is not None:
        await _call_hook(definition.after, task, limiter)
    return value


async def _call_hook(
    hook: Callable[..., Any], task: Task, limiter: anyio.CapacityLimiter | None
) -> None:
    if inspect.iscoroutinefunction(hook):
        await hook(task)
    else:
        await anyio.to_thread.run_sync(hook, task, abandon_on_cancel=True, limiter=limiter)
