"""``docker``: one container per node on the run's own bridge networks, links shaped in the
kernel from the host where it can (see :mod:`testbed.runtime.docker`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.runtime.interface import RUNTIMES, UpRequest
from testbed.runtime.kinds.engine import EngineRuntime

if TYPE_CHECKING:
    from testbed.net.shaping import DirShape, ShapingBackend
    from testbed.runtime.base import LinkCheck, RunningTestbed
    from testbed.runtime.measure import Tolerance


@RUNTIMES.register("docker")
@dataclass(frozen=True)
class DockerRuntime(EngineRuntime):
    """Containers with CPU quotas and memory limits; kernel shaping (tc) when the host has it."""

    nodes_are: ClassVar[str] = "containers"
    link_nets_are: ClassVar[str] = "link networks"

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

    def remove_labelled(self, c: Any, label_filter: str) -> tuple[int, int]:
        from testbed.runtime.docker import remove_by_label

        return remove_by_label(c, label_filter)

    def list_labelled(self, c: Any, label_filter: str) -> list[Any]:
        return list(c.containers.list(filters={"label": label_filter}))

    async def set_link(
        self,
        tb: RunningTestbed,
        node: str,
        down: DirShape,
        up: DirShape,
        *,
        previous: tuple[DirShape, DirShape] | None = None,
    ) -> None:
        from testbed.runtime.docker_live import set_link_docker

        await set_link_docker(tb, node, down, up, previous)

    async def kill_node(self, tb: RunningTestbed, node: str) -> None:
        from testbed.runtime.docker_live import kill_docker

        await kill_docker(tb, node)

    async def restart_node(
        self, tb: RunningTestbed, node: str, down: DirShape, up: DirShape
    ) -> None:
        from testbed.runtime.docker_live import restart_docker

        await restart_docker(tb, node, down, up)

    async def measure_node_links(self, tb: RunningTestbed, tol: Tolerance) -> list[LinkCheck]:
        from testbed.runtime.docker_links import measure_peer_links

        return await measure_peer_links(tb, tol)

    async def set_cpu(self, tb: RunningTestbed, node: str, cpus: float) -> None:
        from testbed.runtime.docker_live import set_cpu_docker

        await set_cpu_docker(tb, node, cpus)
