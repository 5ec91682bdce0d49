"""The store contract: every rule of `stores/base.py`, for every store kind.

Tests taking `backend` run for every kind; tests taking `shared_backend` run for kinds that
several processes share, with two store instances standing for two processes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _records import finished, make_record, same
from _support import opened
from fastworker.tasks.models import CallbackInfo, TaskPriority, TaskStatus

from fastworker_fastapi.errors import TaskAlreadyFinishedError, TaskNotFoundError
from fastworker_fastapi.records import CallbackDelivery, TaskPolicy, TaskRecord, utcnow
from tests.conftest import eventually


def full_record() -> TaskRecord:
    """Every field set, with values that are easy to get wrong."""
    when = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    return make_record(
        name="résumé ✓ 任务",
        args=["ünïcødé", 1.5, None, True, [1, {"a": [2, 3]}]],
        kwargs={"nested": {"deep": [{"x": "🙂"}, []], "n": -(2**53)}, "empty": {}},
        priority=TaskPriority.CRITICAL,
        policy=TaskPolicy(timeout=2.5, max_retries=3, retry_delay=0.5, retry_backoff=3.0),
        status=TaskStatus.RETRYING,
        eta=when + timedelta(hours=1),
        started_at=when,
        completed_at=when + timedelta(seconds=2),
        result={"list": [1, "two", {"three": 3.0}], "text": 'line\nbreak "quoted" \\'},
        error="ValueError: ✗ bad",
        error_type="ValueError",
        attempts=2,
        callback=CallbackInfo(address="https://example.com/hook?x=1", data={"k": ["v", 1]}),
        delivery=CallbackDelivery("retrying", 4, "503 ✗", when, "dlv-1"),
        progress=0.25,
        progress_message="¼ done",
        owner="someone",
        cancel_requested=True,
        interruptions=1,
    )


# -- round trip ------------------------------------------------------------------------------


async def test_round_trip_every_field(backend: Any) -> None:
    record = full_record()
    async with opened(backend.make()) as a:
        await a.store.insert([record])
        got = await a.store.get(record.id)
        assert same(got, record)
        assert got is not None and got.eta is not None and got.eta.tzinfo is not None
        assert isinstance(got.callback, CallbackInfo) and isinstance(got.delivery, CallbackDelivery)
        assert same(a.store.peek(record.id), record)
        assert same((await a.store.recent(limit=1))[0], record)
        assert await a.store.get("no-such-id") is None
        assert a.store.peek("no-such-id") is None


async def test_update_round_trips_every_field(backend: Any) -> None:
    base = make_record(owner="me")
    target = full_record()
    changes = {
        name: getattr(target, name) for name in target.to_json() if name not in ("id", "owner")
    }
    changes["owner"] = "me"
    async with opened(backend.make()) as a:
        await a.store.insert([base])
        updated = await a.store.update(base.id, "me", 0, **changes)
        expected = TaskRecord.from_json({**target.to_json(), "id": base.id, "owner": "me"})
        assert same(updated, expected)
        assert same(await a.store.get(base.id), expected)
        # Back to empty values: None must replace, not merge.
        cleared = await a.store.update(
            base.id, "me", 2, result=None, callback=None, delivery=None, eta=None, owner=None
        )
        assert cleared is not None
        assert (cleared.result, cleared.callback, cleared.delivery, cleared.eta) == (None,) * 4
        assert same(await a.store.get(base.id), cleared)


async def test_update_replaces_nested_values(backend: Any) -> None:
    record = make_record(result={"a": 1, "b": {"c": 2}}, kwargs={"x": 1})
    async with opened(backend.make()) as a:
        await a.store.insert([record])
        await a.store.update(record.id, None, 0, result={"b": {"d": None}}, kwargs={})
        got = await a.store.get(record.id)
        assert got is not None and got.result == {"b": {"d": None}} and got.kwargs == {}


# -- insert --------------------------------------------------------------------------------


async def test_insert_publishes_each_record(backend: Any) -> None:
    records = [make_record() for _ in range(3)]
    async with opened(backend.make()) as a:
        await a.store.insert(records)
        assert [r.id for r in a.seen] == [r.id for r in records]


async def test_batch_insert_is_all_or_none(backend: Any) -> None:
    first = make_record()
    async with opened(backend.make()) as a:
        await a.store.insert([first])
        before, after = make_record(), make_record()
        with pytest.raises(ValueError, match="exists"):
            await a.store.insert([before, make_record(id=first.id, name="other"), after])
        assert await a.store.get(before.id) is None
        assert await a.store.get(after.id) is None
        assert same(await a.store.get(first.id), first)
        assert not a.saw(before.id) and not a.saw(after.id)
        # The store still takes writes after the failed batch.
        await a.store.insert([after])
        assert same(await a.store.get(after.id), after)


async def test_duplicate_ids_within_one_batch_are_refused(backend: Any) -> None:
    twin = make_record()
    async with opened(backend.make()) as a:
        with pytest.raises(ValueError, match="exists"):
            await a.store.insert([twin, make_record(id=twin.id)])
        assert await a.store.get(twin.id) is None


async def test_insert_if_absent(backend: Any) -> None:
    record = make_record()
    async with opened(backend.make()) as a:
        assert await a.store.insert_if_absent(record) is True
        assert a.saw(record.id)
        a.seen.clear()
        assert await a.store.insert_if_absent(make_record(id=record.id, name="other")) is False
        assert not a.seen
        assert same(await a.store.get(record.id), record)


# -- update: compare-and-set -----------------------------------------------------------------


async def test_update_is_compare_and_set(backend: Any) -> None:
    record = make_record(owner="me", attempts=1)
    async with opened(backend.make()) as a:
        await a.store.insert([record])
        a.seen.clear()
        assert await a.store.update(record.id, "not-me", 1, status=TaskStatus.RUNNING) is None
        assert await a.store.update(record.id, None, 1, status=TaskStatus.RUNNING) is None
        assert await a.store.update(record.id, "me", 2, status=TaskStatus.RUNNING) is None
        assert await a.store.update("no-such-id", "me", 1, status=TaskStatus.RUNNING) is None
        assert same(await a.store.get(record.id), record)
        assert not a.seen
        started = utcnow()
        updated = await a.store.update(
            record.id, "me", 1, status=TaskStatus.RUNNING, started_at=started, attempts=2
        )
        assert updated is not None
        assert (updated.status, updated.started_at, updated.attempts) == (
            TaskStatus.RUNNING,
            started,
            2,
        )
        assert [r.status for r in a.seen] == [TaskStatus.RUNNING]
        assert same(await a.store.get(record.id), updated)
        # The old attempt count no longer matches.
        assert await a.store.update(record.id, "me", 1, status=TaskStatus.SUCCESS) is None


# -- recent ----------------------------------------------------------------------------------


async def test_recent_newest_first_filtered_limited(backend: Any) -> None:
    records = [
        make_record(name="a"),
        make_record(name="b"),
        finished(name="a"),
        make_record(name="b", status=TaskStatus.RUNNING),
        finished(name="b"),
    ]
    async with opened(backend.make()) as a:
        for record in records:
            await a.store.insert([record])

        async def ids(**filters: Any) -> list[str]:
            return [r.id for r in await a.store.recent(**filters)]

        newest_first = [r.id for r in reversed(records)]
        assert await ids(limit=10) == newest_first
        assert await ids(limit=2) == newest_first[:2]
        assert await ids(limit=10, name="a") == [records[2].id, records[0].id]
        assert await ids(limit=10, status=TaskStatus.SUCCESS) == [records[4].id, records[2].id]
        assert await ids(limit=10, status=TaskStatus.SUCCESS, name="a") == [records[2].id]
        assert await ids(limit=10, name="nobody") == []


# -- request_cancel --------------------------------------------------------------------------


async def test_request_cancel(backend: Any) -> None:
    unowned, owned, done = make_record(), make_record(owner="other-process"), finished()
    async with opened(backend.make()) as a:
        await a.store.insert([unowned, owned, done])
        with pytest.raises(TaskNotFoundError) as unknown:
            await a.store.request_cancel("no-such-id")
        assert unknown.value.status_code == 404
        with pytest.raises(TaskAlreadyFinishedError) as late:
            await a.store.request_cancel(done.id)
        assert late.value.status_code == 409

        a.seen.clear()
        cancelled = await a.store.request_cancel(unowned.id)
        assert cancelled.status is TaskStatus.CANCELLED
        assert cancelled.completed_at is not None and cancelled.error_type == "TaskCancelled"
        assert same(await a.store.get(unowned.id), cancelled)

        flagged = await a.store.request_cancel(owned.id)
        assert flagged.cancel_requested and flagged.status is TaskStatus.QUEUED
        assert flagged.owner == "other-process"
        assert same(await a.store.get(owned.id), flagged)
        assert [r.id for r in a.seen] == [unowned.id, owned.id]

        with pytest.raises(TaskAlreadyFinishedError):
            await a.store.request_cancel(unowned.id)


# -- expire ----------------------------------------------------------------------------------


async def test_expire_by_ttl_keeps_unfinished_and_open_deliveries(backend: Any) -> None:
    done = finished()
    undelivered = finished(delivery=CallbackDelivery("pending"), callback=_callback())
    delivered = finished(delivery=CallbackDelivery("delivered"), callback=_callback())
    old_queued = make_record(created=time.time() - 10 * 86400)
    running = make_record(status=TaskStatus.RUNNING, owner="x")
    async with opened(backend.make(), result_ttl=0.2) as a:
        await a.store.insert([done, undelivered, delivered, old_queued, running])

        async def gone() -> bool:
            await a.store.expire()
            return await a.store.get(done.id) is None and await a.store.get(delivered.id) is None

        await eventually(gone, message="finished tasks did not expire")
        for kept in (undelivered, old_queued, running):
            assert same(await a.store.get(kept.id), kept)


async def test_expire_by_count(backend: Any) -> None:
    open_delivery = finished(delivery=CallbackDelivery("delivering"), callback=_callback())
    later = [finished() for _ in range(4)]
    queued = [make_record() for _ in range(3)]
    async with opened(backend.make(), max_results=2) as a:
        for record in [open_delivery, *later, *queued]:
            await a.store.insert([record])
        await a.store.expire()
        assert await a.store.get(later[0].id) is None
        assert await a.store.get(later[1].id) is None
        for kept in (open_delivery, later[2], later[3], *queued):
            assert await a.store.get(kept.id) is not None, kept
        assert await a.store.expire() == 0


def _callback() -> CallbackInfo:
    return CallbackInfo(address="https://example.com/done")


# -- several processes on one backend ----------------------------------------------------------


async def test_changes_reach_other_processes(shared_backend: Any) -> None:
    async with opened(shared_backend.make()) as a, opened(shared_backend.make()) as b:
        record = make_record(owner=a.store.owner)
        waiter = b.hub.final_waiter(record.id)
        await a.store.insert([record])
        await eventually(lambda: b.saw(record.id), message="B did not see A's insert")
        await a.store.update(record.id, a.store.owner, 0, status=TaskStatus.RUNNING, attempts=1)
        await a.store.update(
            record.id, a.store.owner, 1, status=TaskStatus.SUCCESS, result={"ok": "✓"}
        )
        final = await eventually(lambda: waiter.done() and waiter.result())
        assert final.status is TaskStatus.SUCCESS and final.result == {"ok": "✓"}
        assert same(await b.store.get(record.id), final)
        # A's own writes reached A's hub once each, not again through its feed: wait until
        # A has read a later change of B's, then count.
        marker = make_record()
        await b.store.insert([marker])
        await eventually(lambda: a.saw(marker.id), message="A did not see B's insert")
        assert [r.status for r in a.seen if r.id == record.id] == [
            TaskStatus.QUEUED,
            TaskStatus.RUNNING,
            TaskStatus.SUCCESS,
        ]
        assert [r.id for r in b.seen].count(marker.id) == 1


async def test_recent_and_cancel_span_processes(shared_backend: Any) -> None:
    async with opened(shared_backend.make()) as a, opened(shared_backend.make()) as b:
        mine, theirs = make_record(owner=a.store.owner), make_record(owner=b.store.owner)
        await a.store.insert([mine])
        await b.store.insert([theirs])
        assert [r.id for r in await a.store.recent(limit=10)] == [theirs.id, mine.id]
        flagged = await a.store.request_cancel(theirs.id)
        assert flagged.cancel_requested and flagged.owner == b.store.owner
        await eventually(lambda: b.saw(theirs.id, lambda r: r.cancel_requested))


async def test_wake_up_is_faster_than_the_poll(shared_backend: Any) -> None:
    """SQLite's datagram hint, PostgreSQL's NOTIFY: either wakes the other process's feed."""
    async with (
        opened(shared_backend.make()) as a,
        opened(shared_backend.make(poll_interval=30.0)) as b,
    ):
        record = make_record()
        await a.store.insert([record])
        await eventually(lambda: b.saw(record.id), timeout=5.0, interval=0.002)


