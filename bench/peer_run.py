"""One Redis-based peer, measured in its own venv (`make bench-peers`; see bench/peers.py).

Run as ``<peer venv>/bin/python bench/peer_run.py N`` with ``PEER`` (arq, saq, taskiq, celery)
and ``PEER_REDIS_URL`` set. It starts one worker process of that peer, waits until one task has
gone through (not timed), then times N enqueues of the identity task and waiting for all their
results, and prints ``{"correct": ..., "seconds": ...}`` as its last line. Only results equal
to the call's own argument count. The same module is the worker's task module.

Standalone on purpose: the peers' redis clients conflict with each other, so this file imports
nothing from the project.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

PEER = os.environ.get("PEER", "")
URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")
HERE = os.path.dirname(os.path.abspath(__file__))
DEADLINE = 120.0

if PEER == "arq":
    from arq.connections import RedisSettings

    async def noop(ctx: dict[str, Any], i: int) -> int:
        return i

    class ArqSettings:
        functions = (noop,)
        redis_settings = RedisSettings.from_dsn(URL)

elif PEER == "saq":
    from saq import Queue

    async def saq_noop(ctx: dict[str, Any], *, i: int) -> int:
        return i

    saq_queue = Queue.from_url(URL)

elif PEER == "taskiq":
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    broker = ListQueueBroker(URL).with_result_backend(RedisAsyncResultBackend(URL))

    @broker.task(task_name="noop")
    async def taskiq_noop(i: int) -> int:
        return i

elif PEER == "celery":
    from celery import Celery

    celery_app = Celery("peer_run", broker=URL, backend=URL)

    @celery_app.task(name="noop")
    def celery_noop(i: int) -> int:
        return i


def worker_command() -> list[str]:
    """One worker process of the peer, with its default concurrency (Celery: the solo pool)."""
    bindir = os.path.dirname(sys.executable)
    if PEER == "arq":
        return [sys.executable, "-c", "import peer_run, arq; arq.run_worker(peer_run.ArqSettings)"]
    if PEER == "saq":
        code = (
            "import asyncio, peer_run, saq; "
            "asyncio.run(saq.Worker(peer_run.saq_queue, [('noop', peer_run.saq_noop)]).start())"
        )
        return [sys.executable, "-c", code]
    if PEER == "taskiq":
        return [os.path.join(bindir, "taskiq"), "worker", "peer_run:broker", "--workers", "1"]
    if PEER == "celery":
        return [
            *[os.path.join(bindir, "celery"), "-A", "peer_run:celery_app", "worker"],
            *["-P", "solo", "-c", "1", "-l", "WARNING"],
            *["--without-gossip", "--without-mingle", "--without-heartbeat"],
        ]
    raise SystemExit(f"unknown PEER {PEER!r}")


async def measure(n: int) -> tuple[int, float]:
    """Correct results and seconds: one untimed warm-up task, then N timed ones."""
    if PEER == "arq":
        from arq import create_pool

        pool = await create_pool(ArqSettings.redis_settings)
        warm = await pool.enqueue_job("noop", -1)
        assert warm is not None
        await warm.result(timeout=DEADLINE, poll_delay=0.01)
        start = time.perf_counter()
        jobs = [await pool.enqueue_job("noop", i) for i in range(n)]
        values = [await j.result(timeout=DEADLINE, poll_delay=0.005) for j in jobs if j]
        elapsed = time.perf_counter() - start
        await pool.aclose()
    elif PEER == "saq":
        await saq_queue.connect()
        for attempt in range(5):  # a job queued while the worker starts can be "swept"
            try:
                await saq_queue.apply("noop", timeout=DEADLINE, i=-1)
                break
            except Exception:
                if attempt == 4:
                    raise
        start = time.perf_counter()
        kwargs = [{"i": i} for i in range(n)]
        values = await saq_queue.map("noop", kwargs, timeout=DEADLINE, return_exceptions=True)
        elapsed = time.perf_counter() - start
        await saq_queue.disconnect()
    elif PEER == "taskiq":
        await broker.startup()
        warm = await taskiq_noop.kiq(-1)
        await warm.wait_result(timeout=DEADLINE, check_interval=0.01)
        start = time.perf_counter()
        sent = [await taskiq_noop.kiq(i) for i in range(n)]
        values = [
            (await t.wait_result(timeout=DEADLINE, check_interval=0.005)).return_value for t in sent
        ]
        elapsed = time.perf_counter() - start
        await broker.shutdown()
    else:
        celery_noop.delay(-1).get(timeout=DEADLINE)
        start = time.perf_counter()
        results = [celery_noop.delay(i) for i in range(n)]
        values = [r.get(timeout=DEADLINE) for r in results]
        elapsed = time.perf_counter() - start
    correct = sum(1 for i, value in enumerate(values) if value == i)
    return correct, elapsed


def main() -> None:
    n = int(sys.argv[1])
    env = {**os.environ, "PYTHONPATH": HERE}
    with tempfile.TemporaryFile() as log:  # the worker's output, shown only if the run fails
        run(n, env, log)


def run(n: int, env: dict[str, str], log: Any) -> None:
    worker = subprocess.Popen(
        worker_command(), cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        correct, seconds = asyncio.run(measure(n))
    except BaseException:
        log.seek(0)
        sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
        raise
    finally:
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    print(json.dumps({"correct": correct, "seconds": seconds}))


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
