"""Event-stream clients for `bench/streams.py`, in a process of their own.

`python -m bench._stream_clients PORT READERS STALLED`: opens READERS + STALLED connections
to `GET /tasks/events` (HTTP/1.0, so the body is the events as they are, not chunked). A
reader reads all it is sent and collects the ids of the tasks it saw succeed; a stalled
client reads the answer's first bytes, then never again (a small receive buffer, so the
server meets its back-pressure soon). Prints `ready` once every stream is open; then, for
each line `N` on stdin, waits (30 s at most) until every reader saw N tasks succeed and
prints, as JSON, how many each saw.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys

_FINAL = re.compile(rb'"id":"([^"]+)","name":"bench_noop","status":"success"')
_REQUEST = b"GET /tasks/events HTTP/1.0\r\nHost: bench\r\n\r\n"


async def _open(port: int, rcvbuf: int | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(_REQUEST)
    head = await reader.readuntil(b"retry: 1000\n\n")  # headers and the stream's first event
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET /tasks/events answered {head[:40]!r}")
    return reader, writer


async def _read(reader: asyncio.StreamReader, seen: set[bytes], changed: asyncio.Event) -> None:
    rest = b""
    while data := await reader.read(1 << 16):
        data = rest + data
        end = data.rfind(b"\n\n") + 2  # complete events only; the rest waits for more
        found = _FINAL.findall(data, 0, end)
        rest = data[end:]
        if found:
            seen.update(found)
            changed.set()


async def main(port: int, readers: int, stalled: int) -> None:
    changed = asyncio.Event()
    seen: list[set[bytes]] = [set() for _ in range(readers)]
    opened = [await _open(port, None) for _ in range(readers)]
    unread = [await _open(port, 4096) for _ in range(stalled)]  # held open, never read
    tasks = [
        asyncio.create_task(_read(reader, ids, changed))
        for (reader, _), ids in zip(opened, seen, strict=True)
    ]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        want = int(line)
        deadline = loop.time() + 30
        while seen and min(len(ids) for ids in seen) < want and loop.time() < deadline:
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
        print(json.dumps([len(ids) for ids in seen]), flush=True)
    for task in tasks:
        task.cancel()
    for _, writer in [*opened, *unread]:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
