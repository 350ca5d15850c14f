"""Stopping the tasks a component owns, without swallowing its caller's cancellation."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end. Its own CancelledError is the expected end and is
    absorbed; when the *caller* is being cancelled meanwhile, that cancellation propagates."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
