"""Runtimes by name, run ids, ownership and `clean`, the leash, and the CLI's run_async,
with real processes but no model, Docker or root."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.runtime import owner as ownership
from testbed.runtime.base import NodeEndpoint, RunningTestbed, check_run_id, list_states
from testbed.runtime.control import RunState, clean_sync, down_sync, is_orphan
from testbed.runtime.interface import RUNTIMES, Runtime
from tests.factories import REPO

CLI = "from testbed.cli.main import main; main()"


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr("testbed.runtime.control.NETNS_DIR", Path("/nonexistent-netns-dir"))
    return tmp_path / "state"


def _sleeper() -> subprocess.Popen[bytes]:
    """A process whose command line names the testbed (as stage processes' do)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "testbed-test-node"],
        start_new_session=True,
    )


def _dead_owner() -> tuple[int, int]:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = ownership.start_ticks(p.pid) or 1
    p.wait()
    return p.pid, ticks


def _local_run(run_id: str, pid: int, owner: tuple[int, int] | None) -> RunningTestbed:
    node = NodeEndpoint("n1", "edge", 0, "http://127.0.0.1:1", 0, 2, "cpu", "127.0.0.1", 1, pid=pid)
    tb = RunningTestbed(run_id, "local", "app", "t.yaml", "t", "/m", {"n1": node}, owner=owner)
    tb.save()
    return tb


def _gone(p: subprocess.Popen[bytes], timeout_s: float = 10.0) -> bool:
    try:
        p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


# --- runtimes by name ---------------------------------------------------------------------


def test_runtimes_are_registered_by_name_and_implement_the_interface():
    assert {"local", "docker"} <= set(RUNTIMES.names())
    for name in RUNTIMES.names():
        rt = RUNTIMES.create(name)
        assert isinstance(rt, Runtime) and rt.name == name
    with pytest.raises(ConfigError, match="unknown runtime 'swarmm'"):
        RUNTIMES.create("swarmm")
    with pytest.raises(ConfigError, match="image_mode"):
        RUNTIMES.create("docker", {"image_mode": "nope"})


def test_no_runtime_is_chosen_by_comparing_its_name():
    pattern = re.compile(r"""runtime\s*[!=]=\s*["']|["'](local|docker)["']\s*[!=]=\s*\w*runtime""")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in (REPO / "testbed").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


# --- run ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../victim", "tb../x", "/etc", "tb0123abcd/..", "TB0123ABCD", ""])
def test_run_ids_are_validated(bad):
    with pytest.raises(ConfigError, match="not a run id"):
        check_run_id(bad)


