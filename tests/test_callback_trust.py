"""Callback trust (issue 10): the attacks an adversarial run made, as regression tests.

Each test plays the attacker or the operator of the finding it is named after; all of them
failed on the code before the fix (forged and replayed messages were accepted, any app path
was called as client 127.0.0.1, an unreachable tcp:// listener held shutdown).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, Request, Response
from starlette.applications import Starlette
from starlette.routing import Route

from fastworker_fastapi import (
    CallbackSettings,
    CallbackSignatureError,
    FastWorker,
    InvalidTaskOptionsError,
    TaskCallback,
    TaskStatus,
    VerifiedCallback,
    background_task,
    sign_callback,
    verify_callback_signature,
)
from fastworker_fastapi.callbacks import CALLBACK_SCOPE_KEY, ReplayGuard
from fastworker_fastapi.models import CallbackState
from tests.conftest import eventually, free_port, serve

WEBHOOK_SECRET = "held-by-every-webhook-receiver"
NEVER = anyio.Event()  # never set: tasks waiting on it run until cancelled


@background_task(name="cb_echo_trust")
async def cb_echo(value: Any) -> Any:
    return value


@background_task(name="cb_forever_trust")
async def cb_forever(value: int) -> int:
    await NEVER.wait()
    return value


async def delivered(fw: FastWorker, task_id: str, state: str = "delivered") -> CallbackState:
    """Wait until the task's callback reaches `state`; return it."""

    async def check() -> CallbackState | None:
        info = await fw.client.get_info(task_id)
        assert info is not None
        cb = info.callback
        return cb if cb is not None and cb.state == state else None

    result: CallbackState = await eventually(check, message=f"callback not {state}")
    return result


class Hooks:
    """An app with two receiving routes, a plain route and an admin route; records requests."""

    def __init__(self, **settings: Any) -> None:
        self.app = FastAPI()
        options: dict[str, Any] = {"secret": WEBHOOK_SECRET, "retry_delay": 0.01}
        options.update(settings)
        shutdown_timeout = options.pop("fw_shutdown_timeout", 30.0)
        self.fw = FastWorker(
            self.app, callbacks=CallbackSettings(**options), shutdown_timeout=shutdown_timeout
        )
        self.received: list[tuple[str, bytes, dict[str, str], dict[str, Any]]] = []
        self.purged = 0

        @self.fw.callback_route("/hooks/a", status_code=204)
        async def hook_a(request: Request, callback: TaskCallback) -> None:
            self._record("/hooks/a", request, await request.body())

        @self.app.post("/hooks/b", status_code=204)
        async def hook_b(request: Request, callback: VerifiedCallback) -> None:
            self._record("/hooks/b", request, await request.body())

        @self.app.post("/admin/purge")
        async def purge(request: Request) -> Response:
            client = request.client
            if client is None or client.host != "127.0.0.1":  # "local requests only"
                return Response(status_code=403)
            self.purged += 1
            return Response(status_code=204)

    def _record(self, path: str, request: Request, body: bytes) -> None:
        client = request.client
        scope = {
            "client": None if client is None else client.host,
            "mark": request.scope.get("extensions", {}).get(CALLBACK_SCOPE_KEY),
            "host": request.headers.get("host"),
        }
        self.received.append((path, body, dict(request.headers), scope))


def _forge(key: str, body: bytes, delivery_id: str, target: str) -> dict[str, str]:
    """Every signature someone holding `key` can make: the old scheme and the new one."""
    ts = int(time.time())
    old = hmac.new(key.encode(), f"{ts}.{delivery_id}.".encode() + body, hashlib.sha256)
    new = sign_callback(key, body, delivery_id=delivery_id, target=target)
    return {
        **new,
        "X-FastWorker-Signature": f"v1={old.hexdigest()},{new['X-FastWorker-Signature']}",
        "content-type": "application/json",
    }


async def test_a_message_forged_with_the_webhook_secret_is_refused_by_receiving_routes() -> None:
    hooks = Hooks()
    body = TaskCallback(task_id="t", status=TaskStatus.SUCCESS, result="ok").model_dump_json()
    async with serve(hooks.app) as http:
        for path in ("/hooks/a", "/hooks/b"):
            headers = _forge(WEBHOOK_SECRET, body.encode(), "forged-" + path, path)
            answer = await http.post(path, content=body, headers=headers)
            assert answer.status_code == 401, (path, answer.text)
    assert hooks.received == []


