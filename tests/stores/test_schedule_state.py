"""The schedule-state part of the store contract (periodic tasks), for every store kind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from _support import opened

from fastworker_fastapi.stores.base import ScheduleState

T0 = datetime(2030, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)


async def test_schedule_state_upserts_and_reads_back(backend: Any) -> None:
    async with opened(backend.make()) as a:
        assert await a.store.schedule_states() == {}
        state = await a.store.update_schedule("nightly", last_due=T0)
        assert state == ScheduleState("nightly", paused=False, last_due=T0)
        assert await a.store.schedule_states() == {"nightly": state}
        paused = await a.store.update_schedule("nightly", paused=True)
        assert paused == ScheduleState("nightly", paused=True, last_due=T0)
        resumed = await a.store.update_schedule("nightly", paused=False, resumed_at=T0)
        assert resumed == ScheduleState("nightly", False, T0, T0)
        other = await a.store.update_schedule("hourly", paused=True)
        assert other == ScheduleState("hourly", paused=True)
        states = await a.store.schedule_states()
        assert states == {"nightly": resumed, "hourly": other}
        assert states["nightly"].last_due is not None and states["nightly"].last_due.tzinfo


async def test_last_due_only_moves_forward(backend: Any) -> None:
    later = T0 + timedelta(microseconds=1)
    async with opened(backend.make()) as a:
        await a.store.update_schedule("s", last_due=later)
        assert (await a.store.update_schedule("s", last_due=T0)).last_due == later
        assert (await a.store.update_schedule("s", paused=True)).last_due == later
        assert (await a.store.update_schedule("s", last_due=later + timedelta(1))).last_due == (
            later + timedelta(1)
        )


async def test_schedule_state_is_shared_and_kept(shared_backend: Any) -> None:
    async with opened(shared_backend.make()) as a, opened(shared_backend.make()) as b:
        await a.store.update_schedule("s", paused=True, last_due=T0)
        assert (await b.store.schedule_states())["s"] == ScheduleState("s", True, T0)
        await b.store.update_schedule("s", paused=False)
        assert (await a.store.schedule_states())["s"].paused is False
    async with opened(shared_backend.make()) as c:  # a restart keeps it
        assert (await c.store.schedule_states())["s"] == ScheduleState("s", False, T0)
