"""The example's tasks. A control plane can load this module too (`--task-modules`)."""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel

from fastworker_fastapi import TaskPriority, background_task, report_progress


@background_task
def add(x: float, y: float) -> float:
    """Trivial and quick: the blocking `submit_task` pattern."""
    return x + y


@background_task
def send_welcome_email(user_id: int, email: str) -> str:
    """Blocking I/O (an SMTP call, say): a sync task runs in a worker thread."""
    time.sleep(0.05)
    return f"welcome email sent to {email} for user {user_id}"


@background_task(name="reports.build", priority=TaskPriority.LOW, timeout=30, max_retries=2)
async def build_report(report_id: int, pages: int = 5) -> dict[str, int]:
    """Slow async work that reports its progress as it goes."""
    for page in range(pages):
        await anyio.sleep(0.1)
        report_progress((page + 1) / pages, f"page {page + 1} of {pages}")
    return {"report_id": report_id, "pages": pages}


@background_task(max_retries=3, retry_delay=0.2)
async def resize_image(image_id: int) -> str:
    """One item of a batch."""
    await anyio.sleep(0.05)
    return f"image-{image_id}-thumb.png"


@background_task
async def track_event(name: str, properties: dict[str, str]) -> None:
    """Fire and forget: nobody waits for this one."""
    await anyio.lowlevel.checkpoint()
