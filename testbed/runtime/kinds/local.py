"""``local``: every node a local process on loopback; all shaping in the app (no root)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from testbed.runtime.interface import RUNTIMES, Runtime, UpRequest
from testbed.runtime.processes import is_testbed_process, pid_alive

if TYPE_CHECKING:
    from testbed.net.shaping import DirShape, ShapingBackend
    from testbed.runtime.base import RunningTestbed


@RUNTIMES.register("local")
@dataclass(frozen=True)
class LocalRuntime(Runtime):
    """Local processes on loopback; app-level shaping; no CPU or memory limits."""

    async def backend(self, requested: ShapingBackend | None) -> ShapingBackend:
        from testbed.errors import ConfigError

        if requested not in (None, "app"):
            raise ConfigError(
                f"the local runtime shapes in the app only, not {requested!r}", field="--backend"
            )
        return "app"

    async def up(self, req: UpRequest, backend: ShapingBackend) -> RunningTestbed:
        from testbed.runtime.localrun import up_local

        return await up_local(req)

    def remove(self, run_id: str, tb: RunningTestbed | None) -> str:
        from testbed.runtime.localrun import remove_local

        return remove_local(run_id, tb)

    async def set_link(self, tb: RunningTestbed, node: str, down: DirShape, up: DirShape) -> None:
        """Nothing in the kernel: the hop hooks carry the whole link here."""

    def present(self, tb: RunningTestbed) -> bool:
        return any(pid_alive(p) and is_testbed_process(p) for p in tb.pids())
