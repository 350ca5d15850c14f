"""``swarm``: one Docker Swarm service per node, placed on the hosts the topology names,
links shaped by a per-host agent (see :mod:`testbed.runtime.swarmrun`); stages forward to
each other over shaped link overlays (:mod:`testbed.runtime.swarm_links`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.runtime.image import ImageMode
from testbed.runtime.interface import RUNTIMES, UpRequest
from testbed.runtime.kinds.engine import EngineRuntime

if TYPE_CHECKING:
    from testbed.net.shaping import DirShape, ShapingBackend
    from testbed.runtime.base import LinkCheck, RunningTestbed
    from testbed.runtime.measure import Tolerance


def _registry() -> str | None:
    from testbed.runtime.swarm import REGISTRY_ENV

    return os.environ.get(REGISTRY_ENV) or None


@RUNTIMES.register("swarm")
@dataclass(frozen=True)
class SwarmRuntime(EngineRuntime):
    """Services on a swarm (run from a manager); kernel shaping on every host where it can."""

    registry: str | None = field(default_factory=_registry)  # push the image here (host:port)
    nodes_are: ClassVar[str] = "services"
    link_nets_are: ClassVar[str] = "shaped link overlays"

    async def up(self, req: UpRequest, backend: ShapingBackend) -> RunningTestbed:
        from testbed.runtime.swarmrun import SwarmTestbed

        st = SwarmTestbed(
            req.topology,
            req.topology_path,
            req.plan,
            req.model_dir,
            backend=backend,
            image_mode=self.image_mode,
            registry=self.registry,
            seed=req.seed,
        )
        return await st.up(health_timeout_s=req.health_timeout_s)

    def remove_labelled(self, c: Any, label_filter: str) -> tuple[int, int]:
        from testbed.runtime.swarmrun import remove_swarm_by_label

        return remove_swarm_by_label(c, label_filter)

    def list_labelled(self, c: Any, label_filter: str) -> list[Any]:
        return list(c.services.list(filters={"label": label_filter}))

    async def measure_node_links(self, tb: RunningTestbed, tol: Tolerance) -> list[LinkCheck]:
        from testbed.runtime.docker_links import measure_peer_links
        from testbed.runtime.swarm_links import exec_in_task

        async def exec_in(node: str, argv: list[str]) -> dict[str, Any]:
            return await exec_in_task(tb, node, argv)

        return await measure_peer_links(tb, tol, exec_in=exec_in)

    async def set_link(
        self,
        tb: RunningTestbed,
        node: str,
        down: DirShape,
        up: DirShape,
        *,
        previous: tuple[DirShape, DirShape] | None = None,  # the agent re-applies every field
    ) -> None:
        import asyncio

        from testbed.runtime.docker import client
        from testbed.runtime.image import python_mounts
        from testbed.runtime.swarm_links import link_shapes
        from testbed.runtime.swarmrun import shape_nodes

        c = await asyncio.to_thread(client)
        mode: ImageMode = "offline" if tb.image and ":offline-" in tb.image else "dockerfile"
        shapes = {node: (down, up)}
        await shape_nodes(c, tb, shapes, python_mounts(mode), link_shapes(tb, shapes))
