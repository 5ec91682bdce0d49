"""Progress, server-sent events and the dashboard route (the browser test is separate)."""

from __future__ import annotations

import contextvars
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from _server import live_server
from fastapi import Depends, FastAPI, Header, HTTPException
from fastworker.tasks.models import TaskPriority, TaskStatus

from fastworker_fastapi import (
    CallbackSettings,
    ConfigurationError,
    FastWorker,
    background_task,
    report_progress,
)
from fastworker_fastapi.events import EventHub
from fastworker_fastapi.live import task_events
from fastworker_fastapi.progress import MAX_MESSAGE_LENGTH
from fastworker_fastapi.records import TaskPolicy, TaskRecord
from tests.conftest import eventually, serve

# Gates let a test hold a task at a known point; keyed by a token the test passes in.
_async_gates: dict[str, anyio.Event] = {}
_thread_gates: dict[str, threading.Event] = {}
_attempts: dict[str, int] = {}


@background_task(name="live_plain")
async def live_plain() -> str:
    return "quick"


@background_task(name="live_async_progress")
async def live_async_progress(token: str, steps: int) -> str:
    report_progress(0.5, "halfway")
    await _async_gates[token].wait()
    for i in range(steps):
        report_progress((i + 1) / steps, f"step {i + 1}")
    return "done"


@background_task(name="live_sync_progress")
def live_sync_progress(token: str, steps: int) -> int:
    report_progress(0.25, "in a thread")
    assert _thread_gates[token].wait(10)
    for i in range(steps):
        report_progress((i + 1) / steps, f"step {i + 1}")
    return steps


@background_task(name="live_trailing")
async def live_trailing(token: str) -> None:
    report_progress(0.1, "first")
    report_progress(0.2, "second")  # held back by the throttle, yet must be published
    await _async_gates[token].wait()


@background_task(name="live_flaky", max_retries=2, retry_delay=0.01)
async def live_flaky(token: str) -> str:
    _attempts[token] = _attempts.get(token, 0) + 1
    if _attempts[token] == 1:
        await _async_gates[token].wait()
    if _attempts[token] < 3:
        raise RuntimeError(f"attempt {_attempts[token]} fails")
    return "third time lucky"


@background_task(name="live_quick")
async def live_quick(x: int) -> int:
    return x


@background_task(name="live_wait")
async def live_wait(token: str) -> None:
    await _async_gates[token].wait()


def _gate(token: str) -> anyio.Event:
    _async_gates[token] = anyio.Event()
    return _async_gates[token]


def make_app(**options: Any) -> tuple[FastAPI, FastWorker]:
    app = FastAPI()
    options.setdefault("event_heartbeat", 0.05)
    return app, FastWorker(app, **options)


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream; ("comment", text) for comments."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield event, "\n".join(data)
            event, data = "message", []


# -- progress -------------------------------------------------------------------------------


async def test_progress_from_an_async_task_shows_in_the_status_route() -> None:
    app, fw = make_app()
    gate = _gate("async-1")
    async with serve(app) as http:
        task_id = await live_async_progress.delay("async-1", 50)

        async def halfway() -> bool:
            body = (await http.get(f"/tasks/{task_id}")).json()
            return body["progress"] == 0.5 and body["progress_message"] == "halfway"

        await eventually(halfway, message="progress 0.5 visible")
        gate.set()
        await fw.client.wait(task_id, timeout=10)
        body = (await http.get(f"/tasks/{task_id}")).json()
    assert body["status"] == "success"
    assert (body["progress"], body["progress_message"]) == (1.0, "step 50")  # the last value


async def test_progress_from_a_sync_task_is_throttled_and_keeps_the_last_value() -> None:
    app, fw = make_app()
    _thread_gates["sync-1"] = threading.Event()
    async with serve(app) as http:
        task_id = await live_sync_progress.delay("sync-1", 20_000)
        record = fw.client.store.peek(task_id)
        assert record is not None

        async def in_thread() -> bool:
            body = (await http.get(f"/tasks/{task_id}")).json()
            return body["progress"] == 0.25 and body["progress_message"] == "in a thread"

        await eventually(in_thread, message="progress from the worker thread")
        published: list[float | None] = []
        fw.client.events.add_listener(lambda r: published.append(r.progress))
        started = time.monotonic()
        _thread_gates["sync-1"].set()
        await fw.client.wait(task_id, timeout=20)
        elapsed = time.monotonic() - started
        body = (await http.get(f"/tasks/{task_id}")).json()
    assert body["result"] == 20_000
    assert (body["progress"], body["progress_message"]) == (1.0, "step 20000")
    # 20,000 reports, yet about one publish per 100 ms (plus the final status).
    assert len(published) <= elapsed / 0.1 + 3, (len(published), elapsed)


