"""Server-sent events: task changes pushed to HTTP clients as they happen.

```
store writes (this process's, and other processes' through the store's feed)
                       ──► EventHub ──► Subscription (latest state per task, bounded)
                                                          │  one per open stream
                                                          ▼
                          GET /tasks/{id}/events   event: task   (current state first,
                          GET /tasks/events        data: {TaskInfo JSON}   then each change)
                                                   : heartbeat   (every `heartbeat` seconds)
                                                   event: overflow (stopped reading: end)
                                                   event: shutdown (the server stops: end)
```

Publishing never waits for a stream: streams read one shared change log by position (see
`events.Subscription`). Changes are coalesced per task (the latest state of each task wins),
and streams write together on the hub's shared tick (`EventHub.pace`), unfiltered ones
sharing one text, so a client that keeps reading keeps up and always gets each task's final
state, at a cost to the server that grows with the number of writes, not of changes; a client
that fell too far behind gets a final `overflow` event and its stream closes. An
`EventSource` then reconnects by itself and should re-read the state (`GET /tasks/{id}` or
`GET /tasks`), which is what the dashboard does. A client that disconnects releases its
subscription at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import anyio
from fastapi import Path, Query
from fastworker.tasks.models import TaskStatus
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fastworker_fastapi.errors import TaskNotFoundError
from fastworker_fastapi.models import task_json
from fastworker_fastapi.records import FINAL_STATUSES

if TYPE_CHECKING:
    from fastapi import APIRouter

    from fastworker_fastapi.client import TaskClient
    from fastworker_fastapi.events import EventHub, RecordFilter
    from fastworker_fastapi.records import TaskRecord

__all__ = ["EventStreamResponse", "add_event_routes", "task_events"]

_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}
# One event of the stream, as OpenAPI 3.2's `itemSchema` (what FastAPI's own SSE support
# emits): `event: task` carries a `TaskInfo` as JSON, `event: overflow` an error detail.
_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["task", "overflow", "shutdown"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/TaskInfo"},
                    {"$ref": "#/components/schemas/ErrorDetail"},
                ]
            },
        },
        "retry": {"type": "integer", "description": "Reconnection delay in milliseconds."},
    },
}
# Errors are JSON, not events: spelled out, since a `model` would be documented under the
# route's own media type (text/event-stream).
_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDetail"}}}
_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {"type": "string", "description": "Server-sent events."},
                "itemSchema": _EVENT_SCHEMA,
            }
        },
        "description": "`event: task` with a `TaskInfo` as JSON per change; comment "
        "heartbeats; `event: overflow` before closing when the client stopped reading, "
        "`event: shutdown` when the server stops.",
    },
    503: {"content": _JSON_ERROR, "description": "The extension is not running."},
}


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` that stops as soon as the client disconnects.

    Starlette's `StreamingResponse` notices a disconnect only at its next write on ASGI 2.4
    servers; listening for it instead frees the subscription at once.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as task_group:

                async def run_then_cancel(func: Callable[[], Awaitable[None]]) -> None:
                    await func()
                    task_group.cancel_scope.cancel()

                task_group.start_soon(run_then_cancel, partial(self.stream_response, send))
                await run_then_cancel(partial(self.listen_for_disconnect, receive))
        finally:
            # Close the body now rather than when it is garbage-collected: until its
            # `finally` runs it holds a subscription.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def _event(record: TaskRecord) -> str:
    return f"event: task\ndata: {task_json(record)}\n\n"


_OVERFLOW = "event: overflow\ndata: {}\n\n".format(
    json.dumps({"detail": "this client read too slowly and missed events; re-read the state"})
)
_SHUTDOWN = "event: shutdown\ndata: {}\n\n".format(
    json.dumps({"detail": "the server is shutting down; reconnect to another process or later"})
)


async def task_events(
    events: EventHub,
    *,
    max_buffer: int,
    heartbeat: float,
    accept: RecordFilter | None = None,
    current: Callable[[], Awaitable[TaskRecord | None]] | None = None,
) -> AsyncIterator[str]:
    """The stream body: the task's `current()` state if given, then each accepted change.

    Given `current`, the stream ends after the task's final state. It subscribes only once
    iterated and closes the subscription whatever ends it (a disconnect included), so a
    response that never starts holds nothing. A stream ended by the server says why in a
    last event: `overflow` (the client stopped reading) or `shutdown`.
    """
    # Subscribe, then read: a change during the read is kept, never missed.
    async with events.subscribe(max_buffer=max_buffer, accept=accept) as subscription:
        yield "retry: 1000\n\n"  # reconnect quickly after an overflow or a restart
        following = current is not None
        if current is not None:
            record = await current()
            if record is None:
                return
            yield _event(record)
            if record.status in FINAL_STATUSES:
                return
        while True:
            ready = None
            with anyio.move_on_after(heartbeat):
                ready = await subscription.wait()
            if ready is None:
                yield ": heartbeat\n\n"
                continue
            if not ready:
                if subscription.overflowed:
                    yield _OVERFLOW
                elif subscription.ended_by == "shutdown":
                    yield _SHUTDOWN
                return
            if following:  # one task: its changes, up to its final state
                chunk = []
                for change in subscription.drain():
                    chunk.append(change.event)
                    if change.record.status in FINAL_STATUSES:
                        yield "".join(chunk)
                        return
                text = "".join(chunk)
            else:  # every change ready goes out in one write
                text = subscription.drain_text()
            if text:
                yield text
            # Let changes gather until the streams' next shared tick: under load a stream
            # sends each task once, in its latest state, a few writes a second.
            await events.pace()


async def _encoded(body: AsyncIterator[str], memo: list[Any]) -> AsyncIterator[bytes]:
    """`body` as bytes; a text equal to the last one encoded (the same object: unfiltered
    streams share their text) reuses its bytes, so two hundred streams encode it once."""
    try:
        async for text in body:
            if memo and memo[0] is text:
                yield memo[1]
            else:
                data = text.encode("utf-8")
                memo[:] = (text, data)
                yield data
    finally:
        await body.aclose()  # type: ignore[attr-defined]


def add_event_routes(
    router: APIRouter,
    running_client: Callable[[], TaskClient],
    *,
    heartbeat: float,
    max_buffer: int,
) -> None:
    """`GET {prefix}/events` and `GET {prefix}/{task_id}/events` on a status router."""
    memo: list[Any] = []  # the last shared text and its bytes (see `_encoded`)

    @router.get(
        "/events",
        summary="Stream changes of all tasks (server-sent events)",
        response_class=EventStreamResponse,
        responses=_STREAM_DOC,
    )
    async def all_events(
        status: Annotated[
            TaskStatus | None, Query(description="Only changes into this status.")
        ] = None,
        name: Annotated[str | None, Query(description="Only tasks with this name.")] = None,
    ) -> EventStreamResponse:
        """Every task change from now on, in every process, optionally filtered; never ends
        by itself."""
        client = running_client()
        # Unfiltered streams take no filter: they share the text they send (see
        # `Subscription.drain_text`).
        accept: RecordFilter | None = None
        if status is not None or name is not None:

            def matches(record: TaskRecord) -> bool:
                return (status is None or record.status is status) and (
                    name is None or record.name == name
                )

            accept = matches

        body = task_events(client.events, max_buffer=max_buffer, heartbeat=heartbeat, accept=accept)
        return EventStreamResponse(_encoded(body, memo), headers=_HEADERS)

    @router.get(
        "/{task_id:uuid}/events",
        summary="Stream one task's changes (server-sent events)",
        response_class=EventStreamResponse,
        responses={
            **_STREAM_DOC,
            404: {"content": _JSON_ERROR, "description": "Unknown or expired task id."},
        },
    )
    async def one_task_events(
        task_id: Annotated[UUID, Path(description="The id returned by delay().")],
    ) -> EventStreamResponse:
        """The task's current state, then each change; closes after its final state."""
        client = running_client()
        key = str(task_id)
        if await client.store.get(key) is None:
            raise TaskNotFoundError(f"no task with id {task_id} (unknown or expired)")
        body = task_events(
            client.events,
            max_buffer=max_buffer,
            heartbeat=heartbeat,
            accept=lambda r: r.id == key,
            current=lambda: client.store.get(key),
        )
        return EventStreamResponse(body, headers=_HEADERS)
