"""Pair0 over plain asyncio TCP, checked against real pynng sockets and a real control plane."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from pathlib import Path

import pynng
import pytest

from fastworker_fastapi._control_plane import (
    ControlPlaneConnection,
    ControlPlaneProcess,
    make_task_dict,
)
from fastworker_fastapi._nng import (
    MAX_MESSAGE_SIZE,
    PAIR0_HEADER,
    Pair0ConnectionError,
    Pair0HandshakeError,
    Pair0Listener,
    Pair0TimeoutError,
    format_tcp_address,
    pair0_send,
    parse_tcp_address,
)
from tests.conftest import free_port

TESTS_DIR = Path(__file__).parent
DEADLINE = 10.0


class Inbox:
    """An `on_message` callback that records messages and lets a test wait for a count."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self._changed = asyncio.Event()

    def __call__(self, message: bytes) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = DEADLINE) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.messages


def ipv6_available() -> bool:
    try:
        free_port("::1")
    except OSError:
        return False
    return True


async def assert_closed_by_peer(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(DEADLINE):
        assert await reader.read() == b""


def test_addresses_round_trip() -> None:
    assert parse_tcp_address("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)
    assert parse_tcp_address("tcp://[::1]:80") == ("::1", 80)
    assert parse_tcp_address("tcp://localhost:1") == ("localhost", 1)
    assert format_tcp_address("::1", 80) == "tcp://[::1]:80"
    for bad in ("ipc:///tmp/x", "tcp://host", "127.0.0.1:5555", "tcp://h:notaport"):
        with pytest.raises(ValueError, match=r"address|port"):
            parse_tcp_address(bad)


async def test_listener_receives_from_a_pynng_dialer() -> None:
    inbox = Inbox()
    async with Pair0Listener(inbox) as listener:
        assert listener.address.startswith("tcp://127.0.0.1:")
        # block_on_dial=False: a blocking dial would block this very event loop, which must
        # run the listener's side of the handshake.
        with pynng.Pair0(dial=listener.address, block_on_dial=False) as sock:
            await asyncio.wait_for(sock.asend(b"hello"), DEADLINE)
            await asyncio.wait_for(sock.asend(b""), DEADLINE)
            assert await inbox.wait_for(2) == [b"hello", b""]


async def test_listener_serves_many_concurrent_pynng_dialers() -> None:
    inbox = Inbox()
    async with Pair0Listener(inbox) as listener:
        sockets = [pynng.Pair0(dial=listener.address, block_on_dial=False) for _ in range(8)]
        try:
            sends = [
                sock.asend(f"{n}-{k}".encode()) for n, sock in enumerate(sockets) for k in range(3)
            ]
            await asyncio.wait_for(asyncio.gather(*sends), DEADLINE)
            received = await inbox.wait_for(24)
            assert listener.connection_count == 8  # all at once, none dropped
        finally:
            for sock in sockets:
                sock.close()
    assert sorted(received) == sorted(f"{n}-{k}".encode() for n in range(8) for k in range(3))


async def test_pair0_send_reaches_a_pynng_pair0_listener() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with pynng.Pair0(listen=address) as sock:
        await pair0_send(address, b'{"task_id": "t1"}', timeout=DEADLINE)
        assert await asyncio.wait_for(sock.arecv(), DEADLINE) == b'{"task_id": "t1"}'


async def test_pair0_send_reaches_our_listener_by_ip_and_by_hostname() -> None:
    inbox = Inbox()
    async with Pair0Listener(inbox) as listener:
        big = b"x" * (1024 * 1024)
        await pair0_send(listener.address, b"one", timeout=DEADLINE)
        await pair0_send(listener.address.replace("127.0.0.1", "localhost"), big, timeout=DEADLINE)
        assert await inbox.wait_for(2) == [b"one", big]


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
async def test_pair0_send_over_ipv6() -> None:
    inbox = Inbox()
    async with Pair0Listener(inbox, host="::1") as listener:
        assert listener.address.startswith("tcp://[::1]:")
        await pair0_send(listener.address, b"six", timeout=DEADLINE)
        assert await inbox.wait_for(1) == [b"six"]


async def test_pair0_send_to_a_refusing_address_names_it() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(Pair0ConnectionError, match=re.escape(address)) as caught:
        await pair0_send(address, b"x", timeout=DEADLINE)
    assert isinstance(caught.value, ConnectionError)
    assert not isinstance(caught.value, TimeoutError)


async def test_pair0_send_rejects_a_peer_that_is_not_pair0() -> None:
    async def req0_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00SP\x00\x00\x30\x00\x00")  # a Req0 socket's header
        await reader.read()
        writer.close()

    server = await asyncio.start_server(req0_server, "127.0.0.1", 0)
    address = format_tcp_address("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(Pair0HandshakeError, match="not an nng Pair0 socket"):
            await pair0_send(address, b"x", timeout=DEADLINE)
    finally:
        server.close()
        await server.wait_closed()


async def test_pair0_send_times_out_on_a_silent_peer() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never sends a header; ends when the client goes away
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = format_tcp_address("127.0.0.1", server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(Pair0TimeoutError, match=re.escape(address)) as caught:
            await pair0_send(address, b"x", timeout=0.3)
        assert isinstance(caught.value, TimeoutError)
        assert loop.time() - started < 2.0
    finally:
        server.close()
        await server.wait_closed()


async def test_pair0_send_refuses_an_oversize_payload() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        await pair0_send("tcp://127.0.0.1:9", b"x" * (MAX_MESSAGE_SIZE + 1), timeout=1.0)


@pytest.mark.parametrize(
    "header",
    [
        b"\x00SP\x00\x00\x30\x00\x00",  # Req0
        b"\x00SP\x00\x00\x11\x00\x00",  # Pair1
        b"GET / HT",  # not SP at all
    ],
)
async def test_listener_rejects_a_wrong_handshake_and_keeps_serving(header: bytes) -> None:
    inbox = Inbox()
    async with Pair0Listener(inbox) as listener:
        host, port = parse_tcp_address(listener.address)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            # Nothing after the header: unread data would make the close a reset.
            writer.write(header)
            assert await asyncio.wait_for(reader.readexactly(8), DEADLINE) == PAIR0_HEADER
            await assert_closed_by_peer(reader)
        finally:
            writer.close()
        await pair0_send(listener.address, b"after", timeout=DEADLINE)
        assert await inbox.wait_for(1) == [b"after"]


async def test_listener_closes_on_an_oversize_message_and_keeps_serving() -> None:
    inbox = Inbox()
    async with Pair0Listener(inbox, max_message_size=1000) as listener:
        host, port = parse_tcp_address(listener.address)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(PAIR0_HEADER + (2).to_bytes(8, "big") + b"ok")
            writer.write((1001).to_bytes(8, "big"))  # the length alone must be enough to refuse
            assert await asyncio.wait_for(reader.readexactly(8), DEADLINE) == PAIR0_HEADER
            await assert_closed_by_peer(reader)
        finally:
            writer.close()
        await pair0_send(listener.address, b"z" * 1000, timeout=DEADLINE)
        assert await inbox.wait_for(2) == [b"ok", b"z" * 1000]


async def test_listener_survives_a_failing_callback(caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox()

    def on_message(message: bytes) -> None:
        if message == b"bad":
            raise RuntimeError("callback exploded")
        inbox(message)

    caplog.set_level(logging.ERROR, logger="fastworker_fastapi._nng")
    async with Pair0Listener(on_message) as listener:
        with pynng.Pair0(dial=listener.address, block_on_dial=False) as sock:
            await asyncio.wait_for(sock.asend(b"bad"), DEADLINE)
            await asyncio.wait_for(sock.asend(b"good"), DEADLINE)  # same connection goes on
            assert await inbox.wait_for(1) == [b"good"]
    assert "callback exploded" in caplog.text


async def test_aclose_closes_live_connections_and_leaves_no_tasks() -> None:
    listener = Pair0Listener(Inbox())
    with pytest.raises(RuntimeError, match="not started"):
        _ = listener.address
    await listener.start()
    host, port = parse_tcp_address(listener.address)
    clients = [await asyncio.open_connection(host, port) for _ in range(3)]
    try:
        for reader, writer in clients:
            writer.write(PAIR0_HEADER)
            assert await asyncio.wait_for(reader.readexactly(8), DEADLINE) == PAIR0_HEADER
        assert listener.connection_count == 3
        await asyncio.wait_for(listener.aclose(), DEADLINE)
        assert listener.connection_count == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}
        for reader, _ in clients:
            await assert_closed_by_peer(reader)
        with pytest.raises(Pair0ConnectionError):
            await pair0_send(listener.address, b"late", timeout=DEADLINE)
        await listener.aclose()  # idempotent
    finally:
        for _, writer in clients:
            writer.close()


async def test_aclose_forgets_finished_handlers_whose_callbacks_have_not_run() -> None:
    """A handler that finished just before aclose() still sits in the set (its discard
    callback runs on the next loop turn); awaiting finished tasks does not yield, so aclose()
    must drop them itself or it spins forever (seen at shutdown after 1000 callbacks)."""
    listener = Pair0Listener(Inbox())
    await listener.start()

    async def finished() -> None:
        return None

    task = asyncio.ensure_future(finished())
    await task  # done; no discard callback was ever registered for it
    listener._handlers.add(task)
    await listener.aclose()
    assert listener.connection_count == 0


# --- against a real control plane ------------------------------------------------------------


@pytest.mark.remote
async def test_control_plane_callbacks_of_a_batch_that_finishes_together_all_arrive(
    control_plane: ControlPlaneProcess,
) -> None:
    inbox = Inbox()
    async with (
        Pair0Listener(inbox) as listener,
        ControlPlaneConnection(control_plane.base_address) as connection,
    ):
        tasks = [
            make_task_dict(
                "sleep_then",
                [{"n": n}, 0.3],  # 50 sleeps that all end at the same moment
                task_id=f"task-{n}",
                callback_address=listener.address,
                callback_data={"n": n},
            )
            for n in range(50)
        ]
        await connection.submit_batch(tasks, priority="normal", timeout=DEADLINE)
        received = [json.loads(m) for m in await inbox.wait_for(50, timeout=30.0)]
    assert len(received) == 50
    assert {r["task_id"] for r in received} == {f"task-{n}" for n in range(50)}
    for r in received:
        n = int(r["task_id"].removeprefix("task-"))
        assert r["status"] == "success"
        assert r["result"] == {"n": n}
        assert r["error"] is None
        assert r["callback_data"] == {"n": n}


async def test_listener_drops_peers_that_stall_or_cut_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = Inbox()
    caplog.set_level(logging.WARNING, logger="fastworker_fastapi._nng")
    async with Pair0Listener(inbox, handshake_timeout=0.2) as listener:
        with pytest.raises(RuntimeError, match="only once"):
            await listener.start()
        host, port = parse_tcp_address(listener.address)
        cases = {
            b"": "no SP header in time",
            PAIR0_HEADER + b"\x00\x00": "inside a length prefix",
            PAIR0_HEADER + (10).to_bytes(8, "big") + b"abc": "in the middle of a message",
        }
        for data, logged in cases.items():
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(data)
                if data:
                    writer.write_eof()  # the peer goes away before finishing
                assert await asyncio.wait_for(reader.readexactly(8), DEADLINE) == PAIR0_HEADER
                await assert_closed_by_peer(reader)
            finally:
                writer.close()
            assert logged in caplog.text
        await pair0_send(listener.address, b"still here", timeout=DEADLINE)
        assert await inbox.wait_for(1) == [b"still here"]


async def test_pair0_send_to_a_peer_that_hangs_up_during_the_handshake() -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(PAIR0_HEADER[:3])
        writer.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    address = format_tcp_address("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(Pair0ConnectionError, match=re.escape(address)):
            await pair0_send(address, b"x", timeout=DEADLINE)
    finally:
        server.close()
        await server.wait_closed()


async def test_an_oversize_message_is_reported_with_its_start_then_the_peer_is_dropped() -> None:
    inbox = Inbox()
    oversize: list[tuple[bytes, int]] = []
    done = asyncio.Event()

    def on_oversize(head: bytes, size: int) -> None:
        oversize.append((head, size))
        done.set()
        raise RuntimeError("a failing callback is logged, not raised")

    listener = Pair0Listener(inbox, max_message_size=16, on_oversize=on_oversize)
    async with listener:
        payload = b'{"task_id": "t1", "result": "' + b"x" * 100 + b'"}'
        with contextlib.suppress(Pair0ConnectionError):  # the listener may close first
            await pair0_send(listener.address, payload, timeout=DEADLINE)
        await asyncio.wait_for(done.wait(), DEADLINE)
    assert oversize[0][1] == len(payload)
    assert payload.startswith(oversize[0][0]) and oversize[0][0].startswith(b'{"task_id": "t1"')
    assert inbox.messages == []