async def test_dead_owner_by_lease_is_recovered(shared_backend: Any) -> None:
    """A stops heartbeating without closing; once its lease lapses B takes over."""

    def can_run(name: str) -> bool:
        return name != "elsewhere"

    async with (
        opened(shared_backend.make(lease=0.5, heartbeat_interval=3600)) as a,
        opened(shared_backend.make()) as b,
    ):
        owner = a.store.owner
        queued = make_record(owner=owner)
        running = make_record(owner=owner, status=TaskStatus.RUNNING, attempts=1)
        cancelling = make_record(owner=owner, status=TaskStatus.RUNNING, cancel_requested=True)
        later = make_record(
            owner=owner, status=TaskStatus.SCHEDULED, eta=utcnow() + timedelta(hours=1)
        )
        foreign = make_record(owner=owner, name="elsewhere")
        to_deliver = finished(owner=owner, callback=_callback(), delivery=CallbackDelivery())
        done = finished(owner=owner)
        unowned_foreign = make_record(name="elsewhere")
        await a.store.insert(
            [queued, running, cancelling, later, foreign, to_deliver, done, unowned_foreign]
        )
        assert await b.store.recover(can_run, 100) == []  # A is alive

        claimed = await eventually(
            lambda: b.store.recover(can_run, 100), message="A's lease did not lapse"
        )
        by_id = {r.id: r for r in claimed}
        assert set(by_id) == {queued.id, running.id, to_deliver.id}
        assert by_id[queued.id].owner == b.store.owner
        assert by_id[queued.id].attempts == 0 and by_id[queued.id].status is TaskStatus.QUEUED
        interrupted = by_id[running.id]
        assert interrupted.status is TaskStatus.RETRYING and interrupted.interruptions == 1
        assert interrupted.attempts == 1 and interrupted.error_type == "WorkerLost"
        assert by_id[to_deliver.id].delivery == CallbackDelivery()

        got = {r.id: r for r in await b.store.recent(limit=100)}
        assert (
            got[cancelling.id].status is TaskStatus.CANCELLED and got[cancelling.id].owner is None
        )
        assert got[later.id].owner is None and got[later.id].status is TaskStatus.SCHEDULED
        assert got[foreign.id].owner is None and got[unowned_foreign.id].owner is None
        assert got[done.id].owner == owner  # finished and delivered: nothing to release
        assert b.saw(cancelling.id, lambda r: r.status is TaskStatus.CANCELLED)

        # A's late write, after B took over, is dropped.
        assert await a.store.update(running.id, owner, 1, status=TaskStatus.SUCCESS) is None
        assert await a.store.update(queued.id, owner, 0, status=TaskStatus.RUNNING) is None
        assert same(await b.store.get(queued.id), by_id[queued.id])
        # A learns through its feed that its tasks moved.
        await eventually(lambda: a.saw(queued.id, lambda r: r.owner == b.store.owner))
        # Nothing is claimed twice.
        assert await b.store.recover(can_run, 100) == []


