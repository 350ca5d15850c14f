"""Provenance next to every result: resolved config, versions, git revision, nodes."""

from __future__ import annotations

import asyncio
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from testbed.broker.broker import BrokerConfig, BrokerResult
from testbed.broker.layout import Layout
from testbed.experiment.prepare import Prepared
from testbed.runtime.base import RunningTestbed
from testbed.runtime.interface import runtime_of

_REPO = Path(__file__).resolve().parents[2]


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist, key in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("aiohttp", "aiohttp"),
        ("docker", "docker"),
        ("pyroute2", "pyroute2"),
        ("llm-pipeline-testbed", "testbed"),
    ):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


async def git_revision(repo: Path = _REPO) -> str | None:
    if not await asyncio.to_thread((repo / ".git").exists):
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            "-C",
            str(repo),
            "rev-parse",
            "HEAD",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        async with asyncio.timeout(5):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    rev = out.decode().strip()
    return rev if proc.returncode == 0 and rev else None


def testbed_description(tb: RunningTestbed) -> dict[str, Any]:
    return {
        "run_id": tb.run_id,
        "runtime": tb.runtime,
        "shaping": tb.backend,
        "nodes": [
            {
                "name": n.name,
                "tier": n.tier,
                "url": n.url,
                "blocks": [n.start, n.end],
                "parked": n.parked,  # running, outside this plan (serves nothing)
                "device": n.device,
                "cpus": n.cpus,
                "mem_limit_bytes": n.mem_limit_bytes,
            }
            for n in sorted(tb.nodes.values(), key=lambda n: (n.tier_index, n.name))
        ],
        "links_checked": [asdict(c) for c in tb.checks],
    }


async def run_metadata(
    prep: Prepared,
    tb: RunningTestbed,
    layout: Layout,
    result: BrokerResult,
    config: BrokerConfig,
) -> dict[str, Any]:
    """The resolved config, versions, git revision, shaping backend and node devices."""
    spec = prep.loaded.spec
    vs = versions()
    vs["docker_engine"] = await runtime_of(tb).engine_version()  # the engine, if any
    return {
        "scenario": {"path": str(prep.loaded.path), **spec.model_dump(mode="json", by_alias=False)},
        "topology": {
            "path": str(prep.loaded.topology_path),
            **prep.topology.model_dump(mode="json", by_alias=False),
        },
        "model_dir": str(prep.model_dir),
        "model_profile": prep.profile.model_dump(mode="json"),
        "cost_source": prep.cost.source,
        "plan": prep.plan.model_dump(mode="json"),
        "stages_served": layout.describe(),
        "partitioner": {"name": prep.partitioner, "params": prep.partitioner_params},
        "scheduler": result.scheduler,
        "broker": asdict(config),
        "workload": prep.workload.description,
        "testbed": testbed_description(tb),
        "versions": vs,
        "git_revision": await git_revision(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
