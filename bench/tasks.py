"""Trivial tasks for the benchmarks, loadable by a fastworker control plane too."""

from fastworker_fastapi import background_task


@background_task
async def bench_noop(i: int) -> int:
    return i


@background_task
def bench_noop_sync(i: int) -> int:
    return i
