"""Who owns a run, and a leash that stops a local node when its owner dies without cleaning up.

A run's owner is the process that brought it up, recorded as (pid, start time) so a recycled
pid is not mistaken for it. `testbed up` hands the run over when it is up (``owner = None``:
detached, stopped by `testbed down`); `replay --up` owns it to the end. A local node runs on a
leash: a watchdog thread that polls the owner and the state file every ``POLL_S``; if the
owner is gone while the state file still names it (it died by SIGKILL, before its cleanup),
the node stops itself. PR_SET_PDEATHSIG is not used: it fires when the *thread* that forked
the child exits (asyncio starts children from worker threads), and it cannot be handed over.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 5.0  # after SIGTERM to itself, the node exits hard if it has not stopped


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def me() -> tuple[int, int]:
    """This process as an owner."""
    pid = os.getpid()
    return pid, start_ticks(pid) or 0


def alive(owner: tuple[int, int]) -> bool:
    """Is the owning process still running (the same process, not a recycled pid)?"""
    pid, ticks = owner
    now = start_ticks(pid)
    return now is not None and (ticks == 0 or now == ticks)


def owner_in_state(state_file: Path) -> tuple[int, int] | bool | None:
    """The owner the state file names; None when detached; False when the file is gone."""
    try:
        data = json.loads(state_file.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return None  # being rewritten: try again at the next poll
    owner = data.get("owner")
    return (int(owner[0]), int(owner[1])) if owner else None


def _watch(state_file: Path) -> None:
    while True:
        time.sleep(POLL_S)
        owner = owner_in_state(state_file)
        if owner is False:
            break  # `down` removed the run: it stops us itself
        if owner is None or alive(owner):  # type: ignore[arg-type]
            continue
        print(f"[leash] owner {owner} of {state_file.stem} is gone; stopping", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_S)
        os._exit(1)


def main() -> None:
    """``python -m testbed.runtime.owner STATE_FILE (cli|MODULE) ARGS...``: run the testbed CLI
    (or a module as ``__main__``) with the leash on."""
    state_file, target, *args = sys.argv[1:]
    threading.Thread(target=_watch, args=(Path(state_file),), daemon=True, name="leash").start()
    if target == "cli":
        from testbed.cli.main import main as cli_main

        cli_main(args)
    else:
        import runpy

        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