async def test_heartbeats_keep_an_owner_alive(shared_backend: Any) -> None:
    async with (
        opened(shared_backend.make(lease=0.4, heartbeat_interval=0.05)) as a,
        opened(shared_backend.make()) as b,
    ):
        record = make_record(owner=a.store.owner)
        await a.store.insert([record])
        deadline = time.monotonic() + 1.2  # three leases
        while time.monotonic() < deadline:
            assert await b.store.recover(lambda name: True, 10) == []
            await eventually(lambda: True)
        assert (await b.store.get(record.id)).owner == a.store.owner  # type: ignore[union-attr]


async def test_recover_claims_due_unowned_tasks_up_to_limit(shared_backend: Any) -> None:
    async with opened(shared_backend.make()) as a:
        due = [make_record() for _ in range(5)]
        soon = make_record(status=TaskStatus.SCHEDULED, eta=utcnow() + timedelta(seconds=0.5))
        future = make_record(status=TaskStatus.SCHEDULED, eta=utcnow() + timedelta(hours=1))
        running = make_record(status=TaskStatus.RUNNING)  # not waiting: never claimed
        await a.store.insert([*due, soon, future, running])
        counts = [len(await a.store.recover(lambda name: True, 2)) for _ in range(4)]
        assert counts == [2, 2, 2, 0]
        owners = {r.id: r.owner for r in await a.store.recent(limit=10)}
        assert all(owners[r.id] == a.store.owner for r in (*due, soon))
        assert owners[future.id] is None and owners[running.id] is None


