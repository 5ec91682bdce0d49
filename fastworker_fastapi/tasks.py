"""`@background_task`: register a function as a task and get a typed handle to submit it.

The function is registered twice: in this package's registry (with its retry and timeout
policy) and in fastworker's own `task_registry`, so the same module can be loaded by a
`fastworker control-plane --task-modules ...` process unchanged.

The handle is typed with `ParamSpec` (as taskiq does): `await send_email.delay(user_id=1)` is
checked against `send_email`'s signature. Per-call options never mix with the task's own
keyword arguments: `await send_email.options(priority="high").delay(1)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from fastworker.tasks.models import TaskPriority, TaskResult
from fastworker.tasks.registry import task_registry as fastworker_registry

from fastworker_fastapi._context import resolve_client
from fastworker_fastapi.errors import ConfigurationError
from fastworker_fastapi.records import TaskPolicy

if TYPE_CHECKING:
    from fastworker_fastapi.client import TaskClient
    from fastworker_fastapi.periodic import MissedPolicy

__all__ = ["BackgroundTask", "TaskCall", "TaskDefinition", "TaskRegistry", "background_task"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class TaskDefinition:
    """A registered task: its function and how it runs by default."""

    name: str
    func: Callable[..., Any]
    is_async: bool
    policy: TaskPolicy
    priority: TaskPriority = TaskPriority.NORMAL
    # fastworker's `@task(before=..., after=...)` hooks: each gets the attempt's `Task`.
    before: Callable[..., Any] | None = None
    after: Callable[..., Any] | None = None
    # A coroutine function without hooks: running it is calling it (worked out once here,
    # read once per task by the scheduler).
    plain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain = self.is_async and self.before is None and self.after is None
        object.__setattr__(self, "plain", plain)  # frozen: set once, here


class TaskRegistry:
    """Task definitions by name.

    Definitions are code, like routes on a module-level router, so one registry per process
    is right; what must not be global is the *running* state, which lives in each extension.
    A name registered only with fastworker's own `@task` decorator is found too (with the
    default policy), so FastWorker task modules work as they are.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition] = {}

    def register(self, definition: TaskDefinition) -> None:
        existing = self._tasks.get(definition.name)
        if existing is not None and not _same_function(existing.func, definition.func):
            raise ConfigurationError(
                f"a task named {definition.name!r} is already registered "
                f"({existing.func.__module__}.{existing.func.__qualname__}); "
                "give one of them another name: @background_task(name=...)"
            )
        self._tasks[definition.name] = definition
        fastworker_registry.register(definition.func, definition.name)

    def get(self, name: str) -> TaskDefinition | None:
        definition = self._tasks.get(name)
        if definition is not None:
            return definition
        info = fastworker_registry.get_task_info(name)
        if info is None:
            return None
        return TaskDefinition(
            name=name,
            func=info.func,
            is_async=inspect.iscoroutinefunction(info.func),
            policy=TaskPolicy(),
            before=info.before,
            after=info.after,
        )

    def names(self) -> list[str]:
        return sorted(set(self._tasks) | set(fastworker_registry.list_tasks()))

    def definitions(self) -> list[TaskDefinition]:
        return list(self._tasks.values())


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same function, possibly re-imported (reloads, tests importing a module twice)."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


registry = TaskRegistry()


@dataclass(frozen=True, slots=True)
class _CallOptions:
    priority: TaskPriority | str | None = None
    countdown: float | None = None
    eta: datetime | None = None
    callback: str | None = None
    callback_data: dict[str, Any] | None = None
    client: TaskClient | None = None


