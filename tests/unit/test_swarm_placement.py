"""Swarm placement (topology nodes x swarm node descriptions -> constraints) and GPU requests,
without Docker: pure functions over fake nodes."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError, RuntimeBackendError
from testbed.runtime.gpus import (
    GpuAsk,
    docker_device_request,
    gpu_ask,
    swarm_gpu_request,
)
from testbed.runtime.swarm import (
    SwarmNode,
    Wanted,
    parse_engines,
    place,
    wanted_of,
)
from testbed.runtime.swarm_links import network_names, node_networks, task_addresses
from testbed.spec.topology import topology_from_dict
from tests.factories import topology, topology_dict

NODES = [
    SwarmNode("id-mgr", "manager-1", "manager", {"zone": "cloud"}, addr="10.0.0.1"),
    SwarmNode("id-gpu", "gpu-box", "worker", {"zone": "cloud", "testbed.host": "big"}, gpus=2),
    SwarmNode("id-pi1", "pi-1", "worker", {"zone": "edge"}),
    SwarmNode("id-pi2", "pi-2", "worker", {"zone": "edge"}),
    SwarmNode("id-down", "broken", "worker", {"zone": "edge"}, ready=False),
]


def test_hostname_pins_to_that_node_by_id() -> None:
    out = place([Wanted("edge-1", "pi-2", "f")], NODES)
    assert out["edge-1"].constraints == ("node.id==id-pi2",)
    assert out["edge-1"].candidates == ("id-pi2",)


def test_testbed_host_label_pins_too() -> None:
    out = place([Wanted("cloud-1", "big", "f")], NODES)
    assert out["cloud-1"].constraints == ("node.id==id-gpu",)


def test_key_value_label_leaves_the_choice_to_the_engine_among_matches() -> None:
    out = place([Wanted("edge-1", "zone=edge", "f")], NODES)
    assert out["edge-1"].constraints == ("node.labels.zone==edge",)
    # the node that is down is not a candidate (its image need not be copied)
    assert set(out["edge-1"].candidates) == {"id-pi1", "id-pi2"}


def test_unplaced_nodes_may_land_on_any_ready_node() -> None:
    out = place([Wanted("fog-1", None, "f")], NODES)
    assert out["fog-1"].constraints == ()
    assert set(out["fog-1"].candidates) == {"id-mgr", "id-gpu", "id-pi1", "id-pi2"}


def test_unknown_host_is_a_config_error_naming_field_value_and_nodes() -> None:
    with pytest.raises(ConfigError) as exc:
        place([Wanted("edge-1", "pi-9", "tiers[0].nodes[0].host")], NODES)
    msg = str(exc.value)
    assert "tiers[0].nodes[0].host" in msg and "'pi-9'" in msg and "pi-1" in msg


def test_a_node_that_is_down_does_not_match() -> None:
    with pytest.raises(ConfigError, match="broken"):
        place([Wanted("edge-1", "broken", "f")], NODES)


def test_ambiguous_hostname_is_refused() -> None:
    twins = [SwarmNode("a", "same"), SwarmNode("b", "same")]
    with pytest.raises(ConfigError, match="matches 2"):
        place([Wanted("x", "same", "f")], twins)


def test_no_ready_node_at_all() -> None:
    with pytest.raises(RuntimeBackendError):
        place([Wanted("x", None, "f")], [SwarmNode("a", "h", ready=False)])


def test_node_description_from_inspect() -> None:
    attrs = {
        "ID": "n1",
        "Spec": {"Role": "manager", "Availability": "active", "Labels": {"zone": "fog"}},
        "Description": {
            "Hostname": "h1",
            "Resources": {
                "GenericResources": [
                    {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-aaa"}},
                    {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-bbb"}},
                    {"DiscreteResourceSpec": {"Kind": "SSD", "Value": 1}},
                ]
            },
        },
        "Status": {"State": "ready", "Addr": "0.0.0.0"},
        "ManagerStatus": {"Addr": "192.168.1.5:2377"},
    }
    n = SwarmNode.from_attrs(attrs)
    assert (n.hostname, n.role, n.ready, n.addr, n.gpus) == (
        "h1",
        "manager",
        True,
        "192.168.1.5",
        2,
    )
    assert dict(n.labels) == {"zone": "fog"}
    drained = attrs | {"Spec": attrs["Spec"] | {"Availability": "drain"}}
    assert not SwarmNode.from_attrs(drained).ready


def test_topology_host_field_reaches_placement() -> None:
    d = topology_dict(tiers=2, nodes_per_tier=1)
    d["tiers"][0]["nodes"][0]["host"] = "pi-1"
    topo = topology_from_dict(d)
    wanted = wanted_of(topo)
    assert wanted[0] == Wanted("edge-0", "pi-1", "tiers[0].nodes[0].host")
    assert wanted[1].host is None
    assert place(wanted, NODES)["edge-0"].constraints == ("node.id==id-pi1",)
    assert [w.name for w in wanted_of(topo, {"fog-0"})] == ["fog-0"]


def test_networks_one_per_tier_and_per_pair_of_consecutive_stages() -> None:
    from testbed.net.links import PeerLink

    tiers = ["edge", "fog", "cloud"]
    links = [PeerLink("edge", "fog", ("e1", "e2"), ("f1",)),
             PeerLink("fog", "cloud", ("f1",), ("c1",))]  # fmt: skip
    names = [n for n, _ in network_names("tb1", tiers, links)]
    assert names == [
        "tb-tb1-edge",
        "tb-tb1-fog",
        "tb-tb1-cloud",
        "tb-tb1-edge-fog",
        "tb-tb1-fog-cloud",
    ]
    assert node_networks("tb1", "edge", "e1", links) == ["tb-tb1-edge", "tb-tb1-edge-fog"]
    assert node_networks("tb1", "fog", "f1", links) == [
        "tb-tb1-fog",
        "tb-tb1-edge-fog",
        "tb-tb1-fog-cloud",
    ]
    assert node_networks("tb1", "cloud", "c1", links) == ["tb-tb1-cloud", "tb-tb1-fog-cloud"]
    # a tier holding no blocks is skipped: its neighbours share one overlay
    skip = [PeerLink("edge", "cloud", ("e1",), ("c1",))]
    assert [n for n, _ in network_names("tb1", tiers, skip)][3:] == ["tb-tb1-edge-cloud"]
    assert node_networks("tb1", "fog", "f1", skip) == ["tb-tb1-fog"]


def test_task_addresses_read_back_by_network_id() -> None:
    task = {"NetworksAttachments": [
        {"Network": {"ID": "n-tier"}, "Addresses": ["10.214.0.5/24"]},
        {"Network": {"ID": "n-link"}, "Addresses": ["10.214.3.7/24"]},
    ]}  # fmt: skip
    assert task_addresses(task, {"n-link": "tb-tb1-edge-fog"}) == {"tb-tb1-edge-fog": "10.214.3.7"}
    assert task_addresses({}, {"n-link": "x"}) == {}


def test_link_overlays_are_shaped_on_both_ends_inside_the_containers() -> None:
    """The receiver's NIC on the overlay into it sends the return direction (rate too), each
    sender's NIC there the forward direction; one pipe per sender on an overlay."""
    from testbed.net.shaping import DirShape
    from testbed.runtime.base import NodeEndpoint, RunningTestbed
    from testbed.runtime.swarm_links import link_shapes, net_into

    def ep(name: str, j: int, links: dict[str, str], peer: str | None = None) -> NodeEndpoint:
        return NodeEndpoint(name, "t", j, "u", 0, 1, "cpu", "a", 9101,
                            peer_address=peer, link_addresses=links)  # fmt: skip

    ef, fc = "tb-tb1-edge-fog", "tb-tb1-fog-cloud"
    nodes = [
        ep("e1", 0, {ef: "10.0.3.2"}),
        ep("e2", 0, {ef: "10.0.3.3"}),
        ep("f1", 1, {ef: "10.0.3.4", fc: "10.0.4.2"}, "10.0.3.4"),
        ep("c1", 2, {fc: "10.0.4.3"}, "10.0.4.3"),
    ]
    tb = RunningTestbed("tb1", "swarm", "kernel", "t.yaml", "t", "m", {n.name: n for n in nodes})
    assert net_into(tb, "f1") == ef and net_into(tb, "e1") is None
    f_down, f_up = DirShape(50e6, 0.005), DirShape(None, 0.005)
    c_down, c_up = DirShape(20e6, 0.01, 0.001), DirShape(None, 0.01, 0.001)
    got = link_shapes(tb, {"e1": (DirShape(), DirShape()), "f1": (f_down, f_up),
                           "c1": (c_down, c_up)})  # fmt: skip
    assert got == {
        "f1": [("10.0.3.4", DirShape(50e6, 0.005)), ("10.0.4.2", c_down)],
        "e1": [("10.0.3.2", f_down)],
        "e2": [("10.0.3.3", f_down)],
        "c1": [("10.0.4.3", DirShape(20e6, 0.01, 0.001))],
    }
    # a change of one link reshapes the receiver's NIC and its senders' NICs on that overlay
    assert set(link_shapes(tb, {"c1": (c_down, c_up)})) == {"c1", "f1"}


