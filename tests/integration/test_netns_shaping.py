"""htb and tbf rate shaping on a real veth pair (host <-> a throwaway netns), measured with
the probe over TCP. Needs root; the netns (and with it the veth pair and qdiscs) is removed."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

import pytest

from testbed.net.probe import measure_link
from testbed.net.shaping import DirShape, Iface, egress_ops
from testbed.net.tc import apply_ops, qdiscs_sync

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, tc)"),
    pytest.mark.skipif(
        shutil.which("ip") is None, reason="needs iproute2's `ip` to run the probe in the netns"
    ),
]

HOST_IP, NS_IP = "169.254.213.1", "169.254.213.2"


@pytest.fixture
def veth_netns():
    from pyroute2 import IPRoute, netns

    name = f"testbed-test-{os.getpid()}"
    netns.create(name)
    host_if = f"tbt{os.getpid() % 100000}"
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "tbin", "net_ns_fd": name})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.addr("add", index=idx, address=HOST_IP, prefixlen=30)
            ipr.link("set", index=idx, state="up")
        with IPRoute(netns=f"/var/run/netns/{name}", flags=0) as ipr:
            inner = ipr.link_lookup(ifname="tbin")[0]
            ipr.addr("add", index=inner, address=NS_IP, prefixlen=30)
            ipr.link("set", index=inner, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield name, Iface(idx, host_if, None)
    finally:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=host_if):
                ipr.link("del", index=idx)  # the pair and its qdiscs go with it
            assert not ipr.link_lookup(ifname=host_if)
        netns.remove(name)


async def _probe_server(netns_name: str, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        netns_name,
        sys.executable,
        "-m",
        "testbed.net.probe",
        "serve",
        "--host",
        NS_IP,
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b"listening" in line
    return proc


@pytest.mark.parametrize("qdisc", ["htb", "tbf"])
async def test_rate_shaping_within_tolerance(veth_netns, qdisc):
    name, host_if = veth_netns
    proc = await _probe_server(name, 9101)
    try:
        rate = 20e6
        await apply_ops(
            egress_ops(host_if, DirShape(rate_bps=rate), "kernel-rate+app-delay", rate_qdisc=qdisc)
        )
        kinds = [q["kind"] for q in await asyncio.to_thread(qdiscs_sync, host_if)]
        assert qdisc in kinds
        m = await measure_link(NS_IP, 9101, expected_rate_bps=rate, seconds=1.0)
        assert m.throughput_bps == pytest.approx(rate, rel=0.15)
        # unshaped, the same path is far faster: the cap did the work
        await apply_ops(egress_ops(host_if, DirShape(), "kernel"))
        assert [q["kind"] for q in await asyncio.to_thread(qdiscs_sync, host_if)] in (
            [],
            ["noqueue"],
        )
        fast = await measure_link(NS_IP, 9101, expected_rate_bps=rate, seconds=1.0)
        assert fast.throughput_bps is not None and fast.throughput_bps > 3 * rate
    finally:
        proc.terminate()
        await proc.wait()
