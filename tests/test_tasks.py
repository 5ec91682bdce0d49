"""`@background_task`: registration, the typed handle, per-call options."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastworker.tasks.registry import task_registry as fastworker_registry

from fastworker_fastapi import (
    BackgroundTask,
    ConfigurationError,
    FastWorker,
    InvalidTaskOptionsError,
    TaskPriority,
    TaskStatus,
    background_task,
)
from fastworker_fastapi.tasks import registry
from tests.conftest import serve


@background_task
def tk_greet(name: str, punctuation: str = "!") -> str:
    """Say hello."""
    return f"hello {name}{punctuation}"


@background_task
async def tk_named_like_options(priority: str, countdown: int = 0) -> str:
    return f"{priority}/{countdown}"


@background_task(name="tk.report", priority="low", timeout=5, max_retries=2, retry_delay=0.5)
async def tk_report(report_id: int) -> dict[str, int]:
    return {"report": report_id}


def test_registration_in_both_registries() -> None:
    assert isinstance(tk_greet, BackgroundTask)
    assert tk_greet.name == "tk_greet" and tk_greet.__doc__ == "Say hello."
    assert fastworker_registry.get_task("tk_greet") is tk_greet.__wrapped__
    assert fastworker_registry.get_task("tk.report") is tk_report.__wrapped__
    definition = registry.get("tk.report")
    assert definition is not None and definition.is_async
    assert definition.priority is TaskPriority.LOW
    assert (definition.policy.timeout, definition.policy.max_retries) == (5, 2)
    assert "tk_greet" in registry.names() and "tk.report" in registry.names()
    assert repr(tk_report) == "<BackgroundTask 'tk.report'>"


def test_calling_the_handle_runs_inline() -> None:
    assert tk_greet("ada", punctuation="?") == "hello ada?"


def test_same_name_for_another_function_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="already registered"):

        @background_task(name="tk_greet")
        def other(name: str) -> str:  # pragma: no cover - never runs
            return name


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"retry_backoff": 0.5}, "retry_backoff"),
    ],
)
def test_bad_task_options_are_refused(options: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        background_task(**options)  # type: ignore[call-overload]


def test_bad_default_priority_is_refused() -> None:
    with pytest.raises(InvalidTaskOptionsError):
        background_task(priority="soon")


async def test_handle_delay_submit_and_options() -> None:
    app = FastAPI()
    fw = FastWorker(app)
    async with serve(app):
        task_id = await tk_greet.delay("bob")
        assert (await fw.client.wait(task_id)).result == "hello bob!"
        # A handle's keywords are the task's own, even named like the client's options.
        task_id = await tk_named_like_options.delay(priority="mine", countdown=3)
        assert (await fw.client.wait(task_id)).result == "mine/3"
        task_id = await tk_named_like_options.delay("positional")
        assert (await fw.client.wait(task_id)).result == "positional/0"
        result = await tk_report.submit(7)
        assert result.result == {"report": 7}
        info = await fw.client.get_info(result.task_id)
        assert info is not None and info.priority is TaskPriority.LOW
        assert info.max_retries == 2
        scheduled = await tk_greet.options(priority="critical", countdown=60).delay("eve")
        info = await fw.client.get_info(scheduled)
        assert info is not None and info.status is TaskStatus.SCHEDULED
        assert info.priority is TaskPriority.CRITICAL
        submitted = await tk_greet.options(priority=TaskPriority.HIGH).submit("zed", ".")
        assert submitted.result == "hello zed."
