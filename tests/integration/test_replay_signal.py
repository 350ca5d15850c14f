"""SIGTERM during `testbed replay --up` brings the testbed down and exits 130 (nothing left)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.factories import REPO

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_sigterm_during_replay_takes_the_testbed_down(tmp_path):
    env = {**os.environ, "TESTBED_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed",
            "replay",
            str(REPO / "scenarios/tiny-azure.yaml"),
            "--up",
            "--runtime",
            "local",
            "--no-progress",
            "--output",
            str(tmp_path / "results"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if " up in " in line:  # the testbed is up; the replay is starting
            break
    assert " up in " in seen, seen
    state = list((tmp_path / "state").glob("tb*.json"))
    assert len(state) == 1
    pids = [n["pid"] for n in json.loads(state[0].read_text())["nodes"].values()]
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + out
    assert not list((tmp_path / "state").glob("tb*.json")), "state file left behind"

    # `down` terminated them; give the kernel a moment to finish the exits (zombies count as gone)
    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "stage processes left running"
