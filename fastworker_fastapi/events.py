"""One small pub/sub for task changes, so routes, streams and callbacks see the same thing.

Two kinds of consumers:

- *listeners*: synchronous functions called in the publisher's task for every change
  (callback delivery uses one to learn that a task finished). They must be quick and must
  not raise; an exception is logged and swallowed so a bad listener cannot break a worker.
- *subscriptions*: bounded buffers of snapshots read by an async consumer (event streams).
  Publishing never waits for a slow reader: a subscription whose buffer is full is closed
  and flagged `overflowed`, so the reader learns that it missed events instead of
  silently losing some of them.

Publishing costs one truth test when nobody listens, which keeps submission cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from fastworker_fastapi.models import TaskInfo
from fastworker_fastapi.store import FINAL_STATUSES

if TYPE_CHECKING:
    from fastworker_fastapi.store import TaskRecord

__all__ = ["EventHub", "Subscription"]

logger = logging.getLogger("fastworker_fastapi")

Listener = Callable[["TaskRecord"], None]
RecordFilter = Callable[["TaskRecord"], bool]


class Subscription:
    """A bounded stream of `TaskInfo` snapshots; iterate it with `async for`."""

    def __init__(self, hub: EventHub, max_buffer: int, accept: RecordFilter | None) -> None:
        self._hub = hub
        self.accept = accept
        self.overflowed = False
        send: MemoryObjectSendStream[TaskInfo]
        receive: MemoryObjectReceiveStream[TaskInfo]
        send, receive = anyio.create_memory_object_stream[TaskInfo](max_buffer)
        self._send = send
        self.receive = receive

    def _offer(self, snapshot: TaskInfo) -> None:
        try:
            self._send.send_nowait(snapshot)
        except anyio.WouldBlock:
            self.overflowed = True
            self.close()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.close()

    def close(self) -> None:
        """Stop receiving: the reader sees the end of the stream after what is buffered."""
        self._hub._subscriptions.discard(self)
        self._send.close()

    def __aiter__(self) -> MemoryObjectReceiveStream[TaskInfo]:
        return self.receive

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        self.receive.close()


class EventHub:
    """Fan-out of task changes to listeners and subscriptions."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._final_listeners: list[Listener] = []
        self._subscriptions: set[Subscription] = set()

    def add_listener(self, listener: Listener, *, final_only: bool = False) -> Callable[[], None]:
        """Call `listener(record)` on every change (or only when a task reaches a final
        status, with `final_only`); returns a function that removes it."""
        listeners = self._final_listeners if final_only else self._listeners
        listeners.append(listener)
        return lambda: listeners.remove(listener)

    def subscribe(
        self, *, max_buffer: int = 256, accept: RecordFilter | None = None
    ) -> Subscription:
        """A new subscription; close it (or use `async with`) to release it."""
        subscription = Subscription(self, max_buffer, accept)
        self._subscriptions.add(subscription)
        return subscription

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def publish(self, record: TaskRecord) -> None:
        if self._listeners:
            self._call(self._listeners, record)
        if self._final_listeners and record.status in FINAL_STATUSES:
            self._call(self._final_listeners, record)
        if self._subscriptions:
            snapshot: TaskInfo | None = None
            for subscription in tuple(self._subscriptions):
                if subscription.accept is not None and not subscription.accept(record):
                    continue
                if snapshot is None:
                    snapshot = TaskInfo.from_record(record)
                subscription._offer(snapshot)

    @staticmethod
    def _call(listeners: list[Listener], record: TaskRecord) -> None:
        for listener in tuple(listeners):
            try:
                listener(record)
            except Exception:
                logger.exception("task event listener %r failed", listener)

    def close(self) -> None:
        """End every subscription (shutdown): readers see the end of their stream."""
        for subscription in tuple(self._subscriptions):
            subscription.close()
