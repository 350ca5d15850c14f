"""Helpers shared by CLI modules: console, key=value parameters, JSON output, running a loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import yaml
from rich.console import Console

from testbed.errors import ConfigError

# Tables stay readable when piped (rich falls back to 80 columns without a terminal).
console = Console(width=None if Console().is_terminal else 150)
err_console = Console(stderr=True)


def parse_params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """``["alpha=0.3", "allow_empty=true"]`` -> {"alpha": 0.3, "allow_empty": True} (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r} is not KEY=VALUE; write e.g. {flag} alpha=0.3")
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


T = TypeVar("T")
INTERRUPTED_EXIT = 130


def run_async(coro: Coroutine[Any, Any, T], *, what: str = "interrupted") -> T:
    """``asyncio.run`` for every CLI command that runs a loop: SIGTERM cancels the run like
    Ctrl-C does, so every ``finally`` runs (a testbed brought up here is brought down, stage
    processes are stopped); then ``what`` goes to stderr and the command exits 130.

    Not ``loop.add_signal_handler``: its wakeup fd is inherited by forked children (pyroute2
    forks a helper per network namespace and stops it with SIGTERM), and the child's signal
    would then cancel this run. A plain handler acts only in this process (see
    tests/integration/test_replay_signal.py). A coroutine that installs its own handler (the
    stage server stops cleanly on SIGTERM) replaces this one while it runs.
    """

    async def main() -> T:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        owner = os.getpid()

        def on_term(signum: int, _frame: object) -> None:
            if os.getpid() != owner:  # a forked child: leave the parent's run alone
                os._exit(128 + signum)
            loop.call_soon_threadsafe(task.cancel)

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            return await task
        finally:
            signal.signal(signal.SIGTERM, previous)

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        err_console.print(f"[yellow]{what}[/]")
        raise SystemExit(INTERRUPTED_EXIT) from None
