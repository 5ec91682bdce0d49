"""Periodic tasks, driven by a clock the test moves: due times, exactly once, the missed-run
policy across a restart, pause/resume by route, declarations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastworker.tasks.registry import task
from fastworker.tasks.registry import task_registry as fastworker_registry

from fastworker_fastapi import (
    ConfigurationError,
    FastWorker,
    ScheduleNotFoundError,
    TaskClient,
    TaskStatus,
    background_task,
    schedule,
)
from fastworker_fastapi.periodic import (
    PeriodicTasks,
    Schedule,
    SystemClock,
    make_schedule,
    schedule_task_id,
    schedules,
)
from fastworker_fastapi.stores import SQLiteStore
from tests._clock import ManualClock
from tests.conftest import eventually, serve

T0 = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)  # 30 s past a minute
MINUTE = timedelta(minutes=1)
RUNS: list[tuple[str, int]] = []


@background_task(name="pt_tick")
def pt_tick(label: str = "", n: int = 0) -> str:
    RUNS.append((label, n))
    return label


def due(minutes: int) -> datetime:
    """The `minutes`-th minute boundary after T0's minute."""
    return T0.replace(second=0) + MINUTE * minutes


async def settle(clock: ManualClock, delta: timedelta = timedelta(0)) -> None:
    """Move the clock, then wait until the runner has done what was due and sleeps again."""
    clock.advance(delta)
    await eventually(clock.parked, message="the periodic runner to go back to sleep")


@asynccontextmanager
async def running(
    fw: FastWorker, clock: ManualClock
) -> AsyncIterator[TaskClient]:  # an app-less extension on a hand-moved clock
    fw.periodic.clock = clock
    async with fw.run() as client:
        await settle(clock)
        yield client


async def ids_of(client: TaskClient, name: str = "pt_tick") -> set[str]:
    return {record.id for record in await client.store.recent(limit=500, name=name)}