async def test_a_real_callback_replayed_to_another_receiving_route_is_refused() -> None:
    hooks = Hooks()
    async with serve(hooks.app) as http:
        task_id = await hooks.fw.client.delay_with_callback("cb_echo_trust", "/hooks/a", 1)
        await delivered(hooks.fw, task_id)
        ((_, body, headers, _),) = hooks.received
        replayed = await http.post("/hooks/b", content=body, headers=headers)
    assert replayed.status_code == 401, replayed.text
    assert "another target" in replayed.json()["detail"]
    assert len(hooks.received) == 1


async def test_a_real_callback_replayed_to_the_same_route_is_refused() -> None:
    hooks = Hooks()
    async with serve(hooks.app) as http:
        task_id = await hooks.fw.client.delay_with_callback("cb_echo_trust", "/hooks/b", 1)
        await delivered(hooks.fw, task_id)
        ((_, body, headers, _),) = hooks.received
        replayed = await http.post("/hooks/b", content=body, headers=headers)
    assert replayed.status_code == 401, replayed.text
    assert "replayed" in replayed.json()["detail"]
    assert len(hooks.received) == 1


@pytest.mark.parametrize(
    "address", ["/admin/purge", "/hooks/../admin/purge", "/nowhere", "/hooks/a/extra"]
)
async def test_an_app_path_that_is_no_callback_receiver_is_refused_at_submission(
    address: str,
) -> None:
    hooks = Hooks()
    async with serve(hooks.app) as http:
        with pytest.raises(InvalidTaskOptionsError, match="callback receiver"):
            await hooks.fw.client.delay_with_callback("cb_echo_trust", address, 1)
        assert (await http.get("/tasks")).json()["count"] == 0
    assert hooks.purged == 0


async def test_app_paths_on_the_allow_list_are_accepted() -> None:
    seen: list[str] = []

    async def legacy(request: Request) -> Response:
        seen.append(request.url.path)
        return Response(status_code=204)

    app = Starlette(routes=[Route("/legacy/done", legacy, methods=["POST"])])
    fw = FastWorker(app, prefix=None, callbacks=CallbackSettings(app_paths=["/legacy/done"]))
    async with serve(app):
        task_id = await fw.client.delay_with_callback("cb_echo_trust", "/legacy/done?x=1", 1)
        await delivered(fw, task_id)
        with pytest.raises(InvalidTaskOptionsError):
            await fw.client.delay_with_callback("cb_echo_trust", "/legacy/other", 1)
    assert seen == ["/legacy/done"]


async def test_in_process_callback_requests_are_marked_and_not_from_loopback() -> None:
    hooks = Hooks()
    async with serve(hooks.app):
        task_id = await hooks.fw.client.delay_with_callback("cb_echo_trust", "/hooks/a", 1)
        await delivered(hooks.fw, task_id)
    ((_, _, headers, scope),) = hooks.received
    assert scope["mark"] == {"delivery_id": headers["x-fastworker-delivery"]}
    assert scope["client"] not in ("127.0.0.1", "::1", "localhost")
    assert scope["host"] not in ("localhost", "127.0.0.1")


async def test_outside_requests_carry_no_callback_mark() -> None:
    hooks = Hooks()
    seen: list[object] = []

    @hooks.app.get("/probe")
    async def probe(request: Request) -> None:
        seen.append(request.scope.get("extensions", {}).get(CALLBACK_SCOPE_KEY))

    async with serve(hooks.app) as http:
        await http.get("/probe", headers={"X-FastWorker-Delivery": "x"})
    assert seen == [None]


async def test_retries_are_new_messages_and_pass_the_replay_guard() -> None:
    hooks = Hooks(max_attempts=3)
    failures = iter([503, 503])

    @hooks.fw.callback_route("/hooks/flaky")
    async def flaky(callback: TaskCallback) -> Response:
        return Response(status_code=next(failures, 204))

    async with serve(hooks.app):
        task_id = await hooks.fw.client.delay_with_callback("cb_echo_trust", "/hooks/flaky", 1)
        state = await delivered(hooks.fw, task_id)
    assert state.attempts == 3