def test_engines_env_parsing() -> None:
    assert parse_engines("a=ssh://root@a, b=tcp://b:2376") == {
        "a": "ssh://root@a",
        "b": "tcp://b:2376",
    }
    assert parse_engines(None) == {}
    with pytest.raises(ConfigError, match="hostname=URL"):
        parse_engines("just-a-host")


# -- GPUs -----------------------------------------------------------------------------------


def test_topology_gpus_field() -> None:
    d = topology_dict(tiers=1, nodes_per_tier=2)
    d["tiers"][0]["nodes"][0]["gpus"] = [0, 2]
    d["tiers"][0]["nodes"][1]["gpus"] = 3
    topo = topology_from_dict(d)
    assert [n.gpus for n in topo.tiers[0].nodes] == [(0, 2), 3]
    assert topology().tiers[0].nodes[0].gpus is None
    for bad in (0, [], [1, 1], [-1]):
        d["tiers"][0]["nodes"][0]["gpus"] = bad
        with pytest.raises(ConfigError, match="gpus"):
            topology_from_dict(d)


def test_docker_device_request_names_ids_or_count_not_all() -> None:
    assert docker_device_request(gpu_ask((0, 2))) == {
        "device_ids": ["0", "2"],
        "capabilities": [["gpu"]],
    }
    assert docker_device_request(gpu_ask(2)) == {"count": 2, "capabilities": [["gpu"]]}
    # no `gpus:` keeps the old meaning on one host: every GPU
    assert docker_device_request(gpu_ask(None)) == {"count": -1, "capabilities": [["gpu"]]}


