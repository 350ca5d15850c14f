"""Load another plan's block ranges into a running testbed, for every runtime.

Each node's stage server takes its new range through ``POST /load`` (see
:mod:`testbed.stage.reload`), the same HTTP call whatever runs it (local process, container,
swarm task): no node is stopped or started, so links, addresses and shaping stay as they are.
Running nodes that the new plan leaves out are *parked*: they keep their blocks and serve
nothing (``RunningTestbed.stage_nodes`` skips them), and a later plan may load a range into
them again. The state file records the new ranges, so ``testbed status``, a later replay and
``compare``'s reuse check see what the servers hold.

What it cannot do: start a node the testbed does not run (bring a testbed up with that plan
instead), or change a node's launch command (a Docker node restarted by a timeline event comes
back with the range it was started with; ``compare`` therefore does not reuse a testbed across
plans when the scenario's timeline restarts nodes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from testbed.errors import ConfigError, RuntimeBackendError
from testbed.runtime.base import RunningTestbed


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_ranges` changed."""

    loaded: dict[str, tuple[int, int]]  # node -> the range it loaded (changed nodes only)
    parked: tuple[str, ...]  # nodes left out of the new plan
    seconds: float  # wall time of the whole change

    def describe(self) -> str:
        moved = ", ".join(f"{n} {a}:{b}" for n, (a, b) in sorted(self.loaded.items())) or "none"
        parked = f"; parked {', '.join(self.parked)}" if self.parked else ""
        return f"loaded {moved}{parked} in {self.seconds:.1f}s"


def missing_nodes(tb: RunningTestbed, ranges: Mapping[str, tuple[int, int]]) -> list[str]:
    """Nodes of ``ranges`` that ``tb`` does not run (a reload cannot start them)."""
    return sorted(n for n in ranges if n not in tb.nodes)


async def _post_load(session: aiohttp.ClientSession, node: str, url: str, a: int, b: int) -> Any:
    try:
        async with session.post(url + "/load", json={"start": a, "end": b}) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {"error": (await resp.text())[:300]}
            if resp.status != 200:
                why = body.get("error") if isinstance(body, dict) else body
                raise RuntimeBackendError(
                    f"{node}: loading blocks {a}:{b} failed (HTTP {resp.status}): {why}"
                )
            return body
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RuntimeBackendError(
            f"{node}: loading blocks {a}:{b} failed: {type(exc).__name__} {exc}; is its stage "
            "server up (`testbed status`)?"
        ) from exc


async def load_ranges(
    tb: RunningTestbed, ranges: Mapping[str, tuple[int, int]], *, timeout_s: float = 600.0
) -> LoadResult:
    """Make ``tb`` serve ``ranges`` (node -> (start, end), every node of the new plan): nodes
    whose range changes load it (all at once), running nodes outside ``ranges`` are parked,
    and the state file is saved. Raises :class:`ConfigError` for a node ``tb`` does not run,
    :class:`RuntimeBackendError` when a stage refuses (e.g. 409 while it holds requests); the
    nodes that did load are recorded before the error goes on."""
    missing = missing_nodes(tb, ranges)
    if missing:
        raise ConfigError(
            f"testbed {tb.run_id} runs no stage server on {', '.join(missing)}; a reload only "
            "changes the ranges of running nodes: bring a testbed up with this plan instead"
        )
    t0 = time.monotonic()
    todo = {n: r for n, r in ranges.items() if (tb.nodes[n].start, tb.nodes[n].end) != r}
    loaded: dict[str, tuple[int, int]] = {}
    errors: list[BaseException] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(node: str, a: int, b: int) -> None:
            try:
                body = await _post_load(session, node, tb.nodes[node].url, a, b)
            except RuntimeBackendError as exc:
                errors.append(exc)
                return
            got = tuple(body.get("blocks", ())) if isinstance(body, dict) else ()
            if got != (a, b):
                errors.append(
                    RuntimeBackendError(f"{node}: asked to load {a}:{b}, /load answered {got}")
                )
                return
            loaded[node] = (a, b)

        async with asyncio.TaskGroup() as tg:
            for node, (a, b) in sorted(todo.items()):
                tg.create_task(one(node, a, b))
    for node, (a, b) in loaded.items():
        ep = tb.nodes[node]
        ep.start, ep.end = a, b
    parked = []
    if not errors:
        for name, ep in tb.nodes.items():
            ep.parked = name not in ranges
            if ep.parked:
                parked.append(name)
    await asyncio.to_thread(tb.save)
    if errors:
        raise RuntimeBackendError("; ".join(str(e) for e in errors))
    return LoadResult(loaded, tuple(sorted(parked)), time.monotonic() - t0)


def plan_ranges(plan: Any) -> dict[str, tuple[int, int]]:
    """node -> (start, end) of every node that holds blocks in ``plan``."""
    return {n: (st.start, st.end) for st in plan.active_stages() for n in st.nodes}
