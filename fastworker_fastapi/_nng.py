"""nng's Pair0 protocol over plain asyncio TCP: a listener for many peers and a one-shot sender.

FastWorker's control plane reports each finished task by dialing the task's callback address
with a pynng ``Pair0`` socket, sending one message and closing. pynng's own ``Pair0`` listener
accepts one peer at a time and silently drops the others, so callbacks of tasks that finish
together are lost. ``Pair0Listener`` speaks the same wire format (nng's SP-over-TCP framing)
but serves every connection at once.

Wire format (nng TCP transport): right after connecting, each side sends the 8-byte header
``00 'S' 'P' 00 <protocol: u16 big-endian> 00 00``; a pynng ``Pair0`` socket sends
``00 53 50 00 00 10 00 00`` (protocol 0x10) and expects the same from its peer. Every message
is then an 8-byte big-endian length followed by that many bytes; Pair0 (v0) adds no header of
its own to the message body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

__all__ = [
    "MAX_MESSAGE_SIZE",
    "OVERSIZE_HEAD",
    "PAIR0_HEADER",
    "Pair0ConnectionError",
    "Pair0HandshakeError",
    "Pair0Listener",
    "Pair0TimeoutError",
    "format_tcp_address",
    "pair0_send",
    "parse_tcp_address",
]

logger = logging.getLogger(__name__)

PAIR0_HEADER = b"\x00SP\x00\x00\x10\x00\x00"
"""The SP header of a Pair0 (v0) socket; a Pair0 peer sends exactly the same 8 bytes."""

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
OVERSIZE_HEAD = 1024  # bytes of an oversize message read to tell whose it is
"""Larger messages close the connection: a length prefix must not make us allocate gigabytes."""

_HANDSHAKE_TIMEOUT = 10.0
_LENGTH_SIZE = 8


class Pair0ConnectionError(ConnectionError):
    """A Pair0 message could not be delivered; the message names the address."""


class Pair0HandshakeError(Pair0ConnectionError):
    """The peer is not an nng Pair0 socket (wrong or missing SP header)."""


class Pair0TimeoutError(Pair0ConnectionError, TimeoutError):
    """Connecting, the handshake or the send did not finish within the deadline."""


def parse_tcp_address(address: str) -> tuple[str, int]:
    """Split ``tcp://host:port`` (also ``tcp://[::1]:port``) into host and port."""
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid port in nng address {address!r}") from exc
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise ValueError(f"expected an nng address like 'tcp://127.0.0.1:5555', got {address!r}")
    return parts.hostname, port


