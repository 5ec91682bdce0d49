"""`GET {prefix}/dashboard`: one self-contained monitoring page.

The page is a static file shipped in the package (`static/dashboard.html`, inline CSS and
JavaScript, nothing fetched from the internet). It derives every URL from its own path, so it
works under any prefix or `root_path`, and it talks only to the status routes beside it:

```
page load ──► EventSource {prefix}/events ──(on open)──► GET {prefix}?limit=200
                 │  event: task  → update one row          (re-read after every reconnect)
                 │  event: overflow → stream closes, EventSource reconnects, re-read
cancel button ──► DELETE {prefix}/{id}
```

It is served behind the extension's `route_dependencies` like every status route; because
a browser's `EventSource` cannot send custom headers, guard it with a cookie or basic auth.
"""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

from starlette.responses import HTMLResponse

if TYPE_CHECKING:
    from fastapi import APIRouter

__all__ = ["add_dashboard_route", "dashboard_html"]


def dashboard_html() -> str:
    """The page's HTML, as shipped in the package."""
    return (files("fastworker_fastapi") / "static" / "dashboard.html").read_text("utf-8")


def add_dashboard_route(router: APIRouter) -> None:
    """Serve the page at `{prefix}/dashboard` (read once, when the routes are built)."""
    html = dashboard_html()

    @router.get("/dashboard", include_in_schema=False, response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(
            html,
            headers={
                "Cache-Control": "no-store",
                # The page needs nothing from anywhere else; say so to the browser.
                "Content-Security-Policy": (
                    "default-src 'self'; script-src 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; "
                    "frame-ancestors 'self'"
                ),
            },
        )
