"""Schemathesis against the example app's OpenAPI schema: every answer is one the schema
declares (status code, content type, body), nothing answers 5xx, and a method a path does
not document answers 405.

Bounded: `MAX_EXAMPLES` generated requests per operation and mode (a few hundred in all).
Schemathesis runs the app's lifespan itself, on a thread of its own; it is stopped when
this module is done, so other tests can start the same app again. `GET /tasks/events`
never ends by design; schemathesis reads the first events of each stream and stops.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi

from example_app.main import app

MAX_EXAMPLES = 15

SCHEMA = schemathesis.openapi.from_dict(app.openapi())
SCHEMA.app = app
SCHEMA.location = "/openapi.json"
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


@pytest.fixture(scope="module", autouse=True)
def _stop_schemathesis_lifespan() -> Iterator[None]:
    yield
    asgi.shutdown_lifespans()


@pytest.mark.parametrize("mode", list(GenerationMode))
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_the_example_app_keeps_to_its_schema(label: str, mode: GenerationMode) -> None:
    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(timeout=timeout)

    # An event stream may never end: read what it sends within a short deadline.
    documented = OPERATIONS[label].definition.raw["responses"].get("200", {}).get("content", {})
    timeout = 0.2 if "text/event-stream" in documented else 10.0

    try:
        check()
    except Unsatisfiable:
        # Only string parameters (any string is valid): no request can break the schema.
        assert mode is GenerationMode.NEGATIVE


def test_every_operation_is_covered() -> None:
    assert len(OPERATIONS) >= 10
    assert "DELETE /tasks/{task_id}" in OPERATIONS and "GET /tasks/events" in OPERATIONS
