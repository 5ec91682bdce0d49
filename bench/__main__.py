"""`make bench`: measure, compare with baselines from the same run, write docs/benchmarks.md.

Each figure is the median of `REPEATS` runs; ratios are taken between medians measured in
this run on this machine (a figure and its baseline in turns), so they say something even
where absolute numbers do not.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.fastworker_baseline import fastworker_sequential_submit
from bench.inprocess import asyncio_queue_ceiling, delay_cost_us, fastworker_fastapi_throughput

REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
N = int(os.environ.get("BENCH_TASKS", "20000"))
WORKERS = 8
FASTWORKER_N = int(os.environ.get("BENCH_FASTWORKER_TASKS", "300"))
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@dataclass
class Check:
    what: str
    value: float
    target: str
    ok: bool


async def median_of(measure: Callable[[], Awaitable[float]]) -> float:
    """Median of REPEATS runs, each started from a collected heap (no run pays for the
    garbage of the one before)."""
    results = []
    for _ in range(REPEATS):
        gc.collect()
        results.append(await measure())
    return statistics.median(results)


async def paired_medians(
    first: Callable[[], Awaitable[float]], second: Callable[[], Awaitable[float]]
) -> tuple[float, float]:
    """Medians of REPEATS runs of each, the two taken in turns (the order swapped every
    round), so a drift of the machine's speed moves both alike. Each measured run follows
    an unmeasured run of the same code: what one leaves in the allocator and the caches
    moves the other's figure by up to 10% on this kind of machine."""
    results: tuple[list[float], list[float]] = ([], [])
    for round_ in range(REPEATS):
        for which in (0, 1) if round_ % 2 == 0 else (1, 0):
            measure = first if which == 0 else second
            gc.collect()
            await measure()
            gc.collect()
            results[which].append(await measure())
    return statistics.median(results[0]), statistics.median(results[1])


async def main() -> int:
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    print(f"median of {REPEATS} runs; N={N} tasks, {WORKERS} workers\n")
    ceiling, ours = await paired_medians(
        lambda: asyncio_queue_ceiling(N, WORKERS),
        lambda: fastworker_fastapi_throughput(N, WORKERS),
    )
    cost = await median_of(lambda: delay_cost_us(2000, 5))
    print(f"asyncio.Queue ceiling        {ceiling:12,.0f} tasks/s")
    print(f"fastworker-fastapi in-process {ours:11,.0f} tasks/s  ({ours / ceiling:.1%} of ceiling)")
    print(f"one delay() call, median      {cost:11.2f} us")
    fastworker = await median_of(lambda: fastworker_sequential_submit(FASTWORKER_N))
    print(f"fastworker 0.3.0 sequential   {fastworker:11,.0f} correct tasks/s")
    print(f"  in-process / fastworker     {ours / fastworker:11.1f} x\n")

    checks = [
        Check(
            "in-process throughput / asyncio.Queue ceiling",
            ours / ceiling,
            ">= 0.25",
            ours / ceiling >= 0.25,
        ),
        Check(
            "in-process throughput / fastworker 0.3.0 sequential submit_task",
            ours / fastworker,
            ">= 50",
            ours / fastworker >= 50,
        ),
        Check("median cost of one delay() (us)", cost, "<= 15", cost <= 15),
    ]
    rows = [
        ("asyncio.Queue + 8 workers (ceiling)", f"{ceiling:,.0f} tasks/s", "1.00"),
        (
            "fastworker-fastapi, in-process, 8 workers",
            f"{ours:,.0f} tasks/s",
            f"{ours / ceiling:.2f}",
        ),
        (
            "fastworker 0.3.0 Client, sequential submit_task",
            f"{fastworker:,.0f} tasks/s",
            f"{fastworker / ceiling:.4f}",
        ),
    ]
    from bench.streams import run as run_streams

    stream_lines, stream_checks = await asyncio.to_thread(run_streams)
    checks += [Check(*check) for check in stream_checks]
    from bench.http import run as run_http

    http_lines, http_checks = await asyncio.to_thread(run_http)
    checks += [Check(*check) for check in http_checks]
    extra = [*stream_lines, *http_lines, *await remote_rows()]
    from bench.sqlite import run as run_sqlite

    sqlite_lines, sqlite_checks = await run_sqlite()
    pg_lines, pg_checks = await postgres_rows()
    checks += [Check(*check) for check in (*sqlite_checks, *pg_checks)]
    write_doc(rows, checks, cost, [*sqlite_lines, *pg_lines, *extra])
    failed = [c for c in checks if not c.ok]
    for check in checks:
        verdict = "PASS" if check.ok else "FAIL"
        print(f"{verdict}  {check.what}: {check.value:.3g} (target {check.target})")
    return 1 if failed else 0


async def remote_rows() -> list[str]:
    """Remote-mode rows, when the remote benchmark exists (see bench/remote.py)."""
    try:
        from bench.remote import run as run_remote
    except ImportError:
        return []
    return await run_remote()


async def postgres_rows() -> tuple[list[str], list[tuple[str, float, str, bool]]]:
    """PostgreSQL rows and checks (see bench/postgres.py); none when it is not installed."""
    from bench.postgres import run as run_postgres

    return await run_postgres()


def write_doc(
    rows: list[tuple[str, str, str]], checks: list[Check], cost: float, extra: list[str]
) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (this file is rewritten by it). Every ratio compares two",
        "figures measured in the same run on the same machine, each the median of",
        f"{REPEATS} runs. Machine: {os.cpu_count()} cores, Python {platform.python_version()}.",
        "A figure and its baseline are measured in turns, the order swapped every round; the",
        "in-process figures each after an unmeasured run of the same code (what one leaves in",
        "the allocator moves the other by up to 10% here). On this machine ratios still move",
        "by a few percent from one run to the next.",
        "",
        f"## In-process throughput ({N:,} trivial async tasks, submitted with `delay` and awaited)",
        "",
        "| setup | throughput | ratio to the ceiling |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"One `delay()` call costs **{cost:.2f} µs** at the median.",
        "",
        "## Targets",
        "",
        "| check | value | target | |",
        "|---|---|---|---|",
        *[
            f"| {c.what} | {c.value:.3g} | {c.target} | {'pass' if c.ok else 'FAIL'} |"
            for c in checks
        ],
        "",
        *extra,
    ]
    path = os.path.join(DOC, "benchmarks.md")
    # Keep the section `make bench-peers` wrote (it needs a Redis server and its own venvs).
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    start, end = "<!-- bench-peers:start -->", "<!-- bench-peers:end -->"
    if start in old and end in old:
        lines += ["", old[old.index(start) : old.index(end) + len(end)]]
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
