"""What the broker knows about the pipeline (pure): stages, replicas, devices, and predicted work.

A :class:`Layout` lists the active stages in pipeline order (one per tier that holds blocks),
the replicas of each with their stage server URL and device, and the links a hop crosses. It is
built from a plan plus endpoint URLs (tests, in-process stages) or from a running testbed's
state (the block ranges the stage servers really hold).

:class:`WorkPredictor` turns a request's shape into what schedulers need, from the cost model:
per node, the predicted work of the request's stage there (prefill + decode steps, in profile
seconds), split into the prefill and one decode step so the broker can charge progress step by
step; per stage, the KV bytes the request will hold; per hop, the predicted transfer time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from testbed.cost.model import CostModel
from testbed.errors import ConfigError
from testbed.spec.devices import DeviceProfile
from testbed.spec.plan import Plan, RequestShape
from testbed.spec.topology import LinkSpec, Topology

if TYPE_CHECKING:
    from testbed.runtime.base import RunningTestbed


@dataclass(frozen=True)
class NodeInfo:
    name: str
    stage: int  # index of the active stage it serves (0 = first)
    tier: str
    url: str  # stage server base URL reachable from the broker
    device: DeviceProfile
    kv_capacity_bytes: int  # the node's memory minus the weights of its blocks


@dataclass(frozen=True)
class StageInfo:
    index: int  # position in the pipeline (0 = first active stage)
    tier: str
    tier_index: int
    start: int  # first block
    end: int  # one past the last block
    holds_embedding: bool
    holds_head: bool
    nodes: tuple[str, ...]  # replicas, in name order

    @property
    def num_blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    stages: tuple[StageInfo, ...]
    nodes: Mapping[str, NodeInfo]
    hop_links: tuple[tuple[LinkSpec, ...], ...]  # per hop s -> s+1: the links it crosses
    num_blocks: int

    def node_names(self) -> list[str]:
        """All replicas in pipeline order (stage, then name)."""
        return [n for st in self.stages for n in st.nodes]

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "stage": st.index,
                "tier": st.tier,
                "blocks": [st.start, st.end],
                "nodes": {n: self.nodes[n].url for n in st.nodes},
            }
            for st in self.stages
        ]

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        topology: Topology,
        ranges: Mapping[str, tuple[int, int]],
        urls: Mapping[str, str],
        cost: CostModel,
    ) -> Layout:
        """From per-node block ranges (node -> (start, end); nodes without blocks may be left
        out) and their URLs. Every node of a tier must hold the same range."""
        n_blocks = cost.profile.num_blocks
        by_tier: dict[int, list[str]] = {}
        for name, (a, b) in ranges.items():
            if b <= a:
                continue
            try:
                j, _ = topology.node(name)
            except KeyError:
                raise ConfigError(
                    f"node {name!r} is not in topology {topology.name!r}; is the running testbed "
                    "from another topology? (`testbed status`, or replay with --up)"
                ) from None
            by_tier.setdefault(j, []).append(name)
        if not by_tier:
            raise ConfigError("no node holds any block; nothing to replay against")
        stages: list[StageInfo] = []
        nodes: dict[str, NodeInfo] = {}
        expected_start = 0
        for s, j in enumerate(sorted(by_tier)):
            names = sorted(by_tier[j])
            spans = {ranges[n] for n in names}
            if len(spans) != 1:
                raise ConfigError(
                    f"tier {topology.tiers[j].name!r}: replicas hold different block ranges "
                    f"{sorted(spans)}; every replica of a stage must hold the same blocks"
                )
            a, b = spans.pop()
            if a != expected_start:
                raise ConfigError(
                    f"tier {topology.tiers[j].name!r} starts at block {a}, expected {expected_start}: "
                    "the stages do not cover the model contiguously"
                )
            expected_start = b
            stages.append(
                StageInfo(
                    s,
                    topology.tiers[j].name,
                    j,
                    a,
                    b,
                    holds_embedding=a == 0,
                    holds_head=b == n_blocks,
                    nodes=tuple(names),
                )
            )
            weights = (b - a) * cost.profile.block_weight_bytes()
            weights += cost.profile.embed_weight_bytes() if a == 0 else 0
            weights += cost.profile.head_weight_bytes() if b == n_blocks else 0
            for name in names:
                if name not in urls:
                    raise ConfigError(f"no stage server URL for node {name!r}")
                _, node = topology.node(name)
                nodes[name] = NodeInfo(
                    name,
                    s,
                    topology.tiers[j].name,
                    urls[name].rstrip("/"),
                    node.device,
                    max(0, int(node.device.mem) - weights),
                )
        if expected_start != n_blocks:
            raise ConfigError(
                f"the stages hold blocks 0..{expected_start - 1} of {n_blocks}; the model is not covered"
            )
        hops = []
        for s in range(len(stages) - 1):
            links = []
            for j in range(stages[s].tier_index, stages[s + 1].tier_index):
                link = topology.uplink(j)
                if link is not None:
                    links.append(link)
            hops.append(tuple(links))
        return cls(tuple(stages), nodes, tuple(hops), n_blocks)

    @classmethod
    def from_plan(
        cls, plan: Plan, topology: Topology, urls: Mapping[str, str], cost: CostModel
    ) -> Layout:
        ranges = {n: (st.start, st.end) for st in plan.active_stages() for n in st.nodes}
        return cls.build(topology, ranges, urls, cost)

    @classmethod
    def from_running(cls, tb: RunningTestbed, topology: Topology, cost: CostModel) -> Layout:
        nodes = tb.stage_nodes()
        if tb.nodes and nodes and max(n.end for n in nodes) != cost.profile.num_blocks:
            raise ConfigError(
                f"the running testbed {tb.run_id} serves {max(n.end for n in nodes)} blocks but the "
                f"scenario's model has {cost.profile.num_blocks}; replay with --up, or `testbed up` "
                "the scenario's model"
            )
        return cls.build(
            topology,
            {n.name: (n.start, n.end) for n in nodes},
            {n.name: n.url for n in nodes},
            cost,
        )


@dataclass(frozen=True)
class Prediction:
    """Predicted costs of one request shape (profile seconds; bytes)."""

    work_s: Mapping[str, float]  # node -> whole request's work of its stage on that node
    prefill_s: Mapping[str, float]  # node -> the prefill part
    decode_step_s: Mapping[str, float]  # node -> one decode step (mean context)
    kv_bytes: tuple[int, ...]  # per stage
    hop_s: tuple[float, ...]  # per hop: occupancy + delay for this request


@dataclass
class WorkPredictor:
    """Cost-model predictions per request shape, cached (trace lengths repeat)."""

    layout: Layout
    cost: CostModel
    cache_size: int = 4096
    _predict: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._predict = lru_cache(maxsize=self.cache_size)(self._compute)

    def predict(self, prompt_tokens: int, output_tokens: int) -> Prediction:
        return self._predict(int(prompt_tokens), int(output_tokens))  # type: ignore[operator]

    def _segment_s(self, stage: StageInfo, device: DeviceProfile, shape: RequestShape) -> float:
        c = self.cost
        t = float(c.block_request_times(device, shape)[stage.start : stage.end].sum())
        if stage.holds_embedding:
            t += c.embed_request_s(device, shape)
        if stage.holds_head:
            t += c.head_request_s(device, shape)
        return t

    def _compute(self, prompt_tokens: int, output_tokens: int) -> Prediction:
        p, o = max(prompt_tokens, 1), max(output_tokens, 1)
        whole = RequestShape(prompt_tokens=p, output_tokens=o, concurrency=1)
        first = RequestShape(prompt_tokens=p, output_tokens=1, concurrency=1)
        work: dict[str, float] = {}
        pre: dict[str, float] = {}
        dec: dict[str, float] = {}
        seen: dict[tuple[int, DeviceProfile], tuple[float, float]] = {}  # replicas of one device
        for st in self.layout.stages:
            for name in st.nodes:
                dev = self.layout.nodes[name].device
                hit = seen.get((st.index, dev))
                if hit is None:
                    total = self._segment_s(st, dev, whole)
                    hit = seen[(st.index, dev)] = (
                        total,
                        min(self._segment_s(st, dev, first), total),
                    )
                total, prefill = hit
                work[name] = total
                pre[name] = prefill
                dec[name] = (total - prefill) / (o - 1) if o > 1 else 0.0
        kv = tuple(self.cost.request_kv_bytes(st.num_blocks, p, o) for st in self.layout.stages)
        hops = tuple(
            sum(sum(self.cost.hop_request_s(link, whole)) for link in links)
            for links in self.layout.hop_links
        )
        return Prediction(work, pre, dec, kv, hops)
