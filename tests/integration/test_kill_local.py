"""SIGKILL of `testbed replay --up` and `testbed up` with `--runtime local`: the stage processes
die with their owner (the leash), a killed replay keeps every completed record, `testbed report`
rebuilds the summary from them, and `clean` removes the orphaned run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.factories import REPO

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(300)]

CLI = "from testbed.cli.main import main; main()"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout_s: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _pids(state: Path) -> list[int]:
    files = list(state.glob("tb*.json"))
    if len(files) != 1:
        return []
    try:
        data = json.loads(files[0].read_text())
    except ValueError:
        return []
    return [n["pid"] for n in data["nodes"].values() if n.get("pid")] + data["extra_pids"]


def _env(tmp: Path) -> dict[str, str]:
    return os.environ | {"TESTBED_STATE_DIR": str(tmp / "state"), "PYTHONPATH": str(REPO)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, *args]


def _quiet(results: Path) -> list[str]:
    return ["--no-progress", "--output", str(results)]


def _local_tiny() -> list[str]:
    return ["--runtime", "local", "--model", "tiny", "--no-measure"]


def _kill_all(pids: list[int]) -> None:
    for p in pids:  # only if the test failed: never leave our own processes behind
        if _alive(p):
            os.kill(p, signal.SIGKILL)


def test_sigkill_of_replay_keeps_records_and_takes_its_stages_down(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "scenarios" / "tiny-azure.yaml").read_text())
    data["topology"] = str(REPO / "topologies" / "tiny.yaml")
    data["workload"]["path"] = str(REPO / "scenarios" / "traces" / "azure-conv-2023-head1000.csv")
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    proc = subprocess.Popen(
        [*_cli("replay", str(scenario), "--up", "--runtime", "local"), *_quiet(results)],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        lines: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            pids = pids or _pids(tmp_path / "state")
            streamed = list(results.glob("*/requests.jsonl"))
            if streamed:
                lines = streamed[0].read_text().splitlines()
                if len(lines) >= 3:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, "the replay ended before it could be killed"
        assert len(lines) >= 3 and pids
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _wait_gone(pids) == [], "stage processes outlived the killed replay"
        run_dir = next(results.glob("*"))
        kept = [json.loads(x) for x in (run_dir / "requests.jsonl").read_text().splitlines()]
        assert len(kept) >= len(lines)  # every record streamed before the kill is there
        assert not (run_dir / "summary.json").exists()
        rep = subprocess.run(
            [sys.executable, "-c", CLI, "report", str(run_dir), "--no-plots"],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rep.returncode == 0, rep.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["completed"] + summary["failed"] == len(kept)
        assert summary["run"]["label"] == "bsdp+arts"
        # the run's owner is gone: `clean` (no --all) removes what is left of it
        cl = subprocess.run(
            [sys.executable, "-c", CLI, "clean"],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cl.returncode == 0, cl.stderr
        assert not list((tmp_path / "state").glob("tb*.json"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_all(pids)


def test_sigkill_of_up_while_starting_leaves_no_stage_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*_cli("up", str(REPO / "topologies" / "tiny.yaml")), *_local_tiny()],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(pids) < 3:
            pids = _pids(tmp_path / "state")
            time.sleep(0.05)
        assert proc.poll() is None and len(pids) >= 3, "up ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _wait_gone(pids) == [], "stage processes outlived the killed `testbed up`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_all(pids)