class TaskCall[**P, R]:
    """A handle with per-call options applied; made by `BackgroundTask.options()`."""

    def __init__(self, task: BackgroundTask[P, R], options: _CallOptions) -> None:
        self._task = task
        self._options = options

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Submit the task and return its id at once."""
        return await self._submit(self._client(), args, kwargs)

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskResult:
        """Submit the task and wait for its final `TaskResult`."""
        client = self._client()
        return await client.wait(await self._submit(client, args, kwargs))

    def _client(self) -> TaskClient:
        client = self._options.client
        return client if client is not None else resolve_client()

    async def _submit(self, client: TaskClient, args: Any, kwargs: Any) -> str:
        o = self._options
        return await client._submit(
            self._task.name,
            args,
            kwargs,
            o.priority,
            o.eta,
            o.countdown,
            callback_address=o.callback,
            callback_data=o.callback_data,
        )


class BackgroundTask[**P, R]:
    """The handle `@background_task` returns: call it to run inline, `.delay()` to queue."""

    def __init__(self, definition: TaskDefinition) -> None:
        self.definition = definition
        self.name = definition.name
        self.__wrapped__ = definition.func
        self.__doc__ = definition.func.__doc__
        self.__name__ = getattr(definition.func, "__name__", definition.name)
        self.__qualname__ = getattr(definition.func, "__qualname__", definition.name)
        self.__module__ = definition.func.__module__

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, as if it were not a task."""
        result: R = self.definition.func(*args, **kwargs)
        return result

    def __repr__(self) -> str:
        return f"<BackgroundTask {self.name!r}>"

    def options(
        self,
        *,
        priority: TaskPriority | str | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        callback: str | None = None,
        callback_data: dict[str, Any] | None = None,
        client: TaskClient | None = None,
    ) -> TaskCall[P, R]:
        """Per-call options: priority, countdown/eta, a completion callback, the client."""
        return TaskCall(
            self,
            _CallOptions(priority, countdown, eta, callback, callback_data, client),
        )

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Submit the task and return its id at once."""
        if not kwargs:  # the client's own `delay`, whose keywords are options: none here
            return await resolve_client().delay(self.name, *args)
        return await TaskCall(self, _DEFAULT_OPTIONS).delay(*args, **kwargs)

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskResult:
        """Submit the task and wait for its final `TaskResult`."""
        return await TaskCall(self, _DEFAULT_OPTIONS).submit(*args, **kwargs)


_DEFAULT_OPTIONS = _CallOptions()


@overload
def background_task[**P, R](func: Callable[P, R], /) -> BackgroundTask[P, R]: ...


@overload
def background_task(
    *,
    name: str | None = None,
    priority: TaskPriority | str = TaskPriority.NORMAL,
    timeout: float | None = None,
    max_retries: int = 0,
    retry_delay: float = 60.0,
    retry_backoff: float = 2.0,
    retry_backoff_max: float = 3600.0,
    cron: str | None = None,
    every: timedelta | float | None = None,
    tz: str | tzinfo | None = None,
    jitter: float | timedelta | None = None,
    enabled: bool | None = None,
    missed: MissedPolicy | None = None,
) -> Callable[[Callable[P, R]], BackgroundTask[P, R]]: ...


def background_task[**P, R](
    func: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    priority: TaskPriority | str = TaskPriority.NORMAL,
    timeout: float | None = None,
    max_retries: int = 0,
    retry_delay: float = 60.0,
    retry_backoff: float = 2.0,
    retry_backoff_max: float = 3600.0,
    cron: str | None = None,
    every: timedelta | float | None = None,
    tz: str | tzinfo | None = None,
    jitter: float | timedelta | None = None,
    enabled: bool | None = None,
    missed: MissedPolicy | None = None,
) -> BackgroundTask[P, R] | Callable[[Callable[P, R]], BackgroundTask[P, R]]:
    """Register a sync or async function as a background task.

    Use it bare (`@background_task`, registered under the function's name) or with options
    (`@background_task(name="reports.build", max_retries=3, timeout=60)`). Sync functions
    run in worker threads, async ones on the event loop; neither blocks the app.

    `cron="*/5 * * * *"` or `every=timedelta(minutes=5)` also runs it periodically, once
    per due time across every process sharing the store; `tz`, `jitter`, `enabled` and
    `missed` tune that schedule (see `schedule()` in docs/periodic.md, which also takes
    arguments for the runs).
    """
    from fastworker_fastapi.client import parse_priority

    policy = _make_policy(timeout, max_retries, retry_delay, retry_backoff, retry_backoff_max)
    default_priority = parse_priority(priority)
    extra = {
        key: value
        for key, value in (("tz", tz), ("jitter", jitter), ("enabled", enabled), ("missed", missed))
        if value is not None
    }
    periodic: dict[str, Any] = {}
    if cron is not None or every is not None:
        periodic = {"cron": cron, "every": every, **extra}

    def decorate(f: Callable[P, R]) -> BackgroundTask[P, R]:
        if not callable(f):
            raise ConfigurationError(f"@background_task needs a function, got {f!r}")
        definition = TaskDefinition(
            name=name if name is not None else f.__name__,
            func=f,
            is_async=inspect.iscoroutinefunction(f),
            policy=policy,
            priority=default_priority,
        )
        registry.register(definition)
        handle: BackgroundTask[P, R] = BackgroundTask(definition)
        if periodic:
            from fastworker_fastapi.periodic import schedule

            schedule(handle, **periodic)
        elif extra:
            raise ConfigurationError(
                f"@background_task: {', '.join(sorted(extra))} apply to a schedule;"
                " give cron= or every= too"
            )
        return handle

    if func is not None:
        return decorate(func)
    return decorate


def _make_policy(
    timeout: float | None,
    max_retries: int,
    retry_delay: float,
    retry_backoff: float,
    retry_backoff_max: float,
) -> TaskPolicy:
    if timeout is not None and timeout <= 0:
        raise ConfigurationError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    if max_retries < 0:
        raise ConfigurationError(f"max_retries must be >= 0, got {max_retries!r}")
    if retry_delay < 0 or retry_backoff < 1 or retry_backoff_max < 0:
        raise ConfigurationError(
            "retry_delay and retry_backoff_max must be >= 0 and retry_backoff >= 1"
        )
    return TaskPolicy(
        timeout=timeout,
        max_retries=max_retries,
        retry_delay=retry_delay,
        retry_backoff=retry_backoff,
        retry_backoff_max=retry_backoff_max,
    )