async def test_a_held_back_value_is_published_without_further_reports() -> None:
    app, fw = make_app()
    gate = _gate("trail-1")
    async with serve(app):
        seen: list[tuple[float | None, str | None]] = []
        fw.client.events.add_listener(lambda r: seen.append((r.progress, r.progress_message)))
        task_id = await live_trailing.delay("trail-1")
        await eventually(lambda: (0.2, "second") in seen, message="trailing value published")
        record = fw.client.store.peek(task_id)
        assert record is not None
        assert record.status is TaskStatus.RUNNING  # published while the task still waits
        assert (0.1, "first") in seen
        gate.set()
        await fw.client.wait(task_id, timeout=10)


def test_report_progress_outside_a_task_does_nothing_but_checks_its_arguments() -> None:
    report_progress(0.5, "not in a task")  # a plain call: no error
    assert live_quick.__wrapped__ is not None
    with pytest.raises(ValueError, match="from 0 to 1"):
        report_progress(1.5)
    with pytest.raises(ValueError, match="from 0 to 1"):
        report_progress(float("nan"))
    with pytest.raises(TypeError, match="number"):
        report_progress(True)
    with pytest.raises(TypeError, match="string"):
        report_progress(0.5, 42)  # type: ignore[arg-type]


async def test_long_messages_are_cut_and_late_or_foreign_reports_are_harmless() -> None:
    app, fw = make_app()
    gate = _gate("msg-1")
    async with serve(app):
        task_id = await live_wait.delay("msg-1")
        record = await eventually(lambda: fw.client.store.peek(task_id))
        await eventually(lambda: record.status is TaskStatus.RUNNING)
        publisher_context: contextvars.Context | None = None

        # Capture a task's context (record + publisher) the way a user's own thread might.
        @background_task(name="live_capture_context")
        async def live_capture_context() -> None:
            nonlocal publisher_context
            publisher_context = contextvars.copy_context()
            report_progress(0.3, "x" * (MAX_MESSAGE_LENGTH + 50))

        capture_id = await live_capture_context.delay()
        await fw.client.wait(capture_id, timeout=10)
        captured = fw.client.store.peek(capture_id)
        assert captured is not None
        assert captured.progress_message is not None
        assert len(captured.progress_message) == MAX_MESSAGE_LENGTH
        assert publisher_context is not None
        # The task has finished: a late report is dropped; no state is kept for it.
        publisher_context.run(report_progress, 0.9)
        assert captured.progress == 0.3

        # A live task's context run in a thread that is not an anyio worker: no error, no hop.
        @background_task(name="live_capture_running")
        async def live_capture_running(token: str) -> None:
            nonlocal publisher_context
            publisher_context = contextvars.copy_context()
            await _async_gates[token].wait()

        gate2 = _gate("msg-2")
        running_id = await live_capture_running.delay("msg-2")
        await eventually(lambda: fw.client.get_status(running_id) is TaskStatus.RUNNING)
        context = publisher_context
        errors: list[BaseException] = []

        def foreign_thread() -> None:
            try:
                context.run(report_progress, 0.7, "from elsewhere")
            except BaseException as exc:  # pragma: no cover - the assertion shows it
                errors.append(exc)

        thread = threading.Thread(target=foreign_thread)
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        assert errors == []
        gate.set()
        gate2.set()
        await fw.client.wait(task_id, timeout=10)
        await fw.client.wait(running_id, timeout=10)


# -- event streams --------------------------------------------------------------------------


