"""What the two Docker-engine runtimes (``docker``, ``swarm``) share: the image option, the
shaping backend probe, removal by the run's label and the engine's version. Each says what
its nodes are (containers or services) and how to remove and list them; not registered."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, get_args

from testbed.runtime.image import ImageMode
from testbed.runtime.interface import Runtime

if TYPE_CHECKING:
    from testbed.net.shaping import ShapingBackend
    from testbed.runtime.base import RunningTestbed


@dataclass(frozen=True)
class EngineRuntime(Runtime):
    image_mode: ImageMode = "auto"  # how to build the node image (testbed.runtime.image)

    nodes_are: ClassVar[str]  # "containers" | "services", for what `remove` reports
    link_nets_are: ClassVar[str]  # what joins consecutive stages' nodes, for forward_refusal

    def __post_init__(self) -> None:
        modes = get_args(ImageMode)
        if self.image_mode not in modes:
            raise ValueError(f"image_mode {self.image_mode!r} is not one of {', '.join(modes)}")

    async def backend(self, requested: ShapingBackend | None) -> ShapingBackend:
        from testbed.net.detect import probe_qdiscs

        if requested is not None:
            return requested
        # this host's kernel (`testbed doctor` probes every host of a swarm)
        return (await probe_qdiscs()).backend(self.name)

    @abstractmethod
    def remove_labelled(self, c: Any, label_filter: str) -> tuple[int, int]:
        """Blocking: remove the nodes, then the networks, matching a label filter: counts."""

    @abstractmethod
    def list_labelled(self, c: Any, label_filter: str) -> list[Any]:
        """Blocking: the run's nodes the engine still has (raises when it cannot tell)."""

    def remove(self, run_id: str, tb: RunningTestbed | None) -> str:
        from testbed.runtime.base import LABEL_RUN
        from testbed.runtime.control import forget
        from testbed.runtime.docker import client

        n_nodes, n_net = self.remove_labelled(client(), f"{LABEL_RUN}={run_id}")
        forget(run_id)
        return f"{run_id}: removed {n_nodes} {self.nodes_are}, {n_net} networks"

    def remove_all(self) -> list[str]:
        from testbed.errors import RuntimeBackendError
        from testbed.runtime.base import LABEL_RUN
        from testbed.runtime.docker import client

        try:
            n_nodes, n_net = self.remove_labelled(client(), LABEL_RUN)
        except RuntimeBackendError as exc:
            return [f"{self.name} skipped: {exc}"]
        if n_nodes or n_net:
            return [f"removed {n_nodes} {self.nodes_are} and {n_net} networks labelled {LABEL_RUN}"]
        return []

    def forward_refusal(self, tb: RunningTestbed) -> str | None:
        """Stages forward over the link networks `up` made between consecutive stages; a run
        brought up without them (an older version) cannot."""
        stages = tb.stage_nodes()
        first = stages[0].tier_index if stages else 0
        if stages and all(n.peer_url for n in stages if n.tier_index > first):
            return None
        return (
            f"run {tb.run_id} has no {self.link_nets_are} between its stages (brought up by "
            "an older version); bring it up again"
        )

    def present(self, tb: RunningTestbed) -> bool:
        import docker

        from testbed.errors import RuntimeBackendError
        from testbed.runtime.base import LABEL_RUN
        from testbed.runtime.docker import client

        try:
            return bool(self.list_labelled(client(), f"{LABEL_RUN}={tb.run_id}"))
        except (RuntimeBackendError, docker.errors.APIError):
            return True  # cannot tell: leave it alone

    async def engine_version(self) -> str | None:
        def probe() -> str | None:
            try:
                import docker

                return str(docker.from_env(timeout=10).version().get("Version"))
            except Exception:  # provenance only: no engine = unknown
                return None

        return await asyncio.to_thread(probe)