# -- declaring --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of cron= and every="),
        ({"cron": "* * * * *", "every": 5}, "exactly one of cron= and every="),
        ({"cron": "61 * * * *"}, "not a cron expression"),
        ({"cron": 5}, "cron= must be a string"),
        ({"every": 0}, "every= must be > 0"),
        ({"every": "5"}, "every= must be a timedelta or seconds"),
        ({"every": float("inf")}, "must be finite"),
        ({"every": 5, "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"every": 5, "jitter": -1}, "jitter= must be >= 0"),
        ({"every": 5, "jitter": "1"}, "jitter= must be seconds"),
        ({"every": 5, "missed": "sometimes"}, "missed= must be one of"),
        ({"every": 5, "max_missed": 0}, "max_missed= must be an int >= 1"),
        ({"every": 5, "args": [object()]}, "must be JSON values"),
        ({"every": 5, "kwargs": {"nope": 1}}, "cannot be called with"),
        ({"every": 5, "name": "a/b"}, "without '/'"),
    ],
)
def test_bad_schedules_are_refused_with_the_reason(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make_schedule(pt_tick, **options)


def test_cron_is_read_in_its_time_zone_and_intervals_from_the_epoch() -> None:
    paris = make_schedule("pt_tick", cron="0 9 * * *", tz="Europe/Paris")
    assert paris.tz == ZoneInfo("Europe/Paris") and paris.tz_name == "Europe/Paris"
    winter = datetime(2030, 1, 10, 12, tzinfo=UTC)
    summer = datetime(2030, 7, 10, 12, tzinfo=UTC)
    assert paris.next_after(winter) == datetime(2030, 1, 11, 8, tzinfo=UTC)
    assert paris.next_after(summer) == datetime(2030, 7, 11, 7, tzinfo=UTC)
    assert paris.description == "At 09:00 every day"
    assert make_schedule("pt_tick", cron="0 9 * * *", tz=ZoneInfo("UTC")).tz is UTC
    every = make_schedule("pt_tick", every=timedelta(hours=1))
    assert every.next_after(datetime(2030, 1, 1, 5, 59, 59, tzinfo=UTC)) == datetime(
        2030, 1, 1, 6, tzinfo=UTC
    )
    assert every.next_after(datetime(2030, 1, 1, 6, tzinfo=UTC)) == datetime(
        2030, 1, 1, 7, tzinfo=UTC
    )
    assert every.description == "Every hour"
    assert make_schedule("pt_tick", every=90).description == "Every 90 seconds"
    assert make_schedule("pt_tick", every=120).description == "Every 2 minutes"
    assert make_schedule("pt_tick", every=1).description == "Every second"


def test_due_times_are_the_latest_ones_in_the_window_oldest_first() -> None:
    for item in (
        make_schedule("pt_tick", every=60),
        make_schedule("pt_tick", cron="* * * * *", tz="America/New_York"),
    ):
        assert item.due_times(due(0), due(5), 10) == [due(m) for m in range(1, 6)]
        assert item.due_times(due(0), due(5) + timedelta(seconds=30), 2) == [due(4), due(5)]
        assert item.due_times(due(5), due(5), 10) == []
    until = make_schedule("pt_tick", every=60, until=due(3).replace(tzinfo=None))
    assert until.due_times(due(0), due(5), 10) == [due(1), due(2), due(3)]
    assert until.next_after(due(3)) is None
    yearly = make_schedule("pt_tick", cron="0 0 29 2 MON")  # rare, but it exists
    assert yearly.next_after(T0) is not None


def test_jitter_is_fixed_per_due_time_and_bounded() -> None:
    item = make_schedule("pt_tick", every=60, jitter=timedelta(seconds=30))
    values = {item.jitter_for(schedule_task_id("x", due(m))) for m in range(20)}
    assert all(0 <= v <= 30 for v in values) and len(values) == 20
    assert item.jitter_for("same") == item.jitter_for("same")
    assert make_schedule("pt_tick", every=60).jitter_for("same") == 0.0


def test_the_task_id_is_the_same_for_one_due_time_in_any_zone() -> None:
    here = schedule_task_id("s", due(1))
    assert here == schedule_task_id("s", due(1).astimezone(ZoneInfo("Asia/Tokyo")))
    assert here != schedule_task_id("s", due(2)) != schedule_task_id("t", due(1))


def test_the_decorator_and_schedule_declare_for_every_app() -> None:
    try:

        @background_task(name="pt_declared", cron="*/5 * * * *", tz="Europe/Paris", jitter=3)
        def pt_declared() -> None:
            return None

        declared = schedules.get("pt_declared")
        assert declared is not None and declared.cron == "*/5 * * * *" and declared.jitter == 3
        assert declared.tz_name == "Europe/Paris" and declared.missed == "skip"

        def existing_cleanup(days: int) -> int:  # a plain function, not a task yet
            return days

        made = schedule(existing_cleanup, every=timedelta(hours=6), args=[30], missed="run_once")
        assert made.task == "existing_cleanup" and made.args == (30,)
        assert make_schedule(existing_cleanup, every=timedelta(hours=6), args=[30]) != made
        again = schedule(existing_cleanup, every=timedelta(hours=6), args=[30], missed="run_once")
        assert again == made  # a module imported twice declares the same thing twice
        with pytest.raises(ConfigurationError, match="a different schedule"):
            schedule(existing_cleanup, every=timedelta(hours=1), args=[30])
        names = {s.name for s in PeriodicTasks().all()}
        assert {"pt_declared", "existing_cleanup"} <= names
        with pytest.raises(ConfigurationError, match="give cron= or every= too"):
            background_task(name="pt_no_schedule", tz="UTC")(lambda: None)
        with pytest.raises(ConfigurationError, match="needs a task"):
            make_schedule(42, every=5)  # type: ignore[arg-type]
    finally:
        schedules.remove("pt_declared")
        schedules.remove("existing_cleanup")


def test_fastworkers_own_periodic_tasks_are_honoured() -> None:
    @task(repeat_interval=30)
    def pt_fw_every() -> None:
        return None

    @task(cron="0 * * * *")
    def pt_fw_cron() -> None:
        return None

    @task(cron="not cron at all")
    def pt_fw_broken() -> None:
        return None

    try:
        found = {s.name: s for s in PeriodicTasks().all()}
        assert found["pt_fw_every"].every == timedelta(seconds=30)
        assert found["pt_fw_cron"].cron == "0 * * * *"
        assert "pt_fw_broken" not in found  # logged and ignored
    finally:
        for name in ("pt_fw_every", "pt_fw_cron", "pt_fw_broken"):
            fastworker_registry._tasks.pop(name, None)


async def test_the_system_clock_naps_at_most_max_nap() -> None:
    clock = SystemClock(max_nap=0.01)
    before = clock.now()
    assert before.tzinfo is UTC
    await clock.sleep_until(before + timedelta(days=1))  # returns after a nap: no hang
    await clock.sleep_until(before - timedelta(days=1))


# -- running ----------------------------------------------------------------------------------


async def test_each_due_time_becomes_one_ordinary_task() -> None:
    clock = ManualClock(T0)
    fw = FastWorker(prefix=None)
    fw.schedule(pt_tick, every=MINUTE, name="pt-every", args=["every"], kwargs={"n": 7})
    fw.schedule("pt_tick", cron="*/2 * * * *", name="pt-cron", kwargs={"label": "cron"})
    async with running(fw, clock) as client:
        assert await ids_of(client) == set()  # nothing is due at start
        await settle(clock, MINUTE)
        first = schedule_task_id("pt-every", due(1))
        assert await ids_of(client) == {first}
        result = await client.wait(first, timeout=10)
        assert result.status is TaskStatus.SUCCESS and result.result == "every"
        await settle(clock, MINUTE)
        second = {schedule_task_id("pt-every", due(2)), schedule_task_id("pt-cron", due(2))}
        assert await ids_of(client) == {first} | second
        for task_id in second:
            await client.wait(task_id, timeout=10)
        state = (await client.store.schedule_states())["pt-every"]
        assert state.last_due == due(2)
        await settle(clock, MINUTE * 3)  # a stall: only the latest due time is made
        assert schedule_task_id("pt-every", due(5)) in await ids_of(client)
        assert schedule_task_id("pt-every", due(4)) not in await ids_of(client)


async def test_two_stores_on_one_file_make_each_due_time_once(tmp_path: Path) -> None:
    """Two extensions with their own SQLite stores on one file: two processes, in one."""
    clock = ManualClock(T0)
    path = tmp_path / "tasks.db"
    one = FastWorker(prefix=None, store=SQLiteStore(path, poll_interval=0.02))
    two = FastWorker(prefix=None, store=SQLiteStore(path, poll_interval=0.02))
    for fw in (one, two):
        fw.schedule(pt_tick, every=MINUTE, name="pt-shared", args=["shared"])
    async with running(one, clock) as a, running(two, clock) as b:
        for _ in range(4):
            await settle(clock, MINUTE)
        made = {schedule_task_id("pt-shared", due(m)) for m in range(1, 5)}
        assert await ids_of(a) == made == await ids_of(b)
        for task_id in made:
            assert (await a.wait(task_id, timeout=10)).status is TaskStatus.SUCCESS


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("skip", []), ("run_once", [7]), ("run_all", [5, 6, 7])],
)
async def test_missed_runs_after_a_restart_follow_the_policy(
    tmp_path: Path, policy: str, expected: list[int]
) -> None:
    clock = ManualClock(T0)
    store = f"sqlite:///{tmp_path / 'tasks.db'}"

    def app() -> FastWorker:
        fw = FastWorker(prefix=None, store=store)
        fw.schedule(pt_tick, every=MINUTE, name="pt-missed", missed=policy, max_missed=3)  # type: ignore[typeddict-item]
        return fw

    async with running(app(), clock) as client:
        await settle(clock, MINUTE)
        await client.wait(schedule_task_id("pt-missed", due(1)), timeout=10)
    clock.advance(MINUTE * 6)  # down from due(1) to just after due(7): 6 runs missed
    async with running(app(), clock) as client:
        caught_up = {schedule_task_id("pt-missed", due(m)) for m in expected}
        assert await ids_of(client) == {schedule_task_id("pt-missed", due(1))} | caught_up
        for task_id in caught_up:
            assert (await client.wait(task_id, timeout=10)).status is TaskStatus.SUCCESS
        await settle(clock, MINUTE)  # and the schedule goes on
        assert schedule_task_id("pt-missed", due(8)) in await ids_of(client)
    clock.advance(MINUTE * 2)  # down again, from due(8) to just after due(10)
    async with running(app(), clock) as client:
        again = {"skip": [], "run_once": [10], "run_all": [9, 10]}[policy]
        every = [1, *expected, 8, *again]
        assert await ids_of(client) == {schedule_task_id("pt-missed", due(m)) for m in every}