def format_tcp_address(host: str, port: int) -> str:
    """The nng address of a TCP endpoint, with brackets around IPv6 hosts."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class Pair0Listener:
    """Accepts any number of concurrent Pair0 peers and hands every message to ``on_message``.

    ``on_message`` runs synchronously on the event loop for each complete message; whatever it
    raises is logged and the listener goes on. Use ``async with`` or ``start()``/``aclose()``.
    """

    def __init__(
        self,
        on_message: Callable[[bytes], None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int = MAX_MESSAGE_SIZE,
        handshake_timeout: float = _HANDSHAKE_TIMEOUT,
        on_oversize: Callable[[bytes, int], None] | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_oversize = on_oversize
        self._host = host
        self._port = port
        self._max_message_size = max_message_size
        self._handshake_timeout = handshake_timeout
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def address(self) -> str:
        """The ``tcp://host:port`` actually bound; give it to the control plane as callback."""
        if self._address is None:
            raise RuntimeError("Pair0Listener is not started: call `await listener.start()`")
        return self._address

    @property
    def connection_count(self) -> int:
        """How many peer connections are being served right now."""
        return len(self._handlers)

    async def start(self) -> None:
        """Bind and start accepting connections."""
        if self._server is not None or self._closing:
            raise RuntimeError("Pair0Listener can be started only once")
        self._server = await asyncio.start_server(self._on_connect, self._host, self._port)
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = format_tcp_address(host, port)

    async def aclose(self) -> None:
        """Stop accepting, close every live connection and wait until its handler has ended."""
        if self._closing:
            return
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        while self._handlers:
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            # Their done callbacks (which discard them) may not have run yet, and awaiting
            # already-finished tasks does not yield to the loop: without this the loop spins.
            self._handlers.difference_update(handlers)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine) so that the handler task is created and owned here.
        if self._closing:
            writer.transport.abort()
            return
        # Answer the handshake now, in the loop turn that accepted the connection: a control
        # plane dials its callback synchronously, so its whole event loop waits for these bytes.
        writer.write(PAIR0_HEADER)
        task = asyncio.create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            try:
                async with asyncio.timeout(self._handshake_timeout):
                    header = await reader.readexactly(len(PAIR0_HEADER))
            except TimeoutError:
                logger.warning("Pair0 peer %s sent no SP header in time; closing", peer)
                return
            if header != PAIR0_HEADER:
                logger.warning("Pair0 peer %s sent a non-Pair0 header %s; closing", peer, header)
                return
            while True:
                try:
                    prefix = await reader.readexactly(_LENGTH_SIZE)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        logger.warning("Pair0 peer %s closed inside a length prefix", peer)
                    return  # an empty partial read is the peer's normal close
                size = int.from_bytes(prefix, "big")
                if size > self._max_message_size:
                    logger.warning(
                        "Pair0 peer %s announced a %d-byte message (max %d); closing",
                        peer,
                        size,
                        self._max_message_size,
                    )
                    if self._on_oversize is not None:
                        # Its start says whose it is (a callback begins with its task id).
                        try:
                            head = await reader.readexactly(min(size, OVERSIZE_HEAD))
                        except asyncio.IncompleteReadError as exc:
                            head = exc.partial
                        self._call_oversize(head, size)
                    return
                self._deliver(await reader.readexactly(size))
        except asyncio.IncompleteReadError:
            logger.warning("Pair0 peer %s closed in the middle of a message", peer)
        except OSError as exc:
            logger.debug("Pair0 connection from %s failed: %s", peer, exc)
        finally:
            writer.close()

    def _call_oversize(self, head: bytes, size: int) -> None:
        assert self._on_oversize is not None
        try:
            self._on_oversize(head, size)
        except Exception:
            logger.exception("Pair0Listener on_oversize callback failed")

    def _deliver(self, message: bytes) -> None:
        try:
            self._on_message(message)
        except Exception:
            logger.exception("Pair0Listener on_message callback failed; message dropped")


async def pair0_send(
    address: str,
    payload: bytes,
    *,
    timeout: float,
) -> None:
    """Dial ``address`` as an nng Pair0 peer, send one message and close, all within ``timeout``.

    This is what FastWorker's callback senders do; a pynng ``Pair0(listen=...)`` socket or a
    ``Pair0Listener`` receives it. A pynng Pair0 listener that already has a peer accepts the
    connection and then drops it, so a return without error means "sent", not "received".
    """
    host, port = parse_tcp_address(address)
    if len(payload) > MAX_MESSAGE_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_MESSAGE_SIZE} bytes")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(PAIR0_HEADER)
            header = await reader.readexactly(len(PAIR0_HEADER))
            if header != PAIR0_HEADER:
                raise Pair0HandshakeError(
                    f"{address} is not an nng Pair0 socket: it sent header {header.hex(' ')}, "
                    f"expected {PAIR0_HEADER.hex(' ')}"
                )
            writer.write(len(payload).to_bytes(_LENGTH_SIZE, "big") + payload)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
    except Pair0ConnectionError:
        raise
    except TimeoutError as exc:
        raise Pair0TimeoutError(f"sending to {address} did not finish within {timeout}s") from exc
    except asyncio.IncompleteReadError as exc:
        raise Pair0HandshakeError(
            f"{address} closed the connection during the SP handshake "
            f"(after {len(exc.partial)} of {len(PAIR0_HEADER)} header bytes)"
        ) from exc
    except OSError as exc:
        raise Pair0ConnectionError(f"cannot send to {address}: {exc}") from exc
    finally:
        if writer is not None and not writer.is_closing():
            writer.transport.abort()
