"""``local``: every node a local process on loopback; all shaping in the app (no root)."""

from __future__ import annotations

import asyncio
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

    async def set_link(
        self,
        tb: RunningTestbed,
        node: str,
        down: DirShape,
        up: DirShape,
        *,
        previous: tuple[DirShape, DirShape] | None = None,
    ) -> None:
        """Nothing in the kernel: the hop hooks carry the whole link here."""

    async def set_speed(self, tb: RunningTestbed, node: str, speed: float) -> None:
        """No CPU quotas here: the node's process is duty-cycled (SIGSTOP/SIGCONT) to run
        ``speed`` of each 100 ms period, as a cgroup quota throttles a container."""
        from testbed.runtime.localrun import throttle

        await asyncio.to_thread(throttle, tb, node, speed)

    async def kill_node(self, tb: RunningTestbed, node: str) -> None:
        from testbed.runtime.localrun import kill_local_node

        await asyncio.to_thread(kill_local_node, tb, node)

    async def restart_node(
        self, tb: RunningTestbed, node: str, down: DirShape, up: DirShape
    ) -> None:
        from testbed.runtime.localrun import restart_local_node

        await restart_local_node(tb, node)

    def forward_refusal(self, tb: RunningTestbed) -> str | None:
        return None  # every node listens on 127.0.0.1: stages reach each other at their URLs

    def present(self, tb: RunningTestbed) -> bool:
        return any(pid_alive(p) and is_testbed_process(p) for p in tb.pids())