async def test_pause_and_resume_by_route_for_every_process(tmp_path: Path) -> None:
    def token(x_token: Annotated[str | None, Header()] = None) -> None:
        if x_token != "secret":
            raise HTTPException(401, "no")

    clock = ManualClock(T0)
    app = FastAPI()
    fw = FastWorker(
        app,
        store=f"sqlite:///{tmp_path / 'tasks.db'}",
        route_dependencies=[Depends(token)],
    )
    fw.periodic.clock = clock
    fw.schedule(pt_tick, every=MINUTE, name="pt-paused", missed="run_all")
    fw.schedule(pt_tick, cron="0 0 1 1 *", name="pt-off", enabled=False)
    auth = {"x-token": "secret"}
    async with serve(app) as http:
        await settle(clock)
        assert (await http.get("/tasks/schedules")).status_code == 401
        listing = (await http.get("/tasks/schedules", headers=auth)).json()
        assert listing["count"] == 2
        paused, off = (
            next(s for s in listing["schedules"] if s["name"] == name)
            for name in ("pt-paused", "pt-off")
        )
        assert paused["every"] == 60 and paused["cron"] is None and paused["tz"] == "UTC"
        assert paused["next_run"] == due(1).isoformat().replace("+00:00", "Z")
        assert paused["last_run"] is None and paused["last_status"] is None
        assert off["enabled"] is False and off["next_run"] is None and off["cron"] == "0 0 1 1 *"

        await settle(clock, MINUTE)
        first = schedule_task_id("pt-paused", due(1))
        await fw.client.wait(first, timeout=10)
        shown = (await http.get("/tasks/schedules", headers=auth)).json()["schedules"]
        row = next(s for s in shown if s["name"] == "pt-paused")
        assert row["last_task_id"] == first and row["last_status"] == "success"

        assert (await http.post("/tasks/schedules/pt-paused/pause")).status_code == 401
        answer = await http.post("/tasks/schedules/pt-paused/pause", headers=auth)
        assert answer.status_code == 200
        assert answer.json()["paused"] is True and answer.json()["next_run"] is None
        await settle(clock, MINUTE * 3)
        assert await ids_of(fw.client) == {first}  # paused: nothing was made

        missing = await http.post("/tasks/schedules/nope/resume", headers=auth)
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
        answer = await http.post("/tasks/schedules/pt-paused/resume", headers=auth)
        assert answer.json()["paused"] is False
        await settle(clock, MINUTE)
        assert await ids_of(fw.client) == {first, schedule_task_id("pt-paused", due(5))}
        await fw.client.wait(schedule_task_id("pt-paused", due(5)), timeout=10)
        await fw.periodic.pause("pt-paused")  # and pause for the restart below
    clock.advance(MINUTE * 2)
    async with serve(app) as http:  # paused at start-up: nothing caught up, nothing made
        await settle(clock, MINUTE)
        assert len(await ids_of(fw.client)) == 2
        await fw.periodic.resume("pt-paused")
    clock.advance(MINUTE * 3)
    async with serve(app) as http:  # runs missed while paused are not owed after a resume
        await settle(clock)
        assert len(await ids_of(fw.client)) == 5  # due(9), (10) and (11): missed after resume
    with pytest.raises(ScheduleNotFoundError):
        fw.periodic.get("nope")


