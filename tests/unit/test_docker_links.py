"""Forwarding on the docker runtime, without Docker: which link networks join which stages,
who gets which address, which URL a step's route carries, and when forwarding is refused."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from testbed.broker.http import HttpStageTransport
from testbed.errors import ConfigError
from testbed.net.links import plan_peer_links
from testbed.runtime.base import NodeEndpoint, RunningTestbed
from testbed.runtime.docker_links import (
    memberships,
    peer_addresses,
    plan_link_nets,
    previous_stage,
)
from tests.unit.test_capacity import make, stage

REPO = Path(__file__).resolve().parents[2]


def _plan(skip_fog: bool = False):
    fog = {} if skip_fog else {"f1": 1.0, "f2": 1.0}
    return make(
        [
            stage("edge", 0, 0, 2, {"e1": 1.0}, 0.1),
            stage("fog", 1, 2, 2 if skip_fog else 4, fog, 0.1),
            stage("cloud", 2, 2 if skip_fog else 4, 6, {"c1": 1.0}, 0.0),
        ]
    )


def test_one_link_network_per_pair_of_consecutive_stages() -> None:
    links = plan_peer_links(_plan())
    assert [(x.label, x.senders, x.receivers) for x in links] == [
        ("edge->fog", ("e1",), ("f1", "f2")),
        ("fog->cloud", ("f1", "f2"), ("c1",)),
    ]


def test_a_tier_holding_nothing_is_skipped_as_in_the_relay() -> None:
    links = plan_peer_links(_plan(skip_fog=True))
    assert [(x.label, x.senders, x.receivers) for x in links] == [("edge->cloud", ("e1",), ("c1",))]


def test_link_networks_give_every_member_an_address_and_receivers_a_peer_address() -> None:
    subnets = list(ipaddress.ip_network("10.99.0.0/16").subnets(new_prefix=24))[:2]
    nets = plan_link_nets("tb0123abcd", plan_peer_links(_plan()), subnets)
    assert [n.name for n in nets] == ["tb-tb0123abcd-edge-to-fog", "tb-tb0123abcd-fog-to-cloud"]
    assert all(len(n.bridge) <= 15 for n in nets)  # a Linux interface name
    assert len({n.bridge for n in nets}) == 2
    assert nets[0].addresses == {"e1": "10.99.0.2", "f1": "10.99.0.3", "f2": "10.99.0.4"}
    assert peer_addresses(nets) == {"f1": "10.99.0.3", "f2": "10.99.0.4", "c1": "10.99.1.4"}
    joins = memberships(nets)
    assert joins["f1"] == [("tb-tb0123abcd-edge-to-fog", "10.99.0.3"),
                           ("tb-tb0123abcd-fog-to-cloud", "10.99.1.2")]  # fmt: skip
    assert joins["e1"] == [("tb-tb0123abcd-edge-to-fog", "10.99.0.2")]


def _ep(name: str, tier: str, j: int, peer: str | None = None) -> NodeEndpoint:
    return NodeEndpoint(
        name, tier, j, f"http://10.0.{j}.2:8000", j * 2, j * 2 + 2, "cpu", f"10.0.{j}.2", 9101,
        peer_address=peer, peer_url=None if peer is None else f"http://{peer}:8000",
    )  # fmt: skip


def _tb(runtime: str, *, peers: bool) -> RunningTestbed:
    nodes = [
        _ep("e1", "edge", 0),
        _ep("f1", "fog", 1, "10.1.0.3" if peers else None),
        _ep("c1", "cloud", 2, "10.1.1.3" if peers else None),
    ]
    return RunningTestbed(
        "tb00000000", runtime, "app", "t.yaml", "t", "m", {n.name: n for n in nodes}
    )


def test_the_route_carries_each_nodes_address_on_the_link_network_into_it() -> None:
    from testbed.experiment.replay import make_transport

    tb = _tb("docker", peers=True)
    assert tb.route_url("e1") == "http://10.0.0.2:8000"  # the broker's own hop: its tier network
    assert tb.route_url("f1") == "http://10.1.0.3:8000"
    http = make_transport(tb).inner
    assert isinstance(http, HttpStageTransport)
    assert http.urls["f1"] == "http://10.0.1.2:8000"  # the broker still talks to tier networks
    assert http._route_hop("f1").url == "http://10.1.0.3:8000"
    assert http._route_hop("c1").url == "http://10.1.1.3:8000"
    assert previous_stage(tb, "c1") == ["f1"] and previous_stage(tb, "e1") == []


def test_forward_on_docker_and_swarm_needs_the_link_networks() -> None:
    from testbed.broker.broker import BrokerConfig
    from testbed.experiment.replay import broker_config

    base = BrokerConfig()
    assert broker_config(base, "forward", None, _tb("docker", peers=True)).transport == "forward"
    with pytest.raises(ConfigError, match="no link networks"):
        broker_config(base, "forward", None, _tb("docker", peers=False))
    assert broker_config(base, "forward", None, _tb("swarm", peers=True)).transport == "forward"
    with pytest.raises(ConfigError, match="no shaped link overlays"):
        broker_config(base, "forward", None, _tb("swarm", peers=False))


def test_the_probe_cli_measures_through_the_hops_app_shaper(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What the node-to-node check runs in the sending container: the hop's app-level delay
    (both ways) is in the RTT it prints as JSON."""
    import asyncio
    import json
    import threading

    from testbed.net.probe import ProbeServer, main

    loop = asyncio.new_event_loop()
    server = ProbeServer()
    loop.run_until_complete(server.start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        fwd = {"rate_bps": None, "delay_s": 0.02, "jitter_s": 0.0, "loss_pct": 0.0}
        hop = {"forward": fwd, "reverse": fwd, "apply_rate": False}
        main(["measure", "127.0.0.1", "--port", str(server.port), "--json",
              "--hop", json.dumps(hop)])  # fmt: skip
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.run_until_complete(server.aclose())
        loop.close()
    assert 0.04 <= got["rtt_s"] < 0.2 and got["throughput_bps"] is None


def test_a_link_network_is_rate_shaped_both_ways() -> None:
    """The receiver's veth pair on a link network: host side (into it) and container side
    (back to the previous stage) each get the link's htb rate; delay, jitter and loss in netem
    under it where the kernel has netem, else only the rate (the app shaper adds the rest)."""
    from testbed.net.links import link_net_reverse, plan_shaping
    from testbed.net.shaping import Iface
    from testbed.runtime.docker import shaping_ops
    from testbed.spec.topology import load_topology

    topo = load_topology(REPO / "topologies" / "tiny.yaml")
    for backend, kinds in (("kernel", ["htb", "htb", "netem"]),
                           ("kernel-rate+app-delay", ["htb", "htb"])):  # fmt: skip
        ns = plan_shaping(topo, backend)["cloud-1"]
        back = link_net_reverse(ns.downlink, ns.uplink)
        assert back.rate_bps == ns.downlink.rate_bps == ns.configured_rate_bps
        assert back.delay_s == ns.uplink.delay_s > 0
        host, inside = Iface(7, "vethX"), Iface(2, "eth1", "/proc/1/ns/net")
        ops = shaping_ops(host, inside, ns.downlink, back, backend)
        for iface in (host, inside):
            mine = [o for o in ops if o.iface == iface and o.command != "del"]
            assert [o.kind for o in mine] == kinds
            rate = dict(mine[1].params)["rate"]
            assert rate == f"{round(ns.configured_rate_bps)}bit"
    # the tier network of the relay keeps its reverse direction unrated (the next hop paces it)
    assert plan_shaping(topo, "kernel")["cloud-1"].uplink.rate_bps is None


def test_the_probe_measures_the_return_direction() -> None:
    """``reverse``: the large message comes back from the service (a throughput is measured
    over the download, through the same connection)."""
    import asyncio

    from testbed.net.probe import ProbeServer, measure_link

    async def go() -> tuple[float, float]:
        server = ProbeServer()
        await server.start()
        try:
            fwd = await measure_link("127.0.0.1", server.port, expected_rate_bps=8e6)
            rev = await measure_link("127.0.0.1", server.port, expected_rate_bps=8e6, reverse=True)
        finally:
            await server.aclose()
        assert fwd.throughput_bps is not None and rev.throughput_bps is not None
        return fwd.throughput_bps, rev.throughput_bps

    fwd, rev = asyncio.run(go())
    assert fwd > 8e6 and rev > 8e6  # loopback: far faster than the rate it was sized for