def test_docker_device_request_builds_a_real_sdk_request() -> None:
    types = pytest.importorskip("docker.types")
    req = types.DeviceRequest(**docker_device_request(GpuAsk(ids=(1,))))
    assert req["DeviceIDs"] == ["1"] and req["Count"] == 0


def test_swarm_request_reserves_generic_resources() -> None:
    r = swarm_gpu_request(gpu_ask((1, 3)))
    assert r.generic_resources == {"NVIDIA-GPU": 2}
    assert r.env["NVIDIA_VISIBLE_DEVICES"] == "1,3"
    r = swarm_gpu_request(gpu_ask(2))
    assert r.generic_resources == {"NVIDIA-GPU": 2}
    assert "NVIDIA_VISIBLE_DEVICES" not in r.env
    assert swarm_gpu_request(gpu_ask(None)).generic_resources == {"NVIDIA-GPU": 1}


def test_swarm_request_builds_real_sdk_resources() -> None:
    types = pytest.importorskip("docker.types")
    res = types.Resources(generic_resources=swarm_gpu_request(gpu_ask(2)).generic_resources)
    assert res["Reservations"]["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}}
    ]


# -- the agent's instructions ----------------------------------------------------------------


def test_shape_plan_round_trips_into_the_builders_shapes() -> None:
    import json

    from testbed.net.shaping import DirShape, Iface, egress_ops
    from testbed.runtime.swarm_agent import shape_plan

    down = DirShape(50e6, 0.005, 0.001, 0.0)
    up = DirShape(None, 0.005, 0.001, 0.0)
    plan = json.loads(shape_plan("tb00000001", "kernel", {"fog-1": (down, up)}))
    assert plan["run"] == "tb00000001" and plan["backend"] == "kernel"
    got = plan["nodes"]["fog-1"]
    assert DirShape(**got["down"]) == down and DirShape(**got["up"]) == up
    ops = egress_ops(Iface(7, "veth0"), DirShape(**got["down"]), "kernel-rate+app-delay")
    assert [op.kind for op in ops] == ["", "htb", "htb"]  # no netem without sch_netem
    # forwarding: the egress shape of the NIC holding each address on a link overlay
    back = DirShape(50e6, 0.005, 0.001, 0.0)
    plan = json.loads(shape_plan("tb1", "kernel", {}, {"fog-1": [("10.214.3.4", back)]}))
    assert plan["nodes"] == {}
    assert [(e["address"], DirShape(**e["shape"])) for e in plan["links"]["fog-1"]] == [
        ("10.214.3.4", back)
    ]
    assert json.loads(shape_plan("tb1", "kernel", {}))["links"] == {}


def test_swarm_runtime_is_registered() -> None:
    from testbed.runtime.interface import RUNTIMES

    assert "swarm" in RUNTIMES.names()
    rt = RUNTIMES.create("swarm", {"image_mode": "offline"})
    assert rt.name == "swarm"
    with pytest.raises(ConfigError):
        RUNTIMES.create("swarm", {"image_mode": "nope"})
