"""Stopping the local processes of a run by pid (only processes that are the testbed's)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat[stat.rfind(")") + 2 :][:1] != "Z"


def is_testbed_process(pid: int) -> bool:
    """A recycled pid must not be killed: the process's command line names the testbed."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"testbed" in cmd


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)


def kill_pids(pids: list[int], timeout_s: float = 5.0) -> int:
    """Blocking: SIGTERM the testbed processes among ``pids``, SIGKILL what is left after
    ``timeout_s``, and wait (as long again at most) until they are gone, so a caller that
    returns "stopped" is right. Returns how many there were."""
    killed = [p for p in pids if p and pid_alive(p) and is_testbed_process(p)]
    for p in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    _wait_gone(killed, timeout_s)
    for p in killed:
        if pid_alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    _wait_gone(killed, timeout_s)  # a big process on a busy host takes a while to exit
    return len(killed)
