"""`runtime: swarm` end to end on a single-node swarm (`docker swarm init --advertise-addr
127.0.0.1`): `testbed up` (services, overlays, shaping agent, links measured), a short replay
of the tiny scenario through the services, `testbed down` (nothing of the run left), and the
engine's swarm state as it was before (left again, `docker_gwbridge` removed, when the test
made the swarm; a swarm that was there before is kept)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from tests.dockerenv import docker_or_skip

REPO = Path(__file__).resolve().parents[2]
CLI = "from testbed.cli.main import main; main()"

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1800)]


def _swarm_state(c: Any) -> str:
    return str((c.info().get("Swarm") or {}).get("LocalNodeState"))


@contextlib.contextmanager
def single_node_swarm(c: Any) -> Iterator[None]:
    """A swarm for the test: the engine's own if it is a manager already, else one made here
    and left again (with the docker_gwbridge it created), also when the test fails."""
    import docker

    state = _swarm_state(c)
    if state == "active":
        if not (c.info().get("Swarm") or {}).get("ControlAvailable"):
            pytest.skip("this engine is a swarm worker; the test needs a manager")
        yield
        return
    if state != "inactive":
        pytest.skip(f"swarm state {state!r}: neither in a swarm nor out of one")
    had_gwbridge = bool(c.networks.list(names=["docker_gwbridge"]))
    c.swarm.init(advertise_addr="127.0.0.1")
    try:
        yield
    finally:
        c.swarm.leave(force=True)
        if not had_gwbridge:
            for net in c.networks.list(names=["docker_gwbridge"]):
                with contextlib.suppress(docker.errors.APIError):
                    net.remove()


def _cli(
    environ: dict[str, str], *args: str, timeout: float = 1200
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        env=environ,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _listeners() -> str:
    """The host's listening TCP sockets and their processes (when the health wait failed:
    who else holds a published port)."""
    ss = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=False)
    return f"\nhost listeners (pytest is pid {os.getpid()}):\n{ss.stdout[-3000:]}"


def _leftovers(c: Any, run_id: str) -> dict[str, list[str]]:
    label = f"testbed.run={run_id}"
    out = {
        "containers": [x.name for x in c.containers.list(all=True, filters={"label": label})],
        "networks": [n.name for n in c.networks.list(filters={"label": label})],
    }
    with contextlib.suppress(Exception):  # no services once the swarm is left
        out["services"] = [s.name for s in c.services.list(filters={"label": label})]
    return {k: v for k, v in out.items() if v}


def test_swarm_up_measure_replay_down(tmp_path: Path) -> None:
    c = docker_or_skip(timeout=60, root_reason="the shaping agent's job and the probe need root")
    before = _swarm_state(c)
    gw_before = bool(c.networks.list(names=["docker_gwbridge"]))
    environ = os.environ | {"TESTBED_STATE_DIR": str(tmp_path / "state")}
    run_id = None
    with single_node_swarm(c):
        try:
            proc = _cli(
                environ,
                "up",
                str(REPO / "topologies" / "tiny.yaml"),
                "--runtime",
                "swarm",
                "--health-timeout",
                "400",
                "--json",
            )
            assert proc.returncode == 0, proc.stderr[-3000:] + _listeners()
            tb = json.loads(proc.stdout)
            run_id = tb["run_id"]
            assert tb["runtime"] == "swarm" and tb["status"] == "up"
            assert sorted(tb["nodes"]) == ["cloud-1", "edge-1", "edge-2", "fog-1"]
            label = f"testbed.run={run_id}"
            services = c.services.list(filters={"label": label})
            assert sorted(s.name for s in services) == sorted(
                f"tb-{run_id}-{n}" for n in tb["nodes"]
            )
            nets = {n.name: n for n in c.networks.list(filters={"label": label})}
            assert sorted(nets) == sorted(
                f"tb-{run_id}-{x}" for x in ("edge", "fog", "cloud", "edge-fog", "fog-cloud")
            )
            for n in nets.values():
                n.reload()
                assert n.attrs["Driver"] == "overlay" and n.attrs["Attachable"]
            # every node fed by a link was shaped by the agent and measured against its config
            fed = {name for name, n in tb["nodes"].items() if n["link"]}
            assert fed == {"fog-1", "cloud-1"}
            for name in fed:
                assert tb["nodes"][name]["down_iface"]["ifname"].startswith("veth")
            checks = {ch["node"]: ch for ch in tb["checks"]}
            assert set(checks) == fed
            for ch in checks.values():
                assert ch["measured_rtt_s"] is not None, ch
                assert ch["ok"], ch
            assert checks["cloud-1"]["measured_rtt_s"] >= 0.018  # 2 x 10 ms configured

            _replay(tmp_path, environ, run_id)

            proc = _cli(environ, "down", run_id, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert _leftovers(c, run_id) == {}
        finally:
            if run_id is not None and _leftovers(c, run_id):
                _cli(environ, "down", run_id, timeout=300)
    assert _swarm_state(c) == before
    assert bool(c.networks.list(names=["docker_gwbridge"])) == gw_before
    if run_id is not None:
        assert _leftovers(c, run_id) == {}


def _replay(tmp_path: Path, environ: dict[str, str], run_id: str) -> None:
    from testbed.experiment.replay import ReplayOptions, replay_scenario
    from testbed.spec.scenario import load_scenario

    data = yaml.safe_load((REPO / "scenarios" / "tiny-azure.yaml").read_text())
    data["topology"] = str(REPO / "topologies" / "tiny.yaml")
    data["workload"]["path"] = str(REPO / "scenarios" / "traces" / "azure-conv-2023-head1000.csv")
    data["workload"].update(max_requests=4, rate_scale=3.0, max_output_tokens=4)
    data["output"] = str(tmp_path / "results")
    data["runtime"] = "swarm"
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_scenario(path)
    opts = ReplayOptions(run_id=run_id, up=False, progress=False, plots=False)
    old = os.environ.get("TESTBED_STATE_DIR")
    os.environ["TESTBED_STATE_DIR"] = environ["TESTBED_STATE_DIR"]
    try:
        run = asyncio.run(replay_scenario(loaded, opts, Console(stderr=True)))
    finally:
        if old is None:
            os.environ.pop("TESTBED_STATE_DIR", None)
        else:
            os.environ["TESTBED_STATE_DIR"] = old
    assert run.summary.completed == 4, [r.reason for r in run.records]
    for r in run.records:
        # each step pays at least the fog->cloud link's configured round trip (2 x 10 ms)
        assert r.hop_transfer_s["fog-1->cloud-1"] >= 0.018 * r.output_tokens
    cfg = json.loads((run.out_dir / "config.json").read_text())
    assert cfg["testbed"]["runtime"] == "swarm" and cfg["testbed"]["run_id"] == run_id