def test_verify_refuses_another_target_and_a_replay() -> None:
    body = b'{"task_id": "t"}'
    headers = sign_callback("k", body, delivery_id="d", target="https://a.example/hook")
    guard = ReplayGuard()
    with pytest.raises(CallbackSignatureError, match="another target"):
        verify_callback_signature(
            "k", body, headers, target="https://b.example/hook", replay_guard=guard
        )
    assert (
        verify_callback_signature(
            "k", body, headers, target="https://a.example/hook", replay_guard=guard
        )
        == "d"
    )
    with pytest.raises(CallbackSignatureError, match="replayed"):
        verify_callback_signature(
            "k", body, headers, target="https://a.example/hook", replay_guard=guard
        )
    # The next attempt of the same delivery is a new message.
    retry = sign_callback("k", body, delivery_id="d", target="https://a.example/hook", attempt=2)
    verify_callback_signature("k", body, retry, target="https://a.example/hook", replay_guard=guard)


def test_the_default_guard_of_verify_refuses_a_replay() -> None:
    body = b"{}"
    headers = sign_callback("k", body, delivery_id=f"default-{time.time_ns()}", target="/x")
    verify_callback_signature("k", body, headers, target="/x")
    with pytest.raises(CallbackSignatureError, match="replayed"):
        verify_callback_signature("k", body, headers, target="/x")


def test_the_replay_guard_is_bounded_and_forgets_stale_messages() -> None:
    guard = ReplayGuard(max_entries=3)
    for n in range(5):
        assert guard.accept(f"k{n}", stale_at=100.0 + n, now=0.0)
    assert len(guard) == 3  # the two oldest were forgotten
    assert not guard.accept("k4", stale_at=104.0, now=1.0)
    assert guard.accept("k4", stale_at=300.0, now=104.0)  # stale by now: pruned, new again
    assert len(guard) == 1
    with pytest.raises(Exception, match="max_entries"):
        ReplayGuard(max_entries=0)


async def test_tcp_loopback_needs_the_allow_list_or_the_explicit_setting() -> None:
    fw = FastWorker(FastAPI(), callbacks=CallbackSettings())
    async with fw.run() as client:
        with pytest.raises(InvalidTaskOptionsError, match="loopback_listeners=True"):
            await client.delay_with_callback("cb_echo_trust", "tcp://127.0.0.1:9", 1)
    lenient = CallbackSettings(loopback_listeners=True, max_attempts=1, timeout=0.1)
    async with FastWorker(FastAPI(), callbacks=lenient).run() as client:
        await client.delay_with_callback("cb_echo_trust", "tcp://127.0.0.1:9", 1)


async def test_shutdown_with_an_unreachable_tcp_listener_ends_within_the_callback_budget() -> None:
    port = free_port()  # nobody listens there
    hooks = Hooks(
        allowed_hosts=("127.0.0.1",),
        timeout=600.0,  # one attempt could wait 10 minutes: only the budget ends it
        max_attempts=100,
        shutdown_timeout=0.2,
    )
    with anyio.fail_after(20):  # a hang guard, far below the 600 s an attempt may take
        async with serve(hooks.app):
            task_id = await hooks.fw.client.delay_with_callback(
                "cb_echo_trust", f"tcp://127.0.0.1:{port}", 1
            )
            await delivered(hooks.fw, task_id, "delivering")
    info = await hooks.fw.client.get_info(task_id)
    assert info is not None and info.callback is not None
    assert info.callback.state == "failed"
    assert info.callback.last_error is not None
    assert "shutdown_timeout" in info.callback.last_error


async def test_callbacks_of_tasks_cancelled_when_shutdown_timeout_runs_out_are_delivered() -> None:
    hooks = Hooks(fw_shutdown_timeout=0.05)
    async with serve(hooks.app):
        ids = [
            await hooks.fw.client.delay_with_callback(
                "cb_forever_trust", "/hooks/a", n, callback_data={"n": n}
            )
            for n in range(20)
        ]
        client = hooks.fw.client
        await eventually(lambda: client.get_status(ids[0]) == TaskStatus.RUNNING)
    delivered_ids = {
        TaskCallback.model_validate_json(body).task_id for _, body, _, _ in hooks.received
    }
    assert delivered_ids == set(ids)
    assert all(
        TaskCallback.model_validate_json(body).status == TaskStatus.CANCELLED
        for _, body, _, _ in hooks.received
    )
