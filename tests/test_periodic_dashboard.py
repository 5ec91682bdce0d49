"""The dashboard's schedules section, in a real headless Chromium (see
test_dashboard_browser.py for how the browser is found)."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from _server import live_server
from fastapi import FastAPI
from test_dashboard_browser import browser, chromium_path  # noqa: F401  (fixtures)

from fastworker_fastapi import FastWorker, background_task

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")


@background_task(name="pd_report")
def pd_report(kind: str) -> str:
    return kind


async def test_the_dashboard_shows_schedules_and_pauses_them(browser: object) -> None:  # noqa: F811
    app = FastAPI()
    fw = FastWorker(app)
    fw.schedule(pd_report, cron="0 9 * * MON-FRI", tz="Europe/Paris", args=["daily"])
    fw.schedule(pd_report, every=timedelta(hours=1), name="pd-hourly", kwargs={"kind": "h"})
    async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        page = await browser.new_page()  # type: ignore[attr-defined]
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{url}/tasks/dashboard")
        section = page.locator("#schedules")
        await playwright_api.expect(section).to_be_visible(timeout=10_000)
        daily = section.locator('tr[data-name="pd_report"]')
        await playwright_api.expect(daily).to_have_attribute("data-state", "active")
        await playwright_api.expect(daily.locator(".when")).to_have_text(
            "At 09:00 on Monday through Friday (Europe/Paris)"
        )
        hourly = section.locator('tr[data-name="pd-hourly"]')
        await playwright_api.expect(hourly.locator(".when")).to_have_text("Every hour")
        await playwright_api.expect(hourly.locator(".next")).not_to_have_text("")

        await daily.locator("button.toggle").click()
        await playwright_api.expect(daily).to_have_attribute("data-state", "paused")
        listing = (await http.get("/tasks/schedules")).json()["schedules"]
        assert next(s for s in listing if s["name"] == "pd_report")["paused"] is True
        await daily.locator("button.toggle").click()
        await playwright_api.expect(daily).to_have_attribute("data-state", "active")
        await page.close()
    assert errors == []
