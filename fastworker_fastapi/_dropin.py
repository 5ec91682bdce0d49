"""The convenience methods of fastworker's own FastAPI glue, on our `FastWorker`.

`fastworker.integration.fastapi.FastWorker` lets routes call `await fw.delay(...)` and
friends, and offers `fw.worker_count` for health checks. Ours offers the same names, each
delegating to `fw.client` (the app's `TaskClient`), so code written for it runs unchanged
after the import is swapped. They work while the app's lifespan runs, like the client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastworker.tasks.models import TaskPriority, TaskResult, TaskStatus

from fastworker_fastapi.errors import ConfigurationError

if TYPE_CHECKING:
    from fastworker_fastapi.client import TaskClient

__all__ = ["CLIENT_KWARGS", "ClientMethods", "check_client_kwargs"]

# What fastworker's `Client(...)` takes. None of it applies in-process (there is no
# discovery bus, no serialisation and no socket to time out); with `RemoteWorkers`, the
# discovery address and timeouts are set on `RemoteWorkers(...)` instead.
CLIENT_KWARGS = frozenset({"discovery_address", "serialization_format", "timeout", "retries"})


def check_client_kwargs(client_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of `client_kwargs`, refusing names fastworker's `Client` would not take."""
    if client_kwargs is None:
        return {}
    unknown = sorted(set(client_kwargs) - CLIENT_KWARGS)
    if unknown:
        raise ConfigurationError(
            f"unknown client_kwargs {unknown}: fastworker's Client takes only "
            f"{sorted(CLIENT_KWARGS)} (and none of them applies to in-process workers)"
        )
    return dict(client_kwargs)


class ClientMethods:
    """`fw.delay(...)`, `fw.submit_task(...)`, ...: each the same as on `fw.client`."""

    client: TaskClient

    @property
    def worker_count(self) -> int:
        """How many tasks can run at once now (the workers' concurrency); 0 unless running.

        fastworker's glue counts discovered worker processes; a health check that wants it
        above zero works the same.
        """
        client = self.client
        return client.scheduler.executor.concurrency if client.running else 0

    async def delay(
        self,
        task_name: str,
        *args: Any,
        priority: TaskPriority | str | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
        **kwargs: Any,
    ) -> str:
        """`TaskClient.delay`: submit, return the task id at once."""
        return await self.client.delay(
            task_name, *args, priority=priority, eta=eta, countdown=countdown, **kwargs
        )

    async def submit_task(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        priority: TaskPriority | str | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
    ) -> TaskResult:
        """`TaskClient.submit_task`: submit and wait for the final `TaskResult`."""
        return await self.client.submit_task(task_name, args, kwargs, priority, eta, countdown)

    async def delay_with_callback(
        self,
        task_name: str,
        callback_address: str,
        *args: Any,
        callback_data: dict[str, Any] | None = None,
        priority: TaskPriority | str | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
        **kwargs: Any,
    ) -> str:
        """`TaskClient.delay_with_callback`: submit with a completion callback."""
        return await self.client.delay_with_callback(
            task_name,
            callback_address,
            *args,
            callback_data=callback_data,
            priority=priority,
            eta=eta,
            countdown=countdown,
            **kwargs,
        )

    async def submit_batch(
        self,
        tasks: Sequence[Mapping[str, Any]],
        default_priority: TaskPriority | str = TaskPriority.NORMAL,
    ) -> list[str]:
        """`TaskClient.submit_batch`: all of them accepted, or none."""
        return await self.client.submit_batch(tasks, default_priority)

    async def get_task_result(self, task_id: str) -> TaskResult | None:
        """`TaskClient.get_task_result`: None, `PENDING` until final, then final."""
        return await self.client.get_task_result(task_id)

    def get_result(self, task_id: str) -> TaskResult | None:
        """`TaskClient.get_result`: the same, without awaiting."""
        return self.client.get_result(task_id)

    def get_status(self, task_id: str) -> TaskStatus | None:
        """`TaskClient.get_status`: the fine status, or None for an unknown id."""
        return self.client.get_status(task_id)

    async def cancel_task(self, task_id: str) -> bool:
        """`TaskClient.cancel_task`: False when unknown or already finished."""
        return await self.client.cancel_task(task_id)
