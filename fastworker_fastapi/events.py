"""One small pub/sub for task changes, so routes, streams and callbacks see the same thing.

Two kinds of consumers:

- *listeners*: synchronous functions called in the publisher's task for every change
  (callback delivery uses one to learn that a task finished). They must be quick and must
  not raise; an exception is logged and swallowed so a bad listener cannot break a worker.
- *subscriptions*: bounded buffers of snapshots read by an async consumer (event streams).
  Publishing never waits for a slow reader: a subscription whose buffer is full is closed
  and flagged `overflowed`, so the reader learns that it missed events instead of
  silently losing some of them.

A third, for `wait()`: *final waiters*, futures keyed by task id that the first final record
published for that id resolves, whichever process wrote it (a store publishes other
processes' changes here too).

Publishing costs one truth test when nobody listens, which keeps submission cheap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from fastworker_fastapi.models import TaskInfo
from fastworker_fastapi.records import FINAL_VALUES

if TYPE_CHECKING:
    from fastworker_fastapi.records import TaskRecord

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
        self._remote_listeners: list[Listener] = []
        self._final_listeners: list[tuple[Listener, str | None]] = []
        self._subscriptions: set[Subscription] = set()
        self._waiters: dict[str, list[asyncio.Future[TaskRecord]]] = {}

    def add_listener(
        self,
        listener: Listener,
        *,
        final_only: bool = False,
        when: str | None = None,
        remote_only: bool = False,
    ) -> Callable[[], None]:
        """Call `listener(record)` on every change, or with `final_only` only when a task
        reaches a final status, and then, with `when`, only if that record attribute is not
        None (`when="callback"`). Returns a function that removes the listener.

        `when` exists because final listeners run for every task: checking an attribute
        costs far less than calling a function that returns at once. With `remote_only`,
        only changes written by other processes (a store's feed) are passed on.
        """
        # Copy on change (rare), so publishing (every task) iterates without copying and a
        # listener may remove itself while it runs.
        if final_only:
            entry = (listener, when)
            self._final_listeners = [*self._final_listeners, entry]

            def remove() -> None:
                self._final_listeners = [x for x in self._final_listeners if x is not entry]

            return remove
        if when is not None:
            raise ValueError("`when` applies to final_only listeners")
        if remote_only:
            self._remote_listeners = [*self._remote_listeners, listener]

            def remove_remote() -> None:
                self._remote_listeners = [x for x in self._remote_listeners if x is not listener]

            return remove_remote
        self._listeners = [*self._listeners, listener]

        def remove_any() -> None:
            self._listeners = [x for x in self._listeners if x is not listener]

        return remove_any

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

    def final_waiter(self, task_id: str) -> asyncio.Future[TaskRecord]:
        """A future the next final record of `task_id` resolves; `forget_waiter` it when
        giving up.

        Register it *before* reading the store, so a change between the read and the wait
        cannot be missed.
        """
        future: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.get(task_id)
        if waiters is None:
            self._waiters[task_id] = [future]
        else:
            waiters.append(future)
        return future

    def forget_waiter(self, task_id: str, future: asyncio.Future[TaskRecord]) -> None:
        """Stop waiting (a timeout, a cancelled wait): nothing is kept for `task_id`."""
        future.cancel()
        waiters = self._waiters.get(task_id)
        if waiters is not None and future in waiters:
            waiters.remove(future)
            if not waiters:
                del self._waiters[task_id]

    def publish(self, record: TaskRecord, *, remote: bool = False) -> None:
        """Pass a change on; `remote` when another process wrote it (a store's feed)."""
        if remote and self._remote_listeners:
            for listener in self._remote_listeners:
                self._call(listener, record)
        if self._waiters and record.status._value_ in FINAL_VALUES:
            for future in self._waiters.pop(record.id, ()):
                if not future.done():
                    future.set_result(record)
        if self._listeners:
            for listener in self._listeners:  # never mutated in place: see add_listener
                self._call(listener, record)
        if self._final_listeners and record.status._value_ in FINAL_VALUES:
            for listener, when in self._final_listeners:
                if when is None or getattr(record, when) is not None:
                    self._call(listener, record)
        if self._subscriptions:
            snapshot: TaskInfo | None = None
            for subscription in tuple(self._subscriptions):
                if subscription.accept is not None and not subscription.accept(record):
                    continue
                if snapshot is None:
                    snapshot = TaskInfo.from_record(record)
                subscription._offer(snapshot)

    @staticmethod
    def _call(listener: Listener, record: TaskRecord) -> None:
        try:
            listener(record)
        except Exception:
            logger.exception("task event listener %r failed", listener)

    def close(self) -> None:
        """End every subscription (shutdown): readers see the end of their stream."""
        for subscription in tuple(self._subscriptions):
            subscription.close()
