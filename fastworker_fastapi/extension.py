"""`FastWorker`: attach background tasks to a FastAPI (or Starlette) app.

```
app lifespan ──► your lifespan start-up ──► FastWorker start-up ──► serve requests
                                            (store, executor, scheduler,
                                             workers in a task group)
app shutdown ◄── your lifespan shutdown ◄── FastWorker drain ◄──────┘
                                            (refuse new tasks, finish running ones
                                             within shutdown_timeout; queued ones stay
                                             in a durable store for the next start)
```

Workers start after the app's own start-up and stop before its shutdown, so tasks can use
whatever the app's lifespan opens (database pools, HTTP clients) for their whole life.
Nothing is global: each extension owns its client, store, scheduler and routes. This module is
the composition root: it is the only one that knows every part.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Unpack

import anyio
from fastapi import FastAPI
from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fastworker_fastapi import _context, _server_shutdown
from fastworker_fastapi._dropin import ClientMethods, check_client_kwargs
from fastworker_fastapi.callbacks import CallbackDispatcher, CallbackSettings
from fastworker_fastapi.client import TaskClient
from fastworker_fastapi.errors import ConfigurationError, FastWorkerError
from fastworker_fastapi.events import EventHub
from fastworker_fastapi.periodic import PeriodicTasks, Schedule, ScheduleOptions
from fastworker_fastapi.progress import ProgressPublisher
from fastworker_fastapi.routes import RouteSettings, build_router
from fastworker_fastapi.scheduler import Scheduler
from fastworker_fastapi.stores import TaskStore, resolve_store
from fastworker_fastapi.tasks import TaskRegistry, registry
from fastworker_fastapi.workers.inprocess import InProcessWorkers

if TYPE_CHECKING:
    from fastapi.params import Depends as DependsParam
    from starlette.applications import Starlette

    from fastworker_fastapi.workers.base import WorkerSettings

__all__ = ["FastWorker"]

logger = logging.getLogger("fastworker_fastapi")

Lifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


class FastWorker(ClientMethods):
    """Background tasks for one app, started and drained by the app's lifespan.

    `FastWorker(app)` attaches at once; `fw = FastWorker(...)` then `fw.init_app(app)` suits
    app factories. Options:

    - `workers`: `InProcessWorkers(concurrency=8)` (the default) or `RemoteWorkers(...)`;
    - `store`: where tasks are kept, shared by every process of the app: a URL
      (`"sqlite:///tasks.db"`, `"postgresql://..."`, `"memory"`) or a store object; by
      default `$FASTWORKER_STORE`, else `sqlite:///fastworker.db` in the working directory;
    - `prefix`: where the status routes go (`"/tasks"`); `None` mounts none;
    - `route_dependencies`: dependencies guarding every status route (auth);
    - `result_ttl`, `max_results`: how long and how many finished tasks are kept;
    - `max_pending`: how many unfinished tasks may wait; beyond it submissions get 503
      (with a durable store, also how many recent final records `wait()` answers from
      memory);
    - `shutdown_timeout`: how long shutdown waits for running and queued tasks;
    - `exception_handlers`: answer this package's errors with their HTTP status and a
      `detail` (on by default);
    - `callbacks`: `CallbackSettings(...)` for completion callbacks (secret, allowed hosts,
      retries, concurrency).
    - `dashboard`: serve the monitoring page at `{prefix}/dashboard` (on by default);
    - `event_heartbeat`: seconds between heartbeats on idle event streams;
    - `event_buffer`: how far behind a stream's client may fall (64 times this many changed
      tasks) before it is dropped with an `overflow` event (changes are coalesced per task);
    - `max_result_bytes`: the largest result (as JSON) a task may return; a larger one
      fails the task with a clear error;
    - `client_kwargs`: accepted for code written for fastworker's own FastAPI glue
      (`discovery_address`, `serialization_format`, `timeout`, `retries`); none applies
      in-process, so they are only checked and kept as `fw.client_kwargs`.

    Like fastworker's glue, it also offers `fw.delay(...)`, `fw.submit_task(...)`,
    `fw.delay_with_callback(...)`, `fw.submit_batch(...)`, `fw.get_task_result(...)`,
    `fw.get_result(...)`, `fw.get_status(...)`, `fw.cancel_task(...)` (each the same as on
    `fw.client`) and `fw.worker_count`.
    """

    def __init__(
        self,
        app: Starlette | None = None,
        *,
        workers: WorkerSettings | None = None,
        store: TaskStore | str | None = None,
        prefix: str | None = "/tasks",
        route_dependencies: Sequence[DependsParam] = (),
        result_ttl: float = 3600.0,
        max_results: int = 10_000,
        max_pending: int = 10_000,
        shutdown_timeout: float = 30.0,
        exception_handlers: bool = True,
        include_in_schema: bool = True,
        tags: Sequence[str] = ("tasks",),
        task_registry: TaskRegistry | None = None,
        callbacks: CallbackSettings | None = None,
        dashboard: bool = True,
        event_heartbeat: float = 15.0,
        event_buffer: int = 256,
        max_result_bytes: int = 1 << 20,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        _require(result_ttl > 0 and math.isfinite(result_ttl), "result_ttl must be > 0")
        _require(max_results >= 1, "max_results must be >= 1")
        _require(max_pending >= 1, "max_pending must be >= 1")
        _require(shutdown_timeout >= 0, "shutdown_timeout must be >= 0")
        _require(
            event_heartbeat > 0 and math.isfinite(event_heartbeat), "event_heartbeat must be > 0"
        )
        _require(event_buffer >= 1, "event_buffer must be >= 1")
        _require(max_result_bytes >= 1, "max_result_bytes must be >= 1")
        if prefix is not None and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ConfigurationError(
                f"prefix must start with '/' and not end with one, got {prefix!r}"
            )
        self.workers: WorkerSettings = workers if workers is not None else InProcessWorkers()
        self.store_setting = store
        self.store: TaskStore | None = None  # the running store, from start-up on
        self.max_result_bytes = max_result_bytes
        self.prefix = prefix
        self.route_dependencies = tuple(route_dependencies)
        self.result_ttl = result_ttl
        self.max_results = max_results
        self.max_pending = max_pending
        self.shutdown_timeout = shutdown_timeout
        self.exception_handlers = exception_handlers
        self.include_in_schema = include_in_schema
        self.tags = tuple(tags)
        self.registry = task_registry if task_registry is not None else registry
        self.dashboard = dashboard
        self.event_heartbeat = event_heartbeat
        self.event_buffer = event_buffer
        self.client_kwargs = check_client_kwargs(client_kwargs)
        self.client = TaskClient()
        self.callbacks = CallbackDispatcher(
            callbacks if callbacks is not None else CallbackSettings()
        )
        self.periodic = PeriodicTasks()  # this app's periodic schedules; see docs/periodic.md
        self.app: Starlette | None = None
        self._hub: EventHub | None = None
        if app is not None:
            self.init_app(app)

    def schedule(
        self, task: Callable[..., Any] | str, /, **options: Unpack[ScheduleOptions]
    ) -> Schedule:
        """Run `task` periodically in this app, once per due time across its processes:
        `fw.schedule(cleanup, cron="0 3 * * *", tz="Europe/Paris")` (options: `schedule`)."""
        return self.periodic.schedule(task, **options)

    # -- wiring ---------------------------------------------------------------------------

    def init_app(self, app: Starlette) -> None:
        """Attach to `app`: chain its lifespan, add the status routes and error handlers."""
        if self.app is not None:
            raise ConfigurationError("this FastWorker is already attached to an app")
        if getattr(app.state, "fastworker", None) is not None:
            raise ConfigurationError(
                "this app already has a FastWorker extension; attach only one per app"
            )
        self.app = app
        app.state.fastworker = self
        app.router.lifespan_context = self._chain(app.router.lifespan_context)  # type: ignore[assignment]
        if self.exception_handlers:
            app.add_exception_handler(FastWorkerError, _error_response)
        if self.prefix is not None:
            router = build_router(
                self.client,
                RouteSettings(
                    prefix=self.prefix,
                    dependencies=self.route_dependencies,
                    tags=self.tags,
                    dashboard=self.dashboard,
                    event_heartbeat=self.event_heartbeat,
                    event_buffer=self.event_buffer,
                    app_router=app.router,
                    schedules=self.periodic,
                ),
            )
            if isinstance(app, FastAPI):
                app.include_router(router, include_in_schema=self.include_in_schema)
            else:  # plain Starlette: APIRoutes need the exit stack FastAPI's app provides
                app.add_middleware(AsyncExitStackMiddleware)
                app.router.routes.extend(router.routes)

    def callback_route[F: Callable[..., Any]](
        self, path: str, **route_options: Any
    ) -> Callable[[F], F]:
        """Decorator: a POST route at `path` that runs only for this extension's signed
        callbacks (401 otherwise); declare `callback: TaskCallback` to get the payload."""
        return self.callbacks.route(self.app, path, **route_options)

    def _chain(self, original: Lifespan) -> Lifespan:
        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[Mapping[str, Any] | None]:
            async with original(app) as state, self.run():
                yield state

        return lifespan

    @asynccontextmanager
    async def run(self) -> AsyncIterator[TaskClient]:
        """Start the workers, yield the client, then drain; the lifespan uses this.

        Also usable directly (scripts, tests) without an app.
        """
        if self.client.running:
            raise ConfigurationError("this FastWorker is already running")
        store = resolve_store(self.store_setting)
        # With a store whose reads are queries, `wait()` answers recent results from the hub:
        # as many as may be pending at once, so a batch submitted, then awaited, needs none
        # (memory stays bounded by max_pending, as the pending tasks' own state is).
        keep = max(1024, self.max_pending) if store.durable else 0
        hub = EventHub(log_max=max(1024, self.event_buffer * 64), keep_finals=keep)
        executor = self.workers.build_executor(self.registry)
        async with anyio.create_task_group() as task_group:
            await store.open(
                hub, task_group, result_ttl=self.result_ttl, max_results=self.max_results
            )
            self.store = store
            scheduler = Scheduler(
                executor,
                store,
                hub,
                self.client,
                max_pending=self.max_pending,
                max_result_bytes=self.max_result_bytes,
            )
            try:
                await executor.start(task_group)
                progress = ProgressPublisher(store)
                task_group.start_soon(progress.run)
                self.callbacks.start(task_group, store, hub, self.app)
                self.client._bind(scheduler, self.callbacks.validate_address)
                with progress.bind():  # the workers started here report to it
                    await scheduler.start(task_group)
                    await self.periodic.start(self.client, task_group)
                _context.mark_running(self.client)
                self._hub = hub
                server_exiting = _server_shutdown.find_server_exit_flag()
                if server_exiting is not None:
                    task_group.start_soon(
                        _server_shutdown.watch, server_exiting, self.end_event_streams
                    )
                _announce("FastWorker started: %s", self._describe(executor.concurrency, store))
                yield self.client
            finally:
                _context.mark_stopped(self.client)
                self._hub = None
                self.periodic.stop()
                with anyio.CancelScope(shield=True):
                    await scheduler.shutdown(self.shutdown_timeout)
                    # After the drain (its callbacks too), within the callbacks' own budget.
                    await self.callbacks.aclose()
                    await executor.aclose()
                    await store.close()
                    hub.close()
                task_group.cancel_scope.cancel()
                _announce("FastWorker stopped")

    def end_event_streams(self) -> None:
        """End every open event stream with a final `shutdown` event, and those opened later.

        Called by itself when uvicorn begins to shut down (which waits for open connections
        before the app's lifespan ends); call it yourself under a server that does not let
        the app know (for example from your own shutdown hook).
        """
        if self._hub is not None:
            self._hub.close("shutdown")

    def _describe(self, concurrency: int, store: TaskStore) -> str:
        """The start-up log line: mode, workers, store and routes."""
        mode = "in-process" if isinstance(self.workers, InProcessWorkers) else "remote"
        routes = "none" if self.prefix is None else self.prefix
        if self.prefix is not None and self.dashboard:
            routes += f" (dashboard {self.prefix}/dashboard)"
        return f"mode={mode} workers={concurrency} store={store.description} routes={routes}"


async def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FastWorkerError)
    headers = {"Retry-After": "1"} if exc.status_code == 503 else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=headers)


def _announce(message: str, *args: Any) -> None:
    """Log at INFO on our logger; when logging is not set up (no handler would print it)
    but uvicorn's is, on uvicorn's, so that the server log says the workers started."""
    target = logger
    if not logger.hasHandlers():
        server = logging.getLogger("uvicorn.error")
        if server.hasHandlers():
            target = server
    target.info(message, *args)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)