async def test_schedules_routes_are_in_the_openapi_schema() -> None:
    app = FastAPI()
    FastWorker(app)
    async with serve(app) as http:
        schema = (await http.get("/openapi.json")).json()
    listing = schema["paths"]["/tasks/schedules"]["get"]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ScheduleList"
    }
    pause = schema["paths"]["/tasks/schedules/{name}/pause"]["post"]
    assert pause["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ScheduleInfo"
    }
    assert "404" in pause["responses"] and "ScheduleInfo" in schema["components"]["schemas"]


async def test_a_schedule_of_an_unknown_task_stops_start_up() -> None:
    fw = FastWorker(prefix=None)
    fw.periodic.schedule("pt_no_such_task", every=60)
    with pytest.RaisesGroup(pytest.RaisesExc(ConfigurationError, match="not registered")):
        async with fw.run():
            pass


async def test_jitter_delays_the_run_and_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(T0)
    fw = FastWorker(prefix=None, max_pending=1)
    fw.schedule(pt_tick, every=MINUTE, name="pt-jitter", jitter=3600)
    async with running(fw, clock) as client:
        await settle(clock, MINUTE)
        task_id = schedule_task_id("pt-jitter", due(1))
        record = await client.store.get(task_id)
        assert record is not None and record.status is TaskStatus.SCHEDULED
        assert record.eta is not None and record.eta > datetime.now(UTC)  # made with a delay
        await client.cancel_task(task_id)
        client.scheduler.accepting = False  # the scheduler refuses: logged, not fatal
        try:
            await settle(clock, MINUTE)
        finally:
            client.scheduler.accepting = True
        assert "could not create the run" in caplog.text
        assert schedule_task_id("pt-jitter", due(2)) not in await ids_of(client)
        await settle(clock, MINUTE)
        assert schedule_task_id("pt-jitter", due(3)) in await ids_of(client)


def test_a_schedule_is_plain_data() -> None:
    item = make_schedule("pt_tick", every=60)
    assert isinstance(item, Schedule) and item.kwargs == {} and item.until is None
