"""Per-request cost over HTTP: real uvicorn (one core), wrk (the other core), `make bench`.

Variants, all in one run: both servers up at once, each pair measured back to back, the
order swapped every round (the median of `ROUNDS`):
- `GET /ping` on an app without the extension and on the same app with it;
- `POST /work` with Starlette's `BackgroundTasks` (no extension) against the task's typed
  handle (no dependency), and the same with one dependency on each side: a constant one
  next to `BackgroundTasks`, `TaskClientDep` for `client.delay()`;
- `GET /tasks/{id}` (a status read) on the app with the extension.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator

from bench._uvicorn import pin, uvicorn

ROUNDS = int(os.environ.get("BENCH_HTTP_ROUNDS", "4"))
SECONDS = int(os.environ.get("BENCH_HTTP_SECONDS", "4"))
CONNECTIONS = 32


@contextlib.contextmanager
def _server(variant: str) -> Iterator[str]:
    env = {"BENCH_APP": variant, "FASTWORKER_STORE": "memory"}
    with uvicorn("bench._http_app:app", env) as port:
        yield f"http://127.0.0.1:{port}"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk(url: str, method: str = "GET") -> tuple[float, float, float]:
    """requests/s, p50 ms, p99 ms."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "{method}"\n')
    try:
        out = subprocess.run(
            [*pin(1), "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency",
             "-s", script.name, url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    if "Non-2xx" in out:
        raise RuntimeError(f"{url}: non-2xx answers\n{out}")
    return rps, pct("50"), pct("99")


def _new_task(url: str) -> str:
    request = urllib.request.Request(f"{url}/work", method="POST")
    body = urllib.request.urlopen(request).read().decode()
    return re.search(r'"task_id":"([^"]+)"', body).group(1)  # type: ignore[union-attr]


def _swap_pairs(variants: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(a, b, c, d, e, f) -> (b, a, d, c, f, e)."""
    swapped = []
    for i in range(0, len(variants), 2):
        swapped += variants[i : i + 2][::-1]
    return swapped


def run() -> tuple[list[str], list[tuple[str, float, str, bool]]]:
    """The HTTP section of docs/benchmarks.md and its checks; none without wrk."""
    if shutil.which("wrk") is None:
        print("http: wrk not found, skipped (apt-get install wrk)")
        return [], []
    results: dict[str, list[tuple[float, float, float]]] = {}
    # Both servers run at once (an idle one costs nothing) and each pair of variants is
    # measured back to back, so a change of load on the machine hits both sides alike.
    with _server("plain") as plain, _server("ext") as ext:
        variants = [  # pairs: (baseline, ours), then the status read alone
            ("plain /ping", f"{plain}/ping", "GET"),
            ("ext /ping", f"{ext}/ping", "GET"),
            ("plain /work", f"{plain}/work", "POST"),
            ("ext handle", f"{ext}/work-handle", "POST"),
            ("plain /work-dep", f"{plain}/work-dep", "POST"),
            ("ext /work", f"{ext}/work", "POST"),
            ("ext status", f"{ext}/tasks/", "GET"),
        ]
        for round_ in range(ROUNDS):
            # Alternate which side of each pair goes first from one round to the next.
            order = variants if round_ % 2 == 0 else _swap_pairs(variants)
            for key, url, method in order:
                if key == "ext status":  # a task of its own: older ones expire (max_results)
                    url += _new_task(ext)
                results.setdefault(key, []).append(_wrk(url, method))
    med = {
        key: tuple(statistics.median(x[i] for x in runs) for i in range(3))
        for key, runs in results.items()
    }
    labels = {
        "plain /ping": "`GET /ping`, no extension",
        "ext /ping": "`GET /ping`, extension installed",
        "plain /work": "`POST /work` with `BackgroundTasks`, no extension",
        "ext handle": "`POST /work` with the typed handle `bench_noop.delay()`",
        "plain /work-dep": "`POST /work` with `BackgroundTasks` and a constant dependency",
        "ext /work": "`POST /work` with `client.delay()` (`TaskClientDep`)",
        "ext status": "`GET /tasks/{id}` (status read)",
    }
    base = {
        "ext /ping": "plain /ping",
        "ext handle": "plain /work",
        "plain /work-dep": "plain /work",
        "ext /work": "plain /work-dep",
        "ext status": "ext /ping",
    }
    lines = [
        f"## Per-request cost over HTTP (uvicorn on one core, wrk on the other, "
        f"{CONNECTIONS} connections, {SECONDS} s, median of {ROUNDS} rounds)",
        "",
        "| route | req/s | p50 ms | p99 ms | ratio |",
        "|---|---|---|---|---|",
    ]
    for key, label in labels.items():
        rps, p50, p99 = med[key]
        ratio = f"{rps / med[base[key]][0]:.2f} of {base[key]}" if key in base else "1.00"
        lines.append(f"| {label} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {ratio} |")
        print(f"http {key:12} {rps:9,.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms")
    lines += [
        "",
        "`TaskClientDep` is a FastAPI dependency, and FastAPI resolves any dependency, even one",
        "that returns a constant, at a cost of more than ten microseconds a request (the",
        "constant-dependency row): so `client.delay()` through `TaskClientDep` is measured",
        "against the `BackgroundTasks` route with one dependency too, and the typed handle,",
        "which finds the client without one, against the bare `BackgroundTasks` route. Against",
        "the bare route, `client.delay()` through `TaskClientDep` measures "
        f"{med['ext /work'][0] / med['plain /work'][0]:.2f}.",
        "",
    ]
    ping = med["ext /ping"][0] / med["plain /ping"][0]
    work = med["ext /work"][0] / med["plain /work-dep"][0]
    handle = med["ext handle"][0] / med["plain /work"][0]
    checks = [
        ("GET /ping with the extension / without", ping, ">= 0.95", ping >= 0.95),
        ("typed-handle delay() route / BackgroundTasks route", handle, ">= 0.90", handle >= 0.90),
        (
            "TaskClientDep client.delay() route / BackgroundTasks route, one dependency each",
            work,
            ">= 0.90",
            work >= 0.90,
        ),
    ]
    return lines, checks
