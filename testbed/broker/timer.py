"""Waking the broker's event loop at an arrival time, to the tens of microseconds, without spinning.

asyncio's timers are only as precise as ``epoll_wait``'s millisecond timeout (rounded up), so an
arrival admitted by ``asyncio.sleep`` is up to a millisecond late. The broker used to sleep until
``admission_spin_s`` before the deadline and then yield to the loop (``sleep(0)``) until it was
reached: precise, but the loop then polls without blocking for that whole stretch, and at a few
hundred arrivals per second that spin is most of the broker's CPU (taken from the stages it
shares the cores with).

:class:`ArrivalTimer` arms a Linux ``timerfd`` (``CLOCK_MONOTONIC``, absolute time, through
libc with :mod:`ctypes`; Python gains ``os.timerfd_*`` only in 3.13) and waits for it as a
reader on the loop: the kernel's high-resolution timer wakes ``epoll_wait`` itself, so the
loop sleeps until the arrival and wakes on it (within the kernel's timer slack, 50 us by
default). Where there is no timerfd (not Linux), or the broker runs on another clock than
``time.monotonic`` (tests), :func:`arrival_timer` returns None and the broker keeps the
sleep-then-yield wait.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import sys
import time
from collections.abc import Callable

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        ]
    except (OSError, AttributeError):
        return None
    return libc


class ArrivalTimer:
    """One timerfd on the running loop; :meth:`wait_until` one absolute monotonic time at a
    time (the broker's admission loop is sequential). :meth:`close` when done."""

    def __init__(self, libc: ctypes.CDLL, loop: asyncio.AbstractEventLoop) -> None:
        fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self._libc, self._loop, self._fd = libc, loop, fd
        self._spec = _Itimerspec()
        self._waiter: asyncio.Future[None] | None = None
        loop.add_reader(fd, self._fired)

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)  # the expiration count; reading re-arms the readiness
        except BlockingIOError:
            return
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_until(self, due: float) -> None:
        """Return at ``time.monotonic() >= due`` (at once when it has passed)."""
        if time.monotonic() >= due:
            return
        sec = int(due)
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = max(1, int((due - sec) * 1e9))  # 0 would disarm it
        self._waiter = self._loop.create_future()
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None):
            err = ctypes.get_errno()
            self._waiter = None
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        try:
            await self._waiter
        finally:
            self._waiter = None
        while time.monotonic() < due:  # noqa: ASYNC110 - the kernel rounds to its own clock
            await asyncio.sleep(0)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


def arrival_timer(clock: Callable[[], float]) -> ArrivalTimer | None:
    """A timerfd-backed timer for ``clock`` on the running loop, or None where there is none
    (not Linux, no timerfd) or ``clock`` is not ``time.monotonic``."""
    libc = _libc() if clock is time.monotonic else None
    if libc is None:
        return None
    try:
        return ArrivalTimer(libc, asyncio.get_running_loop())
    except (OSError, NotImplementedError):  # NotImplementedError: a loop without add_reader
        return None
