"""The dashboard in a real headless Chromium (Debian's `chromium` package).

The browser is found at /usr/bin/chromium or installed with apt-get when running as root (CI
runs as root on a fresh Debian machine); the test is skipped, saying why, only when neither
works. Set FASTWORKER_SCREENSHOT=docs/img/dashboard.png to refresh the docs' screenshot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from _server import live_server
from fastapi import FastAPI
from fastworker.tasks.models import TaskStatus

from fastworker_fastapi import FastWorker, TaskClientDep, background_task, report_progress
from tests.conftest import eventually

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium: found, installed (as root), or a skip that says why."""
    found = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("no /usr/bin/chromium and cannot install it (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"installing chromium failed ({' '.join(command)}): {done.stderr[-500:]}")
    if not os.path.exists(CHROMIUM):  # pragma: no cover - apt said yes but no binary
        pytest.skip("apt-get installed chromium but /usr/bin/chromium is missing")
    return CHROMIUM


_stops: dict[str, anyio.Event] = {}


@background_task(name="live_browser_steps")
async def live_browser_steps(steps: int, pause: float) -> str:
    for i in range(steps):
        report_progress((i + 1) / steps, f"part {i + 1} of {steps}")
        await anyio.sleep(pause)
    return "built"


@background_task(name="live_browser_forever")
async def live_browser_forever(token: str) -> None:
    i = 0
    while True:  # runs until cancelled from the page
        i += 1
        report_progress(min(i / 100, 0.99), "waiting to be cancelled")
        await anyio.sleep(0.05)


@background_task(name="live_browser_fails")
def live_browser_fails() -> None:
    raise ValueError("the upstream API answered 502")


def make_app() -> tuple[FastAPI, FastWorker]:
    app = FastAPI()
    fw = FastWorker(app, event_heartbeat=1)

    @app.post("/reports/{steps}")
    async def build_report(steps: int, client: TaskClientDep) -> dict[str, str]:
        return {"task_id": await client.delay("live_browser_steps", steps, 0.06)}

    return app, fw


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[object]:
    async with playwright_api.async_playwright() as pw:
        instance = await pw.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            await instance.close()


async def test_dashboard_follows_tasks_live_and_cancels(browser: object, tmp_path: Path) -> None:
    app, fw = make_app()
    async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        page = await browser.new_page(viewport={"width": 1280, "height": 640})  # type: ignore[attr-defined]
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        outside: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
        await page.goto(f"{url}/tasks/dashboard")
        conn = page.locator("#conn")
        await playwright_api.expect(conn).to_have_text("live", timeout=10_000)
        await page.evaluate("window.__sameDocument = true")

        # A task submitted through the app's API appears, its progress moves, it succeeds.
        task_id = (await http.post("/reports/25")).json()["task_id"]
        row = page.locator(f'tr[data-id="{task_id}"]')
        await playwright_api.expect(row).to_be_visible(timeout=10_000)
        seen: set[float] = set()

        async def progress_moves() -> bool:
            value = await row.get_attribute("data-progress")
            if value:
                seen.add(float(value))
            return len({v for v in seen if 0 < v < 1}) >= 2

        await eventually(progress_moves, timeout=15, message="progress moving on the page")
        await playwright_api.expect(row).to_have_attribute("data-status", "success", timeout=15_000)
        await playwright_api.expect(row.locator(".status")).to_have_text("success")
        assert await page.evaluate("window.__sameDocument") is True  # no reload happened

        # The cancel button cancels a running task.
        forever = await live_browser_forever.delay("cancel-me")
        target = page.locator(f'tr[data-id="{forever}"]')
        await playwright_api.expect(target).to_have_attribute("data-status", "running")
        await target.locator("button.cancel").click()
        await playwright_api.expect(target).to_have_attribute("data-status", "cancelled")
        assert fw.client.get_status(forever) is TaskStatus.CANCELLED

        # Filters: by name, then by status.
        await page.fill("#name", "forever")
        await playwright_api.expect(row).to_be_hidden()
        await playwright_api.expect(target).to_be_visible()
        await page.fill("#name", "")
        await page.select_option("#status", "success")
        await playwright_api.expect(target).to_be_hidden()
        await playwright_api.expect(row).to_be_visible()
        await page.select_option("#status", "")

        # A few tasks in various states, for the picture in the docs.
        failing = await live_browser_fails.delay()
        await fw.client.wait(failing, timeout=10)
        await http.post("/reports/400")
        await live_browser_steps.options(countdown=600).delay(10, 0.1)
        running = await live_browser_forever.delay("screenshot")
        await playwright_api.expect(page.locator("tr[data-status=failure]")).to_have_count(1)
        await playwright_api.expect(page.locator(f'tr[data-id="{running}"]')).to_have_attribute(
            "data-status", "running"
        )
        await anyio.sleep(0.5)  # let the bars move a little: this is a picture, not a check
        await page.locator("#name").blur()
        await page.mouse.move(0, 0)
        await page.set_viewport_size({"width": 1280, "height": 450})
        png = await page.screenshot(full_page=True)
        assert len(png) > 10_000
        shot = anyio.Path(os.environ.get("FASTWORKER_SCREENSHOT") or tmp_path / "dashboard.png")
        await shot.parent.mkdir(parents=True, exist_ok=True)
        await shot.write_bytes(png)

        await page.close()
        await eventually(lambda: fw.client.events.subscriber_count == 0)
        for task in await fw.client.store.recent(limit=500):
            if not task.finished:
                await fw.client.cancel_task(task.id)
    assert errors == []
    assert outside == []  # nothing was fetched from anywhere but the app
