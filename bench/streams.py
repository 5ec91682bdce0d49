"""Task throughput with 200 open event streams against none, as deployed (`make bench`).

The app (`bench/_stream_app.py`) runs in a real uvicorn process on one core, with the
default store (a SQLite file). `POST /burst?n=N` submits N trivial tasks with `delay()` and
waits for all of them, inside the server: its rate is the throughput. The streams are real
HTTP clients of `GET /tasks/events` in another process, on the other core
(`bench/_stream_clients.py`): 150 read as fast as they can, 50 stop reading after their
first bytes. Every reading stream must see every task succeed.

Rounds interleave the variants (none; 150 reading and 50 stalled; 200 stalled), in reverse
order every other round, each on a fresh server and store; the figures are medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request

from bench._uvicorn import ROOT, pin, stop, uvicorn

N = int(os.environ.get("BENCH_STREAM_TASKS", "8000"))
ROUNDS = int(os.environ.get("BENCH_STREAM_ROUNDS", "5"))
# The store's file in memory where the system has one: this compares the cost of streams,
# and a disk's flush times would only add noise to both sides.
FOLDER = "/dev/shm" if os.path.isdir("/dev/shm") else None


def _burst(port: int, n: int) -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/burst?n={n}", method="POST")
    with urllib.request.urlopen(request, timeout=300) as answer:
        return float(json.loads(answer.read())["rate"])


def measure(n: int, readers: int, stalled: int) -> tuple[float, bool]:
    """Tasks/s of an N-task burst with these streams open; and whether every reader saw
    every task succeed."""
    with (
        tempfile.TemporaryDirectory(dir=FOLDER) as folder,
        uvicorn(
            "bench._stream_app:app", {"FASTWORKER_STORE": f"sqlite:///{folder}/tasks.db"}
        ) as port,
    ):
        if readers + stalled == 0:
            return _burst(port, n), True
        clients = subprocess.Popen(
            [*pin(1), sys.executable, "-m", "bench._stream_clients", str(port), str(readers),
             str(stalled)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert clients.stdin is not None and clients.stdout is not None
            if clients.stdout.readline().strip() != "ready":
                raise RuntimeError("the stream clients did not start")
            rate = _burst(port, n)
            clients.stdin.write(f"{n}\n")
            clients.stdin.flush()
            seen = json.loads(clients.stdout.readline())
        finally:
            stop(clients)
    return rate, all(count == n for count in seen)


def run() -> tuple[list[str], list[tuple[str, float, str, bool]]]:
    """The event-stream section of docs/benchmarks.md and its checks."""
    none: list[float] = []
    mixed: list[float] = []
    stalled: list[float] = []
    complete = True
    for round_ in range(ROUNDS):  # the order reversed every other round, as elsewhere
        for variant in ("none", "mixed", "stalled")[:: 1 if round_ % 2 == 0 else -1]:
            if variant == "none":
                none.append(measure(N, 0, 0)[0])
            elif variant == "mixed":
                rate, ok = measure(N, 150, 50)
                mixed.append(rate)
                complete = complete and ok
            else:
                stalled.append(measure(N, 0, 200)[0])
    a, b, c = (statistics.median(x) for x in (none, mixed, stalled))
    print(
        "streams rounds:",
        *(f"{x:,.0f}/{y:,.0f}/{z:,.0f}" for x, y, z in zip(none, mixed, stalled, strict=True)),
    )
    print(f"streams: none {a:,.0f} tasks/s, 200 open {b:,.0f} tasks/s ({b / a:.3f})")
    print(f"         200 stalled {c:,.0f} tasks/s ({c / a:.3f})")
    lines = [
        f"## Event streams ({N:,} trivial tasks in a burst, real uvicorn and HTTP clients, "
        f"median of {ROUNDS})",
        "",
        "The server (one core, the default SQLite store, its file in `/dev/shm`) submits the",
        "burst with `delay()` and waits for every task; 200 clients of `GET /tasks/events` run",
        "in another process on the other core.",
        "",
        "| open streams | throughput | ratio |",
        "|---|---|---|",
        f"| none | {a:,.0f} tasks/s | 1.00 |",
        f"| 200 on `/tasks/events` (150 reading, 50 stalled) | {b:,.0f} tasks/s | {b / a:.3f} |",
        f"| 200 on `/tasks/events`, none reading | {c:,.0f} tasks/s | {c / a:.3f} |",
        "",
        "A client that stops reading costs the server about what a reader costs until the",
        "kernel's send buffer of its connection is full (up to a few MiB): the server cannot",
        "tell the two apart before, which is why 200 stalled streams cost as much as 150",
        "reading ones, or more (the kernel keeps what they do not read). Once the buffer is",
        "full, the stream waits and costs nothing; if it falls too far behind it is ended with",
        "an `overflow` event.",
        "",
        f"Every reading stream saw every task succeed: **{'yes' if complete else 'NO'}**.",
        "",
    ]
    checks = [
        ("throughput with 200 open streams / none", b / a, ">= 0.8", b / a >= 0.8),
        ("reading streams saw every final state", float(complete), "= 1", complete),
    ]
    return lines, checks


if __name__ == "__main__":
    for line in run()[0]:
        print(line)
