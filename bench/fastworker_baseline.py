"""fastworker 0.3.0's own Client against a spawned control plane: sequential submit_task.

Sequential calls (one in flight) are the only way its client gets correct results (see
shared notes: concurrent calls receive each other's replies), so that is the baseline.
Results that are wrong or missing count as zero.
"""

from __future__ import annotations

import os
import time

from fastworker.clients.client import Client
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi._control_plane import ControlPlaneProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def fastworker_sequential_submit(n: int) -> float:
    """Correct results per second of N sequential `submit_task` calls."""
    async with ControlPlaneProcess(["bench.tasks"], python_path=[ROOT]) as plane:
        discovery = f"tcp://127.0.0.1:{plane.ports.discovery}"
        client = Client(discovery_address=discovery, timeout=10, retries=1)
        await client.start()  # sleeps 2 s by design (upstream); not timed
        try:
            correct = 0
            start = time.perf_counter()
            for i in range(n):
                result = await client.submit_task("bench_noop_sync", args=(i,))
                if result.status is TaskStatus.SUCCESS and result.result == i:
                    correct += 1
            elapsed = time.perf_counter() - start
        finally:
            client.stop()
    return correct / elapsed