async def test_one_task_stream_follows_retries_in_order_and_closes_after_success() -> None:
    app, fw = make_app()
    gate = _gate("flaky-1")
    async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await live_flaky.delay("flaky-1")
        await eventually(lambda: fw.client.get_status(task_id) is TaskStatus.RUNNING)
        seen: list[tuple[str, int]] = []
        heartbeats = 0
        async with http.stream("GET", f"/tasks/{task_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            async for event, data in sse_events(response):
                if event == "comment":
                    heartbeats += 1
                    gate.set()  # the stream was idle long enough for a heartbeat: go on
                    continue
                assert event == "task"
                info = json.loads(data)
                seen.append((info["status"], info["attempts"]))
        # The loop ended because the server closed the stream after the final state. States
        # are coalesced per task (a quick retry may show only its latest state), in order.
        order = [
            ("running", 1),
            ("retrying", 1),
            ("running", 2),
            ("retrying", 2),
            ("running", 3),
            ("success", 3),
        ]
        assert seen[0] == ("running", 1)
        assert seen[-1] == ("success", 3)
        assert [order.index(state) for state in seen] == sorted({order.index(s) for s in seen})
        assert heartbeats >= 1
        await eventually(lambda: fw.client.events.subscriber_count == 0)


async def test_stream_of_a_finished_task_sends_its_state_and_closes() -> None:
    app, fw = make_app()
    async with serve(app) as http:  # a finite stream: the in-process transport is enough
        task_id = await live_quick.delay(7)
        await fw.client.wait(task_id, timeout=10)
        response = await http.get(f"/tasks/{task_id}/events")
        assert response.status_code == 200
        events = [block for block in response.text.split("\n\n") if block.startswith("event:")]
        assert len(events) == 1
        assert json.loads(events[0].split("data: ", 1)[1])["result"] == 7
        assert fw.client.events.subscriber_count == 0


async def test_unknown_and_malformed_ids_are_refused() -> None:
    app, _ = make_app()
    async with serve(app) as http:
        missing = await http.get("/tasks/00000000-0000-0000-0000-000000000000/events")
        assert missing.status_code == 404
        assert "unknown or expired" in missing.json()["detail"]
        assert (await http.get("/tasks/not-a-uuid/events")).status_code == 404


async def test_all_tasks_stream_filters_and_disconnect_releases_the_subscription() -> None:
    app, fw = make_app()
    async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        hub = fw.client.events
        statuses: list[str] = []
        async with http.stream("GET", "/tasks/events", params={"name": "live_quick"}) as response:
            assert response.status_code == 200
            events = sse_events(response)
            await eventually(lambda: hub.subscriber_count == 1, message="subscribed")
            gate = _gate("all-1")
            other = await live_wait.delay("all-1")  # filtered out by name
            await live_quick.delay(1)
            async for event, data in events:
                if event == "task":
                    info = json.loads(data)
                    assert info["name"] == "live_quick"
                    statuses.append(info["status"])
                    if info["status"] == "success":
                        break
            gate.set()
            await fw.client.wait(other, timeout=10)
            # Still open; leave while it is idle (only heartbeats flow).
            kind, _ = await anext(events)
            assert kind == "comment"
        # Coalesced per task: some of queued and running, in order, and always the final state.
        order = ["queued", "running", "success"]
        assert statuses[-1] == "success"
        assert [order.index(x) for x in statuses] == sorted({order.index(x) for x in statuses})
        await eventually(lambda: hub.subscriber_count == 0, message="released on disconnect")

        # A status filter: only changes *into* that status.
        async with http.stream("GET", "/tasks/events", params={"status": "success"}) as response:
            events = sse_events(response)
            await eventually(lambda: hub.subscriber_count == 1, message="subscribed")
            await live_quick.delay(2)
            async for event, data in events:
                if event == "task":
                    assert json.loads(data)["status"] == "success"
                    break
        await eventually(lambda: hub.subscriber_count == 0)


async def test_disconnect_from_a_running_tasks_stream_releases_it() -> None:
    app, fw = make_app(event_heartbeat=60)  # no heartbeat: the disconnect alone must do it
    gate = _gate("disc-1")
    async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await live_wait.delay("disc-1")
        await eventually(lambda: fw.client.get_status(task_id) is TaskStatus.RUNNING)
        async with http.stream("GET", f"/tasks/{task_id}/events") as response:
            async for event, _ in sse_events(response):
                if event == "task":
                    break
            assert fw.client.events.subscriber_count == 1
        await eventually(lambda: fw.client.events.subscriber_count == 0)
        gate.set()
        await fw.client.wait(task_id, timeout=10)


def _record(name: str = "live_x") -> TaskRecord:
    return TaskRecord(
        id="r1",
        name=name,
        args=[],
        kwargs={},
        priority=TaskPriority.NORMAL,
        policy=TaskPolicy(),
        status=TaskStatus.RUNNING,
        created=time.time(),
    )


def _record_of(task_id: str, status: TaskStatus = TaskStatus.RUNNING) -> TaskRecord:
    record = _record()
    record.id = task_id
    record.status = status
    return record


async def test_a_reader_that_stopped_gets_an_overflow_event_then_the_end() -> None:
    hub = EventHub()
    body = task_events(hub, max_buffer=2, heartbeat=10)
    assert await anext(body) == "retry: 1000\n\n"
    # Far more tasks than its bound while the reader takes nothing: publishing does not
    # notice (it costs the same), the reader learns it missed changes when it reads.
    for n in range(2 * 64 + 1):
        hub.publish(_record_of(f"t{n}"))
    rest = [chunk async for chunk in body]
    assert [chunk.split("\n", 1)[0] for chunk in rest] == ["event: overflow"]
    assert "re-read the state" in rest[-1]
    assert hub.subscriber_count == 0


async def test_a_reader_behind_the_start_of_the_log_overflows_and_the_rest_go_on() -> None:
    hub = EventHub(log_max=4)
    async with hub.subscribe(max_buffer=8) as slow, hub.subscribe(max_buffer=8) as quick:
        for task_id in "abcdefgh":
            hub.publish(_record_of(task_id))
            assert (await anext(quick)).record.id == task_id  # keeps up
        assert [r async for r in slow] == []  # read nothing while a..d fell off the log
        assert slow.overflowed
        assert not quick.overflowed
        hub.publish(_record_of("i"))
        assert (await anext(quick)).record.id == "i"


async def test_a_waiting_reader_is_not_dropped_by_a_burst_and_sees_each_task_once() -> None:
    hub = EventHub()
    async with hub.subscribe(max_buffer=2) as subscription:
        for n in range(100):  # a burst of 100 tasks, each changing three times
            for status in (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCESS):
                hub.publish(_record_of(f"t{n}", status))
        assert not subscription.overflowed
        hub.close()
        seen = [(c.record.id, c.record.status) async for c in subscription]
    assert seen == [(f"t{n}", TaskStatus.SUCCESS) for n in range(100)]


async def test_coalescing_keeps_the_latest_state_in_the_order_of_last_changes() -> None:
    hub = EventHub()
    async with hub.subscribe(max_buffer=8) as subscription:
        hub.publish(_record_of("a"))
        hub.publish(_record_of("b"))
        hub.publish(_record_of("a", TaskStatus.SUCCESS))  # a changed last: it comes last
        first = (await anext(subscription)).record
        assert first.id == "b"
        hub.publish(_record_of("b", TaskStatus.FAILURE))  # after a's change: after a
        a = (await anext(subscription)).record
        assert (a.id, a.status) == ("a", TaskStatus.SUCCESS)
        b = (await anext(subscription)).record
        assert (b.id, b.status) == ("b", TaskStatus.FAILURE)


async def test_a_burst_goes_out_as_one_chunk_and_each_change_is_serialised_once() -> None:
    hub = EventHub()
    bodies = [task_events(hub, max_buffer=8, heartbeat=10) for _ in range(2)]
    for body in bodies:
        await anext(body)
    for n in range(3):
        hub.publish(_record_of(f"t{n}"))
    chunks = [await anext(body) for body in bodies]
    assert chunks[0] == chunks[1]
    assert re.findall(r"^event: (\w+)", chunks[0], re.M) == ["task"] * 3
    for body in bodies:
        await body.aclose()


async def test_unfiltered_streams_at_one_position_share_one_text_and_filtered_ones_do_not() -> None:
    hub = EventHub()
    quick = [hub.subscribe(max_buffer=8) for _ in range(3)]
    only_b = hub.subscribe(max_buffer=8, accept=lambda record: record.id == "b")
    for task_id in "abc":
        hub.publish(_record_of(task_id))
    hub.publish(_record_of("a", TaskStatus.SUCCESS))
    texts = [subscription.drain_text() for subscription in quick]
    assert texts[0] is texts[1] is texts[2]  # made once, by the first reader
    assert re.findall(r'"id":"(\w)","name":"live_x","status":"(\w+)"', texts[0]) == [
        ("b", "running"),
        ("c", "running"),
        ("a", "success"),  # a changed last: in its latest state, once
    ]
    assert re.findall(r'"id":"(\w)"', only_b.drain_text()) == ["b"]
    assert [subscription.drain_text() for subscription in quick] == ["", "", ""]
    hub.publish(_record_of("d"))
    late = hub.subscribe(max_buffer=8)  # its own position: after d
    assert quick[0].drain_text().count("event: task") == 1
    assert late.drain_text() == ""
    for subscription in (*quick, only_b, late):
        subscription.close()


async def test_streams_wait_for_one_shared_tick_and_closing_the_hub_releases_it() -> None:
    hub = EventHub()
    subscription = hub.subscribe(max_buffer=8)
    done: list[int] = []
    async with anyio.create_task_group() as group:

        async def wait_tick(n: int) -> None:
            await hub.pace()
            done.append(n)

        for n in range(3):
            group.start_soon(wait_tick, n)
        await eventually(lambda: len(hub._pace_waiters) == 3)
        assert hub._pace_handle is not None  # one timer for all of them
        hub.close()  # shutdown does not wait for the tick
    assert sorted(done) == [0, 1, 2]
    assert subscription.closed


async def test_closing_the_hub_ends_streams_with_a_shutdown_event() -> None:
    hub = EventHub()
    body = task_events(hub, max_buffer=8, heartbeat=10)
    await anext(body)
    hub.publish(_record_of("pending"))
    hub.close()  # what the extension does at shutdown
    rest = "".join([chunk async for chunk in body])
    assert re.findall(r"^event: (\w+)", rest, re.M) == ["task", "shutdown"]
    later = task_events(hub, max_buffer=8, heartbeat=10)  # opened after: ends at once
    assert [chunk.split("\n", 1)[0] async for chunk in later] == ["retry: 1000", "event: shutdown"]


# -- auth, options, dashboard route ---------------------------------------------------------


def require_token(x_token: str | None = Header(default=None)) -> None:
    if x_token != "secret":
        raise HTTPException(status_code=401, detail="missing or wrong token")


async def test_every_live_route_is_behind_the_route_dependencies() -> None:
    app, fw = make_app(route_dependencies=[Depends(require_token)])
    good = {"X-Token": "secret"}
    async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        task_id = await live_quick.delay(3)
        await fw.client.wait(task_id, timeout=10)
        for path in ("/tasks/events", f"/tasks/{task_id}/events", "/tasks/dashboard"):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert refused.json() == {"detail": "missing or wrong token"}
            async with http.stream("GET", path, headers=good) as response:
                assert response.status_code == 200, path
        await eventually(lambda: fw.client.events.subscriber_count == 0)


async def test_dashboard_is_one_self_contained_page_and_can_be_turned_off() -> None:
    app, _ = make_app(prefix="/jobs")
    async with serve(app) as http:
        page = await http.get("/jobs/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        assert "<script src" not in html
        assert "<link" not in html
        assert "http://" not in html
        assert "https://" not in html
        assert "EventSource" in html
        schema = (await http.get("/openapi.json")).json()
        assert "/jobs/dashboard" not in schema["paths"]
        assert "/jobs/events" in schema["paths"]
        assert "/jobs/{task_id}/events" in schema["paths"]

    off, _ = make_app(dashboard=False)
    async with serve(off) as http:
        assert (await http.get("/tasks/dashboard")).status_code == 404  # not an id either


def test_invalid_live_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="event_heartbeat"):
        FastWorker(event_heartbeat=0)
    with pytest.raises(ConfigurationError, match="event_buffer"):
        FastWorker(event_buffer=0)


async def test_event_routes_answer_503_before_the_lifespan() -> None:
    app, _ = make_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/tasks/events")).status_code == 503


def test_a_listener_may_remove_itself_while_it_runs() -> None:
    hub = EventHub()
    calls: list[str] = []
    remove_first = hub.add_listener(lambda r: (calls.append("first"), remove_first()))
    hub.add_listener(lambda r: calls.append("second"))
    record = _record()
    hub.publish(record)
    hub.publish(record)
    assert calls == ["first", "second", "second"]


async def test_streams_sharing_a_text_share_its_bytes_and_closing_closes_the_body() -> None:
    from fastworker_fastapi.live import _encoded

    text = "event: task\ndata: {}\n\n"
    closed: list[bool] = []

    async def body() -> AsyncIterator[str]:
        try:
            yield text
            yield "other"
            yield text
        finally:
            closed.append(True)

    memo: list[Any] = []
    first = [chunk async for chunk in _encoded(body(), memo)]
    assert first == [text.encode(), b"other", text.encode()]
    stream = _encoded(body(), memo)
    again = await anext(stream)
    assert again == text.encode() and (again is first[2])  # the last text's bytes, reused
    await stream.aclose()  # a client that went away: its body is closed too
    assert closed == [True, True]


def test_the_hub_is_watched_only_while_someone_follows_every_change() -> None:
    hub = EventHub()
    assert not hub.watched
    hub.add_listener(lambda record: None, final_only=True)
    hub.add_listener(lambda record: None, remote_only=True)
    assert not hub.watched  # neither wants this process's non-final changes
    remove = hub.add_listener(lambda record: None)
    assert hub.watched
    remove()
    assert not hub.watched
    subscription = hub.subscribe()
    assert hub.watched
    subscription.close()
    assert not hub.watched


def test_final_records_are_wanted_only_while_someone_takes_them_all() -> None:
    hub = EventHub()
    assert not hub.finals_wanted
    hub.add_listener(lambda record: None, final_only=True, with_callback=True)
    hub.add_listener(lambda record: None, remote_only=True)
    assert not hub.finals_wanted  # callbacks' listener: only records with a callback
    remove = hub.add_listener(lambda record: None, final_only=True)
    assert hub.finals_wanted
    remove()
    assert not hub.finals_wanted
    remove = hub.add_listener(lambda record: None)
    assert hub.finals_wanted
    remove()
    subscription = hub.subscribe()
    assert hub.finals_wanted
    subscription.close()
    assert not hub.finals_wanted
    assert EventHub(keep_finals=8).finals_wanted  # kept for recent_final
    with pytest.raises(ValueError, match="final_only"):
        hub.add_listener(lambda record: None, with_callback=True)


async def test_memory_store_finals_reach_late_listeners_waiters_and_callbacks() -> None:
    # The memory store skips publishing a final record nobody wants (EventHub.finals_wanted):
    # whoever starts wanting them later, waits for one, or set a callback must still get it.
    fw = FastWorker(store="memory")
    async with fw.run() as client:
        hub = client.events
        first = await client.delay("live_plain")
        await client.wait(first, 5)
        finals: list[str] = []
        hub.add_listener(lambda record: finals.append(record.id), final_only=True)
        second = await client.delay("live_plain")
        assert (await client.wait(second, 5)).status is TaskStatus.SUCCESS
        assert finals == [second]
    called: list[str] = []
    no_retry = CallbackSettings(
        secret="s" * 32, allowed_hosts=("127.0.0.1",), max_attempts=1, timeout=0.1
    )
    fw = FastWorker(store="memory", callbacks=no_retry)
    async with fw.run() as client:
        client.events.add_listener(
            lambda record: called.append(record.id), final_only=True, with_callback=True
        )
        plain = await client.delay("live_plain")
        with_callback = await client.delay_with_callback("live_plain", "http://127.0.0.1:9/cb")
        for task_id in (plain, with_callback):
            await client.wait(task_id, 5)
    assert with_callback in called and plain not in called  # (again when its delivery ends)


async def test_a_follower_that_arrives_late_sees_every_change_with_the_memory_store() -> None:
    # The memory store skips publishing non-final changes nobody follows: a listener that
    # starts later must get them from then on.
    fw = FastWorker(store="memory")
    async with fw.run() as client:
        seen: list[tuple[str, TaskStatus]] = []
        client.events.add_listener(lambda record: seen.append((record.id, record.status)))
        task_id = await client.delay("live_plain")
        await client.wait(task_id, 5)
    statuses = [status for seen_id, status in seen if seen_id == task_id]
    assert statuses == [TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCESS]
