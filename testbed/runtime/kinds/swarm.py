"""``swarm``: one Docker Swarm service per node, placed on the hosts the topology names,
links shaped by a per-host agent (see :mod:`testbed.runtime.swarmrun`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

from testbed.runtime.image import ImageMode
from testbed.runtime.interface import RUNTIMES, Runtime, UpRequest

if TYPE_CHECKING:
    from testbed.net.shaping import DirShape, ShapingBackend
    from testbed.runtime.base import RunningTestbed


def _registry() -> str | None:
    from testbed.runtime.swarm import REGISTRY_ENV

    return os.environ.get(REGISTRY_ENV) or None


@RUNTIMES.register("swarm")
@dataclass(frozen=True)
class SwarmRuntime(Runtime):
    """Services on a swarm (run from a manager); kernel shaping on every host where it can."""

    image_mode: ImageMode = "auto"  # how to build the node image (testbed.runtime.image)
    registry: str | None = field(default_factory=_registry)  # push the image here (host:port)

    def __post_init__(self) -> None:
        modes = get_args(ImageMode)
        if self.image_mode not in modes:
            raise ValueError(f"image_mode {self.image_mode!r} is not one of {', '.join(modes)}")

    async def backend(self, requested: ShapingBackend | None) -> ShapingBackend:
        from testbed.net.detect import probe_qdiscs

        if requested is not None:
            return requested
        # the manager's kernel; `testbed doctor` probes every host of the swarm
        return (await probe_qdiscs()).backend("swarm")

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

    def remove(self, run_id: str, tb: RunningTestbed | None) -> str:
        from testbed.runtime.control import forget
        from testbed.runtime.swarmrun import down_swarm

        n_svc, n_net = down_swarm(run_id)
        forget(run_id)
        return f"{run_id}: removed {n_svc} services, {n_net} networks"

    def remove_all(self) -> list[str]:
        from testbed.errors import RuntimeBackendError
        from testbed.runtime.base import LABEL_RUN
        from testbed.runtime.docker import client
        from testbed.runtime.swarmrun import remove_swarm_by_label

        try:
            n_svc, n_net = remove_swarm_by_label(client(), LABEL_RUN)
        except RuntimeBackendError as exc:
            return [f"swarm skipped: {exc}"]
        if n_svc or n_net:
            return [f"removed {n_svc} services and {n_net} networks labelled {LABEL_RUN}"]
        return []

    def present(self, tb: RunningTestbed) -> bool:
        import docker

        from testbed.errors import RuntimeBackendError
        from testbed.runtime.base import LABEL_RUN
        from testbed.runtime.docker import client

        try:
            svcs = client().services.list(filters={"label": f"{LABEL_RUN}={tb.run_id}"})
        except (RuntimeBackendError, docker.errors.APIError):
            return True  # cannot tell: leave it alone
        return bool(svcs)

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
        from testbed.runtime.swarmrun import shape_nodes

        c = await asyncio.to_thread(client)
        mode: ImageMode = "offline" if tb.image and ":offline-" in tb.image else "dockerfile"
        await shape_nodes(c, tb, {node: (down, up)}, python_mounts(mode))

    async def engine_version(self) -> str | None:
        from testbed.runtime.kinds.docker import DockerRuntime

        return await DockerRuntime().engine_version()