async def test_close_releases_leftover_tasks(shared_backend: Any) -> None:
    async with opened(shared_backend.make()) as b:
        async with opened(shared_backend.make()) as a:
            queued = make_record(owner=a.store.owner)
            running = make_record(owner=a.store.owner, status=TaskStatus.RUNNING, attempts=1)
            await a.store.insert([queued, running])
        claimed = {r.id: r for r in await b.store.recover(lambda name: True, 10)}
        assert set(claimed) == {queued.id, running.id}
        assert claimed[running.id].status is TaskStatus.RETRYING


def test_concurrent_writers_lose_nothing(shared_backend: Any) -> None:
    """Two stores, each on its own thread and event loop, write at once; all writes land."""
    per_store, ids = 150, [[], []]  # type: ignore[var-annotated]

    async def work(index: int) -> None:
        async with opened(shared_backend.make()) as s:
            owner = s.store.owner

            async def one(batch: int) -> None:
                records = [make_record(owner=owner) for _ in range(batch)]
                await s.store.insert(records)
                for record in records:
                    ids[index].append(record.id)
                    await s.store.update(record.id, owner, 0, status=TaskStatus.RUNNING)
                    assert await s.store.update(
                        record.id, owner, 0, status=TaskStatus.SUCCESS, result=record.id
                    )

            await asyncio.gather(*(one(n % 3 + 1) for n in range(per_store // 2)))

    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            asyncio.run(work(index))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors

    async def check() -> None:
        async with opened(shared_backend.make()) as c:
            everything = await c.store.recent(limit=10_000)
            assert len(everything) == len(ids[0]) + len(ids[1])
            assert all(r.status is TaskStatus.SUCCESS and r.result == r.id for r in everything)

    asyncio.run(check())
