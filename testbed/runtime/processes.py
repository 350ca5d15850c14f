"""Stopping the local processes of a run by pid (only processes that are the testbed's)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_testbed_process(pid: int) -> bool:
    """A recycled pid must not be killed: the process's command line names the testbed."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"testbed" in cmd


def kill_pids(pids: list[int], timeout_s: float = 5.0) -> int:
    """Blocking: SIGTERM the testbed processes among ``pids``, SIGKILL what is left after
    ``timeout_s``. Returns how many there were."""
    killed = [p for p in pids if p and pid_alive(p) and is_testbed_process(p)]
    for p in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in killed):
        time.sleep(0.05)
    for p in killed:
        if pid_alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    return len(killed)