def test_down_with_a_path_as_run_id_exits_2_and_deletes_nothing(state_dir):
    victim = state_dir.parent / "victim-logs"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("x")
    state_dir.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"TESTBED_STATE_DIR": str(state_dir)}
    res = subprocess.run(
        [sys.executable, "-c", CLI, "down", "../victim"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert "not a run id" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (victim / "keep.txt").exists()


# --- ownership and clean ------------------------------------------------------------------------


def test_orphan_verdicts():
    mine = ownership.me()
    assert not is_orphan(RunState("tb00000001", True, mine, True, True))  # owner running
    assert is_orphan(RunState("tb00000002", True, (1, 1), False, True))  # owner died
    assert not is_orphan(RunState("tb00000003", True, None, False, True))  # handed over, up
    assert is_orphan(RunState("tb00000004", True, None, False, False))  # handed over, all gone
    assert is_orphan(RunState("tb00000005", False, None, False, False))  # unreadable state


def test_owner_identity_survives_pid_reuse():
    assert ownership.alive(ownership.me())
    pid, ticks = ownership.me()
    assert not ownership.alive((pid, ticks + 1))  # same pid, another process
    assert not ownership.alive(_dead_owner())


def test_clean_keeps_live_runs_and_removes_orphans(state_dir, monkeypatch):
    # `clean --all` also sweeps every testbed-labelled object of the Docker engine (containers
    # and networks by the docker runtime, services and then every labelled container and
    # network by the swarm runtime); a unit test must not touch other live runs there, so both
    # engine runtimes' sweeps are recorded, not run (patching only docker's let the swarm
    # runtime's sweep remove every live Docker testbed on the machine during the suite)
    from testbed.runtime.kinds.engine import EngineRuntime

    swept: list[str] = []
    monkeypatch.setattr(EngineRuntime, "remove_all", lambda self: swept.append(self.name) or [])
    live_owned, live_detached, orphan = _sleeper(), _sleeper(), _sleeper()
    try:
        _local_run("tb0000000a", live_owned.pid, ownership.me())
        _local_run("tb0000000b", live_detached.pid, None)
        _local_run("tb0000000c", orphan.pid, _dead_owner())
        _local_run("tb0000000d", 999_999_999, None)  # handed over, its process long gone
        lines = clean_sync()
        assert _gone(orphan), lines
        assert live_owned.poll() is None and live_detached.poll() is None
        assert sorted(p.stem for p in list_states()) == ["tb0000000a", "tb0000000b"]
        # a run the user names goes, live or not
        clean_sync(runs=("tb0000000b",))
        assert _gone(live_detached)
        assert [p.stem for p in list_states()] == ["tb0000000a"]
        assert live_owned.poll() is None
        # --all: everything
        clean_sync(everything=True)
        assert _gone(live_owned) and list_states() == []
        assert sorted(swept) == ["docker", "swarm"]
    finally:
        for p in (live_owned, live_detached, orphan):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_clean_all_needs_confirmation_when_not_interactive(state_dir):
    env = os.environ | {"TESTBED_STATE_DIR": str(state_dir)}
    res = subprocess.run(
        [sys.executable, "-c", CLI, "clean", "--all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 2 and "--yes" in res.stderr, res.stderr


def test_down_of_an_unrecorded_run_asks_every_runtime(monkeypatch):
    import testbed.runtime.docker as dockermod

    monkeypatch.setattr(dockermod, "remove_by_label", lambda c, label: (2, 1))
    msg = down_sync("tb0123abcd")
    assert "removed 2 containers, 1 networks" in msg


# --- the leash ---------------------------------------------------------------------------------


def _leashed(state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "testbed.runtime.owner", str(state), "http.server", "0"],
        cwd=state.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )


@pytest.mark.timeout(60)
def test_a_leashed_node_stops_when_its_owner_is_killed_not_when_handed_over(tmp_path):
    owner_proc = _sleeper()
    state = tmp_path / "tb0000abcd.json"
    state.write_text(json.dumps({"owner": [owner_proc.pid, ownership.start_ticks(owner_proc.pid)]}))
    node = _leashed(state)
    detached_state = tmp_path / "tb0000abce.json"
    detached_state.write_text(json.dumps({"owner": None}))
    detached = _leashed(detached_state)
    try:
        time.sleep(1.5)
        assert node.poll() is None and detached.poll() is None
        owner_proc.kill()  # SIGKILL: no cleanup of its own
        owner_proc.wait()
        assert _gone(node, 15.0), "the leashed node outlived its owner"
        assert detached.poll() is None  # handed over: it outlives whoever started it
    finally:
        for p in (node, detached, owner_proc):
            if p.poll() is None:
                p.kill()
                p.wait()


# --- run_async ------------------------------------------------------------------------------------

_RUN_ASYNC = """
import asyncio, os, signal, sys
from testbed.cli.common import run_async

async def work():
    # a forked child that gets SIGTERM must not cancel this run
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(0)
    await asyncio.sleep(0.5)
    print("child", os.waitpid(pid, 0)[1] != 0, flush=True)
    try:
        print("ready", flush=True)
        await asyncio.sleep(60)
    finally:
        await asyncio.sleep(0.1)  # cleanup that awaits still runs
        print("cleanup ran", flush=True)

run_async(work())
"""


@pytest.mark.timeout(60)
def test_run_async_sigterm_cancels_runs_cleanup_and_exits_130():
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_ASYNC],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    assert lines == ["child True\n", "ready\n"], lines
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "cleanup ran" in out and "interrupted" in err


def test_max_requests_below_one_is_a_usage_error(tmp_path):
    bad = ["--max-requests", "-1"]
    for cmd in ("replay", "compare"):
        res = subprocess.run(
            [sys.executable, "-c", CLI, cmd, str(REPO / "scenarios/tiny-azure.yaml"), *bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 2, res.stderr
        assert "--max-requests" in res.stderr


def test_the_one_stage_serve_command_line():
    from testbed.runtime.base import CLI_CODE, cli_launcher, stage_serve_argv

    argv = stage_serve_argv(
        cli_launcher("python3"), "/model", (2, 5), host="0.0.0.0", port=8000, name="fog-1"
    )
    assert argv == [
        "python3",
        "-c",
        CLI_CODE,
        "stage",
        "serve",
        "--model-dir",
        "/model",
        "--blocks",
        "2:5",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--name",
        "fog-1",
    ]
    leashed = stage_serve_argv(
        ["py", "-m", "testbed.runtime.owner", "S", "cli"],
        "/m",
        (0, 1),
        host="h",
        port=0,
        name="n",
        extra=["--exit-with-parent"],
    )
    assert leashed[:5] == ["py", "-m", "testbed.runtime.owner", "S", "cli"]
    assert leashed[5:7] == ["stage", "serve"] and leashed[-1] == "--exit-with-parent"
