"""``docker``: one container per node on the run's own bridge networks, links shaped in the
kernel from the host where it can (see :mod:`testbed.runtime.docker`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from testbed.runtime.image import ImageMode
from testbed.runtime.interface import RUNTIMES, Runtime, UpRequest

if TYPE_CHECKING:
    from testbed.net.shaping import DirShape, ShapingBackend
    from testbed.runtime.base import RunningTestbed


@RUNTIMES.register("docker")
@dataclass(frozen=True)
class DockerRuntime(Runtime):
    """Containers with CPU quotas and memory limits; kernel shaping (tc) when the host has it."""

    image_mode: ImageMode = "auto"  # how to build the node image (testbed.runtime.image)

    def __post_init__(self) -> None:
        modes = get_args(ImageMode)
        if self.image_mode not in modes:
            raise ValueError(f"image_mode {self.image_mode!r} is not one of {', '.join(modes)}")

    async def backend(self, requested: ShapingBackend | None) -> ShapingBackend:
        from testbed.net.detect import probe_qdiscs

        if requested is not None:
            return requested
        support = await probe_qdiscs()
        return support.backend("docker")

    async def up(self, req: UpRequest, backend: ShapingBackend) -> RunningTestbed:
        from testbed.runtime.docker import DockerTestbed

        dt = DockerTestbed(
            req.topology,
            req.topology_path,
            req.plan,
            req.model_dir,
            backend=backend,
            image_mode=self.image_mode,
            seed=req.seed,
            extra_serve_args={k: list(v) for k, v in (req.extra_serve_args or {}).items()},
        )
        return await dt.up(health_timeout_s=req.health_timeout_s)

    def remove(self, run_id: str, tb: RunningTestbed | None) -> str:
        from testbed.runtime.control import forget
        from testbed.runtime.docker import down_sync

        n_ctr, n_net = down_sync(run_id)
        forget(run_id)
        return f"{run_id}: removed {n_ctr} containers, {n_net} networks"

    def remove_all(self) -> list[str]:
        from testbed.errors import RuntimeBackendError
        from testbed.runtime.base import LABEL_RUN
        from testbed.runtime.docker import client, remove_by_label

        try:
            n_ctr, n_net = remove_by_label(client(), LABEL_RUN)
        except RuntimeBackendError as exc:
            return [f"docker skipped: {exc}"]
        if n_ctr or n_net:
            return [f"removed {n_ctr} containers and {n_net} networks labelled {LABEL_RUN}"]
        return []

    def present(self, tb: RunningTestbed) -> bool:
        from testbed.errors import RuntimeBackendError
        from testbed.runtime.base import LABEL_RUN
        from testbed.runtime.docker import client

        try:
            ctrs = client().containers.list(filters={"label": f"{LABEL_RUN}={tb.run_id}"})
        except RuntimeBackendError:
            return True  # cannot tell: leave it alone
        return bool(ctrs)

    async def set_link(
        self,
        tb: RunningTestbed,
        node: str,
        down: DirShape,
        up: DirShape,
        *,
        previous: tuple[DirShape, DirShape] | None = None,
    ) -> None:
        from testbed.runtime.docker import set_link_docker

        await set_link_docker(tb, node, down, up, previous)

    async def kill_node(self, tb: RunningTestbed, node: str) -> None:
        from testbed.runtime.docker import kill_docker

        await kill_docker(tb, node)

    async def restart_node(
        self, tb: RunningTestbed, node: str, down: DirShape, up: DirShape
    ) -> None:
        from testbed.runtime.docker import restart_docker

        await restart_docker(tb, node, down, up)

    async def set_cpu(self, tb: RunningTestbed, node: str, cpus: float) -> None:
        from testbed.runtime.docker import set_cpu_docker

        await set_cpu_docker(tb, node, cpus)

    async def engine_version(self) -> str | None:
        def probe() -> str | None:
            try:
                import docker

                return str(docker.from_env(timeout=10).version().get("Version"))
            except Exception:  # provenance only: no engine = unknown
                return None

        return await asyncio.to_thread(probe)
