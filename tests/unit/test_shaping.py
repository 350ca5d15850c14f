"""The tc operation builder, the per-node link map and the app shaper: no root, no Docker."""

from __future__ import annotations

import math

import pytest

from testbed.net.appshaper import MSS_BYTES, AppShaper, HopShape
from testbed.net.links import plan_shaping
from testbed.net.shaping import (
    HTB_CLASS,
    HTB_ROOT,
    MIN_NETEM_LIMIT,
    TC_H_ROOT,
    DirShape,
    Iface,
    egress_ops,
    htb_burst_bytes,
    netem_limit_packets,
    rate_arg,
)
from testbed.spec.topology import topology_from_dict

IF = Iface(7, "veth0", None)
SHAPE = DirShape(rate_bps=50e6, delay_s=0.005, jitter_s=0.001, loss_pct=0.1)


def kinds(ops):
    return [(o.command, o.kind) for o in ops]


def test_kernel_backend_htb_with_netem_child_and_units():
    ops = egress_ops(IF, SHAPE, "kernel")
    assert kinds(ops) == [
        ("del", ""),
        ("replace", "htb"),
        ("replace-class", "htb"),
        ("replace", "netem"),
    ]
    assert ops[0].missing_ok and ops[0].parent == TC_H_ROOT
    htb_class = ops[2].kwargs()
    # rates are strings in bits with the lowercase suffix: a bare int would be bytes/s
    assert htb_class["rate"] == "50000000bit" and htb_class["ceil"] == "50000000bit"
    assert ops[2].parent == HTB_ROOT and ops[2].handle == HTB_CLASS
    netem = ops[3].kwargs()
    assert ops[3].parent == HTB_CLASS
    assert netem["delay"] == 5000 and isinstance(netem["delay"], int)  # microseconds
    assert netem["jitter"] == 1000 and isinstance(netem["jitter"], int)
    assert netem["loss"] == pytest.approx(0.1)
    # every field is sent on replace, including the defaults
    assert set(netem) == {"delay", "jitter", "loss", "limit"}


def test_rate_only_backend_leaves_netem_out():
    ops = egress_ops(IF, SHAPE, "kernel-rate+app-delay")
    assert kinds(ops) == [("del", ""), ("replace", "htb"), ("replace-class", "htb")]


def test_tbf_variant():
    ops = egress_ops(IF, DirShape(rate_bps=10e6), "kernel-rate+app-delay", rate_qdisc="tbf")
    assert kinds(ops) == [("del", ""), ("replace", "tbf")]
    kw = ops[1].kwargs()
    assert kw["rate"] == "10000000bit" and kw["burst"] >= 10 * 1514 and kw["latency"]


def test_app_backend_and_noop_only_clear():
    assert kinds(egress_ops(IF, SHAPE, "app")) == [("del", "")]
    assert kinds(egress_ops(IF, DirShape(), "kernel")) == [("del", "")]


def test_delay_without_rate_is_root_netem():
    ops = egress_ops(IF, DirShape(None, 0.01, 0.0, 0.0), "kernel")
    assert kinds(ops) == [("del", ""), ("replace", "netem")]
    assert ops[1].parent == TC_H_ROOT
    # and nothing in the kernel when netem is missing
    assert kinds(egress_ops(IF, DirShape(None, 0.01), "kernel-rate+app-delay")) == [("del", "")]


def test_netem_limit_sizing():
    # 1 Gbit/s x 100 ms = 12.5 MB in flight = 8257 full frames; x1.5
    lim = netem_limit_packets(1e9, 0.08, 0.02)
    assert lim == math.ceil(1.5 * 1e9 / 8 * 0.1 / 1514)
    assert netem_limit_packets(1e6, 0.001, 0) == MIN_NETEM_LIMIT


def test_rate_string_and_burst():
    assert rate_arg(1.5e6) == "1500000bit"
    assert rate_arg(0.2) == "1bit"
    assert htb_burst_bytes(1e6) == 10 * 1514
    assert htb_burst_bytes(10e9) == math.ceil(10e9 / 8 * 0.005)


def test_dirshape_validation():
    with pytest.raises(ValueError):
        DirShape(rate_bps=0)
    with pytest.raises(ValueError):
        DirShape(rate_bps=40e9)
    with pytest.raises(ValueError):
        DirShape(delay_s=-1)
    with pytest.raises(ValueError):
        DirShape(loss_pct=101)
    with pytest.raises(ValueError):
        egress_ops(IF, SHAPE, "bogus")  # type: ignore[arg-type]


def test_describe_reads_like_tc():
    line = egress_ops(IF, SHAPE, "kernel")[3].describe()
    assert line.startswith("tc qdisc replace dev veth0 parent 1:10 handle 10: netem")
    assert "delay 5000" in line


