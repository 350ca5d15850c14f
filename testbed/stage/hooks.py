"""Hop hooks: what the stage client awaits before it sends ``nbytes`` over a hop (the place for
another component's delay / jitter / loss emulation, e.g. :class:`testbed.net.appshaper.AppShaper`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class HopHook(Protocol):
    """Called before bytes go over a hop (e.g. :class:`testbed.net.appshaper.AppShaper`)."""

    async def before_send(self, nbytes: int) -> None: ...


SendHook = Callable[[int], Awaitable[None]]


def as_send_hook(hook: HopHook | SendHook | None) -> SendHook | None:
    """Normalise a hook object or a plain ``async def f(nbytes)`` to a callable (or None)."""
    if hook is None:
        return None
    before = getattr(hook, "before_send", None)
    if before is not None:
        return before
    if callable(hook):
        return hook
    raise TypeError(f"hop hook {hook!r} has no before_send(nbytes) and is not callable")
