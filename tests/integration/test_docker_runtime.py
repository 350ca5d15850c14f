"""`testbed up` against the real Docker engine: containers, limits, shaped links measured,
a generation through the containers equal to the whole model, `down`/`clean` leave nothing.

The node image is built on first use (cold: debootstrap, ~2 min) and reused afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dockerenv import docker_or_skip

CLI = "from testbed.cli.main import main; main()"

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

TOPOLOGY = """
name: dockertest
tiers:
  - name: edge
    nodes: [{name: edge-1, device: {base: cpu-core, cpus: 0.5, mem: 512MiB, mem_limit: 768MiB}}]
  - name: fog
    nodes: [{name: fog-1, device: {base: cpu-core, cpus: 0.5, mem: 512MiB, mem_limit: 768MiB}}]
  - name: cloud
    nodes: [{name: cloud-1, device: {base: cpu-core, cpus: 0.75, mem: 1GiB, mem_limit: 1GiB}}]
links:
  - {from: edge, to: fog, bandwidth: 40Mbit, delay: 5ms, jitter: 1ms}
  - {from: fog, to: cloud, bandwidth: 80Mbit, delay: 10ms}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    c = docker_or_skip()
    tmp = tmp_path_factory.mktemp("dockertb")
    from testbed.model.tiny import make_tiny_model

    model = make_tiny_model(tmp / "model")
    topo = tmp / "topo.yaml"
    topo.write_text(TOPOLOGY)
    environ = os.environ | {"TESTBED_STATE_DIR": str(tmp / "state")}
    yield c, tmp, model, topo, environ
    subprocess.run(
        [sys.executable, "-c", CLI, "clean"], env=environ, check=False, capture_output=True
    )


def _cli(environ, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        env=environ,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _assert_nothing_left(c, run_id: str | None = None) -> None:
    label = "testbed.run" if run_id is None else f"testbed.run={run_id}"
    assert c.containers.list(all=True, filters={"label": label}, sparse=True) == []
    assert c.networks.list(filters={"label": label}) == []
    from pyroute2 import IPRoute

    with IPRoute() as ipr:  # no bridge of ours (named tb<run>...) and so no veth/qdisc of ours
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    if run_id is not None:
        assert not [n for n in names if n.startswith(f"tb{run_id[2:]}")]
    assert (
        not [p for p in Path("/var/run/netns").glob("testbed-*")]
        if Path("/var/run/netns").exists()
        else True
    )


def test_up_measure_generate_down(env):
    c, _tmp, model, topo, environ = env
    t0 = time.monotonic()
    res = _cli(environ, "up", str(topo), "--model", str(model), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    tb = json.loads(res.stdout)
    run_id = tb["run_id"]
    print(f"up took {time.monotonic() - t0:.1f}s; backend {tb['backend']}", file=sys.stderr)
    try:
        # containers: labelled, limited, on our networks only
        ctrs = c.containers.list(filters={"label": f"testbed.run={run_id}"})
        assert {x.labels["testbed.node"] for x in ctrs} == set(tb["nodes"])
        for ctr in ctrs:
            hc = ctr.attrs["HostConfig"]
            node = tb["nodes"][ctr.labels["testbed.node"]]
            assert hc["CpuPeriod"] == 100_000 and hc["CpuQuota"] == round(node["cpus"] * 100_000)
            assert hc["Memory"] == node["mem_limit_bytes"] == hc["MemorySwap"]
            nets = set(ctr.attrs["NetworkSettings"]["Networks"])
            assert "bridge" not in nets and all(n.startswith(f"tb-{run_id}-") for n in nets)
        for name in tb["networks"]:
            assert c.networks.get(name).attrs["Internal"] is True
        # links measured within tolerance of the configuration
        checks = tb["checks"]
        assert {ch["node"] for ch in checks} == {"fog-1", "cloud-1"}
        for ch in checks:
            # shaped (never faster than configured) and not doubled; load only adds latency
            cfg = ch["configured_rtt_s"]
            assert cfg - 0.0005 <= ch["measured_rtt_s"] <= cfg + max(0.006, 0.25 * cfg), ch
            assert ch["measured_rate_bps"] == pytest.approx(ch["configured_rate_bps"], rel=0.2)
        # status sees every node healthy
        st = _cli(environ, "status", run_id, "--json")
        assert st.returncode == 0, st.stderr
        assert set(json.loads(st.stdout)["health"].values()) == {"healthy"}
        # a generation through the containers equals the whole model
        _check_generation(model, run_id, environ)
    finally:
        res = _cli(environ, "down", run_id)
        assert res.returncode == 0, res.stderr
    _assert_nothing_left(c, run_id)
    again = _cli(environ, "down", run_id)  # idempotent
    assert again.returncode == 0


def _check_generation(model: Path, run_id: str, environ) -> None:
    script = f"""
import asyncio, json, os, sys
os.environ["TESTBED_STATE_DIR"] = {environ["TESTBED_STATE_DIR"]!r}
import torch
from transformers import AutoModelForCausalLM
from testbed.runtime.base import load_running
from testbed.stage.client import generate_through

tb = load_running({run_id!r})
nodes = tb.stage_nodes()
prompt = [1, 5, 9, 13, 2, 7]
got = asyncio.run(generate_through([n.url for n in nodes], prompt, max_new_tokens=6,
                                   hooks=[n.hook for n in nodes]))
ref = AutoModelForCausalLM.from_pretrained({str(model)!r}).eval()
with torch.no_grad():
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0].tolist()
print(json.dumps({{"got": list(got), "want": want}}))
"""
    res = subprocess.run(
        [sys.executable, "-c", script],
        text=True,
        capture_output=True,
        timeout=300,
        env=environ,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["got"] == out["want"]


def test_sigkill_up_then_clean_leaves_nothing(env):
    c, _tmp, model, topo, environ = env
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "up", str(topo), "--model", str(model)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = Path(environ["TESTBED_STATE_DIR"])
    run_id = None
    try:
        # kill it once it has created containers (halfway: before health/measurement finish);
        # only this test's run is looked at, other runs on the machine are not ours
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ids = [p.stem for p in state.glob("tb*.json")]
            if ids and c.containers.list(
                all=True, filters={"label": f"testbed.run={ids[0]}"}, sparse=True
            ):
                run_id = ids[0]
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        else:
            pytest.fail("testbed up created no container within 300 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert c.containers.list(
        all=True, filters={"label": f"testbed.run={run_id}"}, sparse=True
    )  # the crash left them
    res = _cli(environ, "clean")
    assert res.returncode == 0, res.stderr
    _assert_nothing_left(c, run_id)
    assert not list(Path(environ["TESTBED_STATE_DIR"]).glob("tb*.json"))
    assert _cli(environ, "clean").returncode == 0  # idempotent
