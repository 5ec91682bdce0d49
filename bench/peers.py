"""`make bench-peers`: our remote workers against fastworker's client and Redis-based queues.

In one run, on this machine: one spawned control plane with our `RemoteWorkers` and with
fastworker 0.3.0's own sequential `Client.submit_task` (the same plane), then arq, SAQ,
taskiq-redis and Celery (solo pool), each with one worker process, against a redis-server this
script starts on a free loopback port (no persistence) and always stops. Every system runs the
same identity task (`i -> i`) N times; only results equal to their own argument count. Rounds
alternate the order; each figure is the median of the rounds. The table replaces the section
between the markers in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from bench.remote import ROOT, ours_and_theirs

N = int(os.environ.get("BENCH_PEERS_TASKS", "2000"))
ROUNDS = int(os.environ.get("BENCH_PEERS_ROUNDS", "3"))
PEERS = {"arq": "arq 0.28", "saq": "SAQ 0.26", "taskiq": "taskiq-redis 1.2", "celery": "Celery 5.7"}
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
START, END = "<!-- bench-peers:start -->", "<!-- bench-peers:end -->"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_call(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(command + b"\r\n")
        return sock.recv(64)


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis_call(port, b"PING").startswith(b"+PONG"):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)


def run_peer(peer: str, port: int) -> tuple[int, float]:
    redis_call(port, b"FLUSHALL")
    python = os.path.join(ROOT, ".venv-peers", peer, "bin", "python")
    env = {**os.environ, "PEER": peer, "PEER_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    out = subprocess.run(
        [python, os.path.join(ROOT, "bench", "peer_run.py"), str(N)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        print(f"{peer} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return 0, 1.0
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return int(result["correct"]), float(result["seconds"])


async def fastworker_rows() -> dict[str, tuple[int, float]]:
    """Ours on one spawned plane and fastworker's sequential client on that same plane."""
    mine, seq = await ours_and_theirs(N, min(N, 1000))
    return {"ours": mine, "fastworker": seq}


def main() -> int:
    samples: dict[str, list[tuple[int, float]]] = {}
    redis, port = start_redis()
    try:
        for round_ in range(ROUNDS):
            order = list(PEERS) if round_ % 2 == 0 else list(reversed(PEERS))
            if round_ % 2 == 0:
                rows = asyncio.run(fastworker_rows())
            for peer in order:
                samples.setdefault(peer, []).append(run_peer(peer, port))
                print(f"round {round_ + 1}: {peer:8} {rate(*samples[peer][-1]):8,.0f}/s")
            if round_ % 2 == 1:
                rows = asyncio.run(fastworker_rows())
            for name, value in rows.items():
                samples.setdefault(name, []).append(value)
                print(f"round {round_ + 1}: {name:8} {rate(*value):8,.0f}/s")
    finally:
        redis.terminate()
        try:
            redis.wait(10)
        except subprocess.TimeoutExpired:
            redis.kill()
            redis.wait()
    write_doc(samples)
    return 0


def rate(correct: int, seconds: float) -> float:
    return correct / seconds if seconds > 0 else 0.0


def write_doc(samples: dict[str, list[tuple[int, float]]]) -> None:
    med = {name: statistics.median(rate(*s) for s in runs) for name, runs in samples.items()}
    correct = {name: min(c for c, _ in runs) for name, runs in samples.items()}
    total = {name: (min(N, 1000) if name == "fastworker" else N) for name in samples}
    peer_median = statistics.median(med[p] for p in PEERS)
    labels = {
        "ours": "fastworker-fastapi `RemoteWorkers`, one spawned plane",
        "fastworker": "fastworker 0.3.0 `Client.submit_task`, sequential, same plane",
        **{p: f"{label}, one worker process" for p, label in PEERS.items()},
    }
    lines = [
        START,
        "## Remote workers against the Redis-based queues (`make bench-peers`)",
        "",
        f"One run, {ROUNDS} rounds in alternating order, median of the rounds; {N} identity",
        "tasks each (`i -> i`), enqueued then all awaited; only results equal to their own",
        "argument count (the fewest of any round is shown). One worker process each: our",
        "control plane, arq (`max_jobs` 10), SAQ (concurrency 10), taskiq (`--workers 1`),",
        "Celery (`-P solo`); a local redis-server on loopback without persistence.",
        "",
        "| system | correct (worst round) | correct results/s | ours / this |",
        "|---|---|---|---|",
    ]
    for name in ["ours", "fastworker", *PEERS]:
        r = med[name]
        lines.append(
            f"| {labels[name]} | {correct[name]}/{total[name]} | {r:,.0f} | "
            f"{med['ours'] / r:.2f} x |"
        )
    vs_client = med["ours"] / med["fastworker"]
    vs_peers = med["ours"] / peer_median
    lines += [
        "",
        f"Median of the four Redis peers: {peer_median:,.0f}/s.",
        "",
        "| target | value | |",
        "|---|---|---|",
        f"| ours / fastworker's sequential client, same plane (>= 1.3) | {vs_client:.2f} | "
        f"{'pass' if vs_client >= 1.3 else 'FAIL'} |",
        f"| ours / median of the Redis peers (>= 1.0) | {vs_peers:.2f} | "
        f"{'pass' if vs_peers >= 1.0 else 'FAIL'} |",
        END,
    ]
    print("\n".join(lines))
    text = "# Benchmarks\n"
    if os.path.exists(DOC):
        with open(DOC) as f:
            text = f.read()
    if START in text and END in text:
        text = text[: text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    with open(DOC, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
