"""What the engine runtimes' bring-ups share (:class:`EngineBringUp`): the run's inputs and id,
and ``up``'s contract: the state file first (so ``testbed clean`` finds a run that dies midway),
then the runtime's own steps, and on any failure or cancellation everything of the run removed
before the error goes on."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from testbed.runtime import owner
from testbed.runtime.base import PROBE_PORT, NodeEndpoint, RunningTestbed, new_run_id
from testbed.runtime.image import ImageMode

if TYPE_CHECKING:
    from testbed.net.links import NodeShaping
    from testbed.net.shaping import ShapingBackend
    from testbed.spec.plan import Plan, StagePlan
    from testbed.spec.topology import Node, Tier, Topology


def log_up(msg: str) -> None:
    print(f"[up] {msg}", file=sys.stderr, flush=True)


class EngineBringUp(ABC):
    """Brings a plan up; ``up`` returns the RunningTestbed (state saved)."""

    runtime: ClassVar[str]  # the runtime's registered name, recorded in the state

    def __init__(
        self,
        topology: Topology,
        topology_path: str,
        plan: Plan,
        model_dir: Path,
        *,
        backend: ShapingBackend,
        image_mode: ImageMode = "auto",
        seed: int = 0,
    ) -> None:
        self.topology = topology
        self.topology_path = topology_path
        self.plan = plan
        self.model_dir = model_dir.resolve()
        self.backend = backend
        self.image_mode = image_mode
        self.seed = seed
        self.run_id = new_run_id()

    async def up(self, *, health_timeout_s: float = 180.0) -> RunningTestbed:
        tb = RunningTestbed(
            self.run_id,
            self.runtime,
            self.backend,
            self.topology_path,
            self.topology.name,
            str(self.model_dir),
            {},
            seed=self.seed,
            owner=owner.me(),
        )
        await asyncio.to_thread(tb.save)
        try:
            await self._up(tb, health_timeout_s)
        except BaseException:
            tb.status = "failed"
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.to_thread(tb.save))
            log_up(f"up failed: removing everything of {self.run_id}")
            await asyncio.shield(asyncio.to_thread(self.remove_run))
            with contextlib.suppress(OSError):
                tb.state_path.unlink()
            raise
        return tb

    @abstractmethod
    async def _up(self, tb: RunningTestbed, health_timeout_s: float) -> None:
        """The runtime's steps; they record what they create in ``tb`` as they go."""

    @abstractmethod
    def remove_run(self) -> None:
        """Blocking: remove everything labelled with this run's id."""


def node_endpoint(
    run_id: str,
    tier: Tier,
    tier_index: int,
    node: Node,
    stage: StagePlan,
    shape: NodeShaping,
    *,
    device: str,
    address: str = "",
    url: str = "",
) -> NodeEndpoint:
    """A planned node's endpoint as the engine runtimes record it (container ``tb-<run>-<node>``,
    the stage and probe ports inside it, its device's CPUs and memory, its feeding link);
    ``address``/``url`` empty until the runtime knows them."""
    dev = node.device
    return NodeEndpoint(
        name=node.name,
        tier=tier.name,
        tier_index=tier_index,
        url=url,
        start=stage.start,
        end=stage.end,
        device=device,
        address=address,
        probe_port=PROBE_PORT,
        cpus=dev.cpus,
        mem_limit_bytes=dev.container_mem_limit,
        container=f"tb-{run_id}-{node.name}",
        max_batch=node.max_batch,
        link=shape.link,
        link_rtt_s=shape.configured_rtt_s,
        link_rate_bps=shape.configured_rate_bps,
        hop=shape.hop,
    )
