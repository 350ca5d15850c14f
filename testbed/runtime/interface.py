"""The runtime interface: what every way of running nodes (local processes, Docker, ...) offers.

A runtime is one file under :mod:`testbed.runtime.kinds`: a dataclass whose fields are its
options, registered by name with ``@RUNTIMES.register("name")`` (Mininet's node classes chosen
by name). Callers pick one with ``RUNTIMES.create(name, options)`` and never compare names.
A running testbed records its runtime's name; :func:`runtime_of` gives the object back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from testbed.errors import RuntimeBackendError
from testbed.registry import Registry

if TYPE_CHECKING:
    from testbed.net.shaping import DirShape, ShapingBackend
    from testbed.runtime.base import LinkCheck, RunningTestbed
    from testbed.runtime.measure import Tolerance
    from testbed.spec.plan import Plan
    from testbed.spec.topology import Topology


@dataclass(frozen=True)
class UpRequest:
    """What to bring up: a plan of a topology over a model's weights."""

    topology: Topology
    topology_path: str
    plan: Plan
    model_dir: Path
    seed: int = 0  # seed of the app shaper's jitter and loss
    health_timeout_s: float = 180.0
    backend: ShapingBackend | None = None  # None: the best the host supports for this runtime
    # node -> extra `stage serve` flags (emulated devices: testbed.emulation.plumbing)
    extra_serve_args: Mapping[str, Sequence[str]] | None = None


class Runtime(ABC):
    """Brings a plan up as nodes on shaped links and takes it down again."""

    name: ClassVar[str]  # set by RUNTIMES.register

    @abstractmethod
    async def backend(self, requested: ShapingBackend | None) -> ShapingBackend:
        """The shaping backend to use (``requested`` if given and possible)."""

    @abstractmethod
    async def up(self, req: UpRequest, backend: ShapingBackend) -> RunningTestbed:
        """Start every planned node, shape its links, wait until all are healthy, save the
        state file (before the first node starts, so `clean` finds a run that dies midway).
        On failure or cancellation, remove what was started and raise."""

    @abstractmethod
    def remove(self, run_id: str, tb: RunningTestbed | None) -> str:
        """Blocking: stop and remove the run's nodes (``tb`` is None when its state file is
        gone). Safe to repeat. Returns what was removed, for the user."""

    def remove_all(self) -> list[str]:
        """Blocking: remove every object of this runtime labelled as the testbed's, whoever
        owns it (`testbed clean --all`)."""
        return []

    def present(self, tb: RunningTestbed) -> bool:
        """Blocking: does any node of ``tb`` still exist (a process, a container)?"""
        return True

    @abstractmethod
    async def set_link(
        self,
        tb: RunningTestbed,
        node: str,
        down: DirShape,
        up: DirShape,
        *,
        previous: tuple[DirShape, DirShape] | None = None,
    ) -> None:
        """Apply the kernel part of a changed link into ``node`` (app parts are the hooks').
        ``previous`` (down, up): what is applied now, so that a change of values is made in
        place (the same qdiscs changed, no queue dropped, no connection reset)."""

    async def set_cpu(self, tb: RunningTestbed, node: str, cpus: float) -> None:
        raise RuntimeBackendError(
            f"changing a node's CPU needs a runtime with CPU quotas; {self.name} has none"
        )

    async def set_speed(self, tb: RunningTestbed, node: str, speed: float) -> None:
        """Run ``node`` at ``speed`` x its own compute (a timeline slowdown): by default its
        CPU quota scaled (the topology's cpus, or 1 CPU when it names none)."""
        ep = tb.nodes[node]
        base = ep.base_cpus or ep.cpus or 1.0
        await self.set_cpu(tb, node, base * speed)
        ep.base_cpus, ep.cpus = base, base * speed

    async def kill_node(self, tb: RunningTestbed, node: str) -> None:
        """A crash: the node's stage server dies at once (no clean shutdown)."""
        raise RuntimeBackendError(f"the {self.name} runtime cannot crash a node")

    async def restart_node(
        self, tb: RunningTestbed, node: str, down: DirShape, up: DirShape
    ) -> None:
        """Start a crashed node again at the same address, loading its blocks, with the kernel
        part of its link as ``down``/``up`` (the link as it is now); returns once it runs, not
        once it is healthy (the broker re-admits it when its health check answers)."""
        raise RuntimeBackendError(f"the {self.name} runtime cannot restart a node")

    async def engine_version(self) -> str | None:
        """Version of the engine under the nodes, for provenance (None: none or unknown)."""
        return None

    def forward_refusal(self, tb: RunningTestbed) -> str | None:
        """Why ``tb``'s stages cannot send to each other (``transport: forward``); None when
        they can."""
        return (
            f"the {self.name} runtime puts each tier on its own network with no route between tiers"
        )

    async def measure_node_links(self, tb: RunningTestbed, tol: Tolerance) -> list[LinkCheck]:
        """The node-to-node links forwarding uses, measured from a sending node (none when
        they are the host-to-node paths already measured)."""
        return []


RUNTIMES: Registry[Runtime] = Registry("runtime", "testbed.runtime.kinds")


def runtime_of(tb: RunningTestbed) -> Runtime:
    """The runtime that runs ``tb`` (default options: what was recorded is enough to act)."""
    return RUNTIMES.create(tb.runtime, field="runtime")