TOPO = {
    "name": "t",
    "tiers": [
        {
            "name": "edge",
            "nodes": [{"name": "e1", "device": "cpu-core"}, {"name": "e2", "device": "cpu-core"}],
        },
        {"name": "fog", "nodes": [{"name": "f1", "device": "cpu-core"}]},
        {"name": "cloud", "nodes": [{"name": "c1", "device": "cpu-core"}]},
    ],
    "links": [
        {"from": "edge", "to": "fog", "bandwidth": "50Mbit", "delay": "5ms", "jitter": "1ms"},
        {"from": "cloud", "to": "fog", "bandwidth": "100Mbit", "delay": "10ms", "loss": "0.5%"},
    ],
}


def test_plan_shaping_feeds_each_tier_from_its_upstream_link():
    shaping = plan_shaping(topology_from_dict(TOPO), "kernel")
    assert (
        shaping["e1"].link is None
        and shaping["e1"].downlink.is_noop
        and shaping["e1"].uplink.is_noop
    )
    f1 = shaping["f1"]
    assert f1.link == "edge->fog"
    assert f1.downlink == DirShape(50e6, 0.005, 0.001, 0.0)
    assert f1.uplink == DirShape(None, 0.005, 0.001, 0.0)  # reverse: delay, no rate
    assert f1.configured_rtt_s == pytest.approx(0.01) and f1.configured_rate_bps == 50e6
    assert f1.hop is None  # the kernel does everything
    c1 = shaping["c1"]
    assert c1.link == "fog->cloud" and c1.downlink.loss_pct == 0.5  # link given as cloud->fog


def test_plan_shaping_app_parts_per_backend():
    topo = topology_from_dict(TOPO)
    rate_only = plan_shaping(topo, "kernel-rate+app-delay")["f1"]
    assert rate_only.hop is not None and not rate_only.hop.apply_rate
    app = plan_shaping(topo, "app")["f1"]
    assert app.hop is not None and app.hop.apply_rate
    assert plan_shaping(topo, "app")["e1"].hop is None


def hop(rate=None, delay=0.0, jitter=0.0, loss=0.0, apply_rate=True):
    return HopShape(
        DirShape(rate, delay, jitter, loss), DirShape(None, delay, jitter, loss), apply_rate
    )


def test_app_shaper_round_trip_delay_and_jitter_bounds_seeded():
    s = AppShaper(hop(delay=0.01, jitter=0.002), seed=1)
    waits = [s.delay_for(100, now=0.0) for _ in range(500)]
    assert min(waits) >= 0.016 - 1e-12 and max(waits) <= 0.024 + 1e-12
    assert sum(waits) / len(waits) == pytest.approx(0.02, abs=0.0005)
    s2 = AppShaper(hop(delay=0.01, jitter=0.002), seed=1)
    assert [s2.delay_for(100, now=0.0) for _ in range(500)] == waits


def test_app_shaper_rate_is_a_fifo_pipe():
    s = AppShaper(hop(rate=8e6), seed=0)  # 1 MB/s
    assert s.delay_for(1_000_000, now=0.0) == pytest.approx(1.0)
    # a second message handed over at the same time queues behind the first
    assert s.delay_for(500_000, now=0.0) == pytest.approx(1.5)
    # after the pipe drained, only its own serialisation
    assert s.delay_for(500_000, now=10.0) == pytest.approx(0.5)
    # rate not applied when the kernel does it
    assert AppShaper(hop(rate=8e6, apply_rate=False)).delay_for(1_000_000, now=0.0) == 0.0


def test_app_shaper_loss_model():
    s = AppShaper(hop(delay=0.01, loss=100.0), seed=0)
    # 5 segments, all lost: the first 2 have >= 3 followers (fast retransmit: 1 RTT),
    # the last 3 are tail losses (max(2 RTT, 10ms) + RTT)
    rtt = 0.02
    expected = 2 * rtt + 3 * (2 * rtt + rtt)
    assert s.loss_penalty_s(5 * MSS_BYTES) == pytest.approx(expected)
    assert AppShaper(hop(delay=0.01, loss=0.0)).loss_penalty_s(10**6) == 0.0
    # on average about p x segments are lost
    s = AppShaper(hop(delay=0.001, loss=10.0), seed=3)
    for _ in range(200):
        s.loss_penalty_s(100 * MSS_BYTES)
    assert s.lost_segments / (200 * 100) == pytest.approx(0.10, abs=0.01)


async def test_before_send_sleeps(monkeypatch):
    slept = []

    async def fake_sleep(t):
        slept.append(t)

    monkeypatch.setattr("testbed.net.appshaper.asyncio.sleep", fake_sleep)
    s = AppShaper(hop(delay=0.003), seed=0)
    await s.before_send(10)
    assert slept == [pytest.approx(0.006)]
    assert s.messages == 1 and s.bytes == 10
