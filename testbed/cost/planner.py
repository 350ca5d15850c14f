"""Topology + model profile + partitioner -> Plan.

Each tier is reduced to one effective node for the partitioner (the paper's choice: its
strongest node, i.e. the one with the lowest predicted time for the whole model), while the
tier's memory is that of its largest node. Once the cut is chosen, every node of the tier whose
memory fits the range becomes a replica, and the plan reports the predicted compute on each.
Embedding cost/memory is folded into block 0 and head cost/memory into block N-1: whichever
tier holds those blocks runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from testbed.cost.model import CostModel
from testbed.partition.base import Partitioner, PartitionProblem, split_cost
from testbed.spec.devices import DeviceProfile
from testbed.spec.plan import Plan, RequestShape, StagePlan
from testbed.spec.topology import Topology

TOKEN_ID_BYTES = 4  # the user's prompt enters as int32 token ids (for the input's transfer time)
NodeBlockFn = Callable[[str, RequestShape], float | None]  # node, shape -> s per block, or None


def _node_block_times(
    cost: CostModel,
    device: DeviceProfile,
    shape: RequestShape,
    node: str = "",
    node_block_s: NodeBlockFn | None = None,
    node_speed: Mapping[str, float] | None = None,
) -> np.ndarray:
    measured = node_block_s(node, shape) if node_block_s is not None else None
    if measured is not None:  # a calibrated node: its fitted time, embedding and head included
        t = np.full(cost.profile.num_blocks, measured)
    else:
        t = cost.block_request_times(device, shape).copy()
        t[0] += cost.embed_request_s(device, shape)
        t[-1] += cost.head_request_s(device, shape)
    speed = 1.0 if node_speed is None else float(node_speed.get(node, 1.0))
    return t if speed == 1.0 else t / speed


def build_problem(
    topology: Topology,
    cost: CostModel,
    shape: RequestShape,
    node_block_s: NodeBlockFn | None = None,
    node_speed: Mapping[str, float] | None = None,
) -> tuple[PartitionProblem, list[str]]:
    """The partitioning instance (T x N arrays) and, per tier, the name of its effective node.
    ``node_speed`` (node -> x its predicted speed, e.g. measured; 1 if absent) divides the
    nodes' block times."""
    n = cost.profile.num_blocks
    t = len(topology.tiers)
    stage_time = np.zeros((t, n))
    tier_mem = np.zeros(t)
    effective: list[str] = []
    for j, tier in enumerate(topology.tiers):
        best_name, best_times = "", None
        for node in tier.nodes:
            times = _node_block_times(cost, node.device, shape, node.name, node_block_s, node_speed)
            if (
                best_times is None
                or times.sum() < best_times.sum()
                or (times.sum() == best_times.sum() and node.name < best_name)
            ):
                best_name, best_times = node.name, times
        assert best_times is not None
        stage_time[j] = best_times
        tier_mem[j] = max(node.device.mem for node in tier.nodes)
        effective.append(best_name)
    layer_mem = cost.block_mem_bytes(shape).copy()
    layer_mem[0] += cost.profile.embed_weight_bytes()
    layer_mem[-1] += cost.profile.head_weight_bytes()
    transfer = np.zeros((t, n))
    hop_delay = np.zeros(t)
    input_time = np.zeros(t)
    input_bits = TOKEN_ID_BYTES * shape.prompt_tokens * 8
    first_lan = topology.tiers[0].lan  # the user sits at the first tier, behind its LAN
    input_time[0] = input_bits / first_lan.bandwidth_bps + first_lan.delay_s
    for j in range(t - 1):
        link = topology.uplink(j)
        assert link is not None
        # occupancy (limits the rate; bsdp's transfer term) and delay (latency only: it drops
        # out of the bottleneck, but HEFT and min_latency count it)
        transfer[j, :], hop_delay[j] = cost.hop_request_s(link, shape)
        input_time[j + 1] = input_time[j] + input_bits / link.bandwidth_bps + link.delay_s
    problem = PartitionProblem.from_arrays(
        stage_time,
        layer_mem,
        tier_mem,
        transfer,
        topology.tier_names,
        hop_delay=hop_delay,
        input_time=input_time,
    )
    return problem, effective


def make_plan(
    topology: Topology,
    cost: CostModel,
    partitioner: Partitioner,
    shape: RequestShape | None = None,
    *,
    node_block_s: NodeBlockFn | None = None,
    node_speed: Mapping[str, float] | None = None,
) -> Plan:
    """Run ``partitioner`` on the topology and describe the result per tier. ``node_block_s``
    (from a calibrated profile) replaces the cost model's per-block time for the nodes it knows;
    ``node_speed`` divides a node's times (see :func:`build_problem`)."""
    shape = shape or RequestShape()
    problem, _ = build_problem(topology, cost, shape, node_block_s, node_speed)
    split = partitioner.split(problem)
    include_transfer = bool(getattr(partitioner, "include_transfer", True))
    costs = split_cost(problem, split.cuts, include_transfer)
    n = problem.num_blocks
    stages = []
    for j, tier in enumerate(topology.tiers):
        a, b = split.cuts[j], split.cuts[j + 1]
        mem = int(problem.layer_mem[a:b].sum())
        fits = [node for node in tier.nodes if node.device.mem >= mem] if b > a else []
        node_compute = {
            node.name: float(
                _node_block_times(cost, node.device, shape, node.name, node_block_s, node_speed)[
                    a:b
                ].sum()
            )
            for node in fits
        }
        ships = problem.transfer_time is not None and a < b < n
        transfer = float(problem.transfer_time[j, b - 1]) if ships else 0.0  # type: ignore[index]
        uplink = topology.uplink(j)
        delay = cost.hop_request_s(uplink, shape)[1] if (ships and uplink is not None) else 0.0
        stages.append(
            StagePlan(
                tier=tier.name,
                tier_index=j,
                start=a,
                end=b,
                nodes=tuple(node.name for node in fits),
                holds_embedding=a == 0 < b,
                holds_head=a < b == n,
                compute_s=min(node_compute.values()) if node_compute else 0.0,
                node_compute_s=node_compute,
                transfer_s=transfer,
                link_delay_s=delay,
                mem_bytes=mem,
                mem_available_bytes=max(node.device.mem for node in tier.nodes),
            )
        )
    worst = int(np.argmax(costs))
    return Plan(
        topology=topology.name,
        model=cost.profile.arch.name,
        dtype=cost.profile.dtype,
        num_blocks=n,
        partitioner=partitioner.describe(),
        shape=shape,
        cost_source=cost.source,
        include_transfer=include_transfer,
        cuts=tuple(int(c) for c in split.cuts),
        stages=tuple(stages),
        bottleneck_s=float(split.bottleneck),
        bottleneck_tier=topology.tiers[worst].name,
    )
