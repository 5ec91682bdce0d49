"""MemoryStore retention: one loop timer expires old results, reads and writes read no clock."""

from __future__ import annotations

from datetime import timedelta

from _records import finished, make_record
from _support import opened
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi.records import utcnow
from fastworker_fastapi.stores.memory import MemoryStore
from tests.conftest import eventually


async def test_results_expire_on_their_own_without_reads_or_writes() -> None:
    store = MemoryStore()
    done = finished()
    no_time = make_record(status=TaskStatus.FAILURE)  # final, inserted without completed_at
    queued = make_record()
    async with opened(store, result_ttl=0.2) as a:
        await a.store.insert([done, no_time, queued])
        assert store.peek(done.id) is not None
        # Nothing is read or written from here on: only the timer can drop them.
        await eventually(lambda: len(store) == 1, message="finished tasks did not expire")
        assert store.peek(queued.id) is queued
        assert store._timer is None  # nothing left to expire: no timer


async def test_age_counts_from_completed_at() -> None:
    store = MemoryStore()
    old = make_record(status=TaskStatus.SUCCESS, completed_at=utcnow() - timedelta(hours=2))
    recent = finished()
    async with opened(store, result_ttl=3600) as a:
        await a.store.insert([old])
        await a.store.insert([recent])
        await eventually(lambda: store.peek(old.id) is None, message="an old result was kept")
        assert store.peek(recent.id) is recent


async def test_a_huge_ttl_keeps_results_and_close_stops_the_timer() -> None:
    store = MemoryStore()
    done = finished()
    async with opened(store, result_ttl=1e300) as a:
        await a.store.insert([done])
        assert await a.store.expire() == 0
        assert store.peek(done.id) is done
        assert store._timer is not None
    assert store._timer is None


async def test_results_expiring_one_after_another_are_dropped_in_batches() -> None:
    store = MemoryStore()
    fired: list[int] = []
    on_timer = store._on_timer

    def counted() -> None:
        fired.append(len(store))
        on_timer()

    store._on_timer = counted  # type: ignore[method-assign]
    ttl = 0.5
    start = utcnow() - timedelta(seconds=ttl)  # due over the next 100 ms, 2 ms apart
    results = [
        make_record(status=TaskStatus.SUCCESS, completed_at=start + timedelta(milliseconds=2 * i))
        for i in range(50)
    ]
    async with opened(store, result_ttl=ttl) as a:
        for record in results:
            await a.store.insert([record])
        await eventually(lambda: len(store) == 0, message="results did not expire")
    assert len(fired) <= 5, fired  # a timer a result would fire about 50 times
