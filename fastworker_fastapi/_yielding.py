"""The app's own routes win over the extension's status routes.

The status routes are added when `FastWorker(app)` runs, so before the app's own routes. An
app written for fastworker's glue often has routes of its own under `/tasks` (say
`GET /tasks/{task_id}` answering in its own format); those must keep working when the
import is swapped to ours. So a status route that fully matches a request gives way when a
route declared on the app itself (not in an included router or a mount) under the same
prefix fully matches it too. A route elsewhere that happens to match (a catch-all
`/{path:path}` serving a single-page app) does not take the status routes' place.
"""

from __future__ import annotations

from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.routing import Match, Route, Router
from starlette.types import Scope

__all__ = ["yielding_route_class"]


def yielding_route_class(app_router: Router, prefix: str = "") -> type[APIRoute]:
    """An `APIRoute` class whose routes give way to `app_router`'s own matching routes.

    A path without `prefix` in it is refused at once (a substring test, so a `root_path`
    cannot make it refuse a path it should match): every request to the app's other routes
    asks these routes first.
    """
    # The app's own plain routes under `prefix`, listed anew when its list of routes grows
    # (routes are added, in practice never removed).
    own: list[Route] = []
    listed = -1  # how many routes the app had when `own` was made

    def own_routes() -> list[Route]:
        nonlocal listed
        routes = app_router.routes
        if len(routes) != listed:
            own[:] = [
                route
                for route in routes
                if isinstance(route, Route)
                and not isinstance(route, StatusRoute)
                and route.path.startswith(prefix)
            ]
            listed = len(routes)
        return own

    class StatusRoute(APIRoute):
        def matches(self, scope: Scope) -> tuple[Match, Scope]:
            if prefix not in scope["path"]:
                return Match.NONE, {}
            match, child_scope = super().matches(scope)
            if match is Match.FULL:
                path, method = get_route_path(scope), scope["method"]
                for route in own_routes():
                    # A full match, as `Route.matches` has it: the path, then the method
                    # (without FastAPI's per-route context, a few microseconds each).
                    if route.path_regex.match(path) and (
                        not route.methods or method in route.methods
                    ):
                        return Match.NONE, {}
            return match, child_scope

    return StatusRoute
