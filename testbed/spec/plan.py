"""A partition plan: one contiguous block range per tier and the nodes that hold it (pure data)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from testbed.spec.quantities import MAX_TOKENS, StrictInt


class StagePlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tier: str
    tier_index: int
    start: int  # first block held
    end: int  # one past the last block held; start == end: the tier holds nothing
    nodes: tuple[str, ...]  # replicas: the tier's nodes whose memory fits the range
    holds_embedding: bool
    holds_head: bool
    compute_s: float  # predicted compute per reference request on the fastest replica
    node_compute_s: dict[str, float]  # the same for every replica
    transfer_s: float  # link occupancy to ship this stage's output onward per request (0 if last)
    link_delay_s: float  # one-way delays paid per request on that hop (latency, not occupancy)
    mem_bytes: int  # weights (+ embedding/head) + KV reservation
    mem_available_bytes: int  # the largest replica's memory

    @property
    def empty(self) -> bool:
        return self.start == self.end

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def cost_s(self) -> float:
        return self.compute_s + self.transfer_s


MAX_CONCURRENCY = 65_536


class RequestShape(BaseModel):
    """The reference request a plan is optimised for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: StrictInt = Field(default=512, ge=1, le=MAX_TOKENS)
    output_tokens: StrictInt = Field(default=128, ge=1, le=MAX_TOKENS)
    # requests whose KV caches each stage must hold at once
    concurrency: StrictInt = Field(default=4, ge=1, le=MAX_CONCURRENCY)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    topology: str
    model: str
    dtype: str
    num_blocks: int
    partitioner: dict[str, Any]  # name + parameters
    shape: RequestShape
    cost_source: str  # "roofline" or "measured:<file>"
    include_transfer: bool
    cuts: tuple[int, ...]
    stages: tuple[StagePlan, ...]  # one per tier, in tier order
    bottleneck_s: float  # max stage cost as the partitioner saw it
    bottleneck_tier: str

    def active_stages(self) -> tuple[StagePlan, ...]:
        """Stages that hold blocks, in pipeline order (a request's route visits these)."""
        return tuple(s for s in self.stages if not s.empty)

    def stage_of_node(self, node: str) -> StagePlan | None:
        for s in self.active_stages():
            if node in s.nodes:
                return s
        return None
