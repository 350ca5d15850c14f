"""Where the testbed keeps things on the host: one cache folder, one state folder, results.

- cache (generated tiny model, node image rootfs): ``$TESTBED_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/testbed``, else ``~/.cache/testbed``.
- state (one JSON file and one log folder per running testbed): ``$TESTBED_STATE_DIR``, else
  ``$XDG_STATE_HOME/testbed``, else ``~/.local/state/testbed``.
- results: a scenario's ``output:`` (relative to the scenario file), else ``--output``, else
  ``$TESTBED_RESULTS_DIR``, else ``./results`` under the directory the command runs in.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("TESTBED_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "testbed"


def state_dir() -> Path:
    env = os.environ.get("TESTBED_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "testbed"


def results_dir() -> Path:
    env = os.environ.get("TESTBED_RESULTS_DIR")
    return Path(env) if env else Path.cwd() / "results"
