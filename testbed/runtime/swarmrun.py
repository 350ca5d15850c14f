"""Bring a plan up as Docker Swarm services, one per node, from a swarm manager.

- **Networks**: one attachable overlay per tier (``tb-<run>-<tier>``) and one per pair of
  consecutive stages (``tb-<run>-<a>-<b>``, joining both stages' nodes, for stage-to-stage
  forwarding: :mod:`testbed.runtime.swarm_links`), subnets from ``$TESTBED_SWARM_SUBNET_POOL`` (default 10.214.0.0/16). They are not
  ``internal``: a host-mode published port needs the container's ``docker_gwbridge`` leg.
- **Services**: replicated, one task, no restart (a crashed stage fails the run, as on one
  host), placed by :func:`testbed.runtime.swarm.place`, CPU and memory limits, the stage
  server and the link probe in one container. Their two ports are published in **host
  mode** on the node that runs the task (random ports, read back from the task): the broker
  on the manager reaches each stage at ``<swarm node address>:<port>`` without the ingress
  mesh's extra NAT hop. The host cannot join an overlay, so this is how it talks to them;
  a task on the manager's own host is reached at its ``docker_gwbridge`` address instead
  (no userland proxy; the published port when that address does not answer).
- **Shaping**: the broker's traffic enters each container through its ``docker_gwbridge``
  NIC, so the link feeding the node is shaped there (downlink on the host-side veth,
  uplink inside), by the per-host agent (:mod:`testbed.runtime.swarm_agent`), which also
  shapes each container's NICs on the link overlays (forwarding); what the kernel lacks (no sch_netem) goes to the app shaper, as on one host.
- **Labels**: services, containers and networks carry ``testbed.run=<id>``; ``down`` removes
  by label and waits until the tasks' containers are gone before removing the networks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.errors import RuntimeBackendError
from testbed.net.links import plan_peer_links, plan_shaping
from testbed.net.shaping import DirShape, ShapingBackend
from testbed.runtime.base import (
    LABEL_NODE,
    LABEL_RUN,
    LABEL_TIER,
    PROBE_PORT,
    STAGE_PORT,
    NodeEndpoint,
    RunningTestbed,
    cli_launcher,
    stage_serve_argv,
)
from testbed.runtime.bringup import EngineBringUp, log_up, node_endpoint
from testbed.runtime.docker import MODEL_IN_CONTAINER, SHM_BYTES, client, free_subnets
from testbed.runtime.docker_links import peer_url
from testbed.runtime.gpus import GpuAsk, gpu_ask, swarm_gpu_request
from testbed.runtime.image import ImageMode, ensure_image
from testbed.runtime.swarm import (
    distribute_image,
    place,
    require_manager,
    swarm_nodes,
    swarm_state,
    wanted_of,
)
from testbed.runtime.swarm_agent import PLAN_ENV, run_agent_job, shape_plan
from testbed.runtime.swarm_links import (
    link_net_name,
    link_shapes,
    network_names,
    node_networks,
    task_addresses,
)
from testbed.runtime.swarm_tasks import gwbridge_addresses, wait_running, wait_stages

if TYPE_CHECKING:
    from testbed.spec.plan import Plan
    from testbed.spec.topology import Topology

SUBNET_POOL = os.environ.get("TESTBED_SWARM_SUBNET_POOL", "10.214.0.0/16")
RUNNING_TIMEOUT_S = 180.0
GONE_TIMEOUT_S = 60.0


class SwarmTestbed(EngineBringUp):
    """Brings a plan up as services; ``up`` returns the RunningTestbed (state saved)."""

    runtime = "swarm"

    def __init__(
        self,
        topology: Topology,
        topology_path: str,
        plan: Plan,
        model_dir: Path,
        *,
        backend: ShapingBackend,
        image_mode: ImageMode = "auto",
        registry: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            topology,
            topology_path,
            plan,
            model_dir,
            backend=backend,
            image_mode=image_mode,
            seed=seed,
        )
        self.registry = registry

    def remove_run(self) -> None:
        down_swarm(self.run_id)

    async def _up(self, tb: RunningTestbed, health_timeout_s: float) -> None:
        c = await asyncio.to_thread(client)
        await asyncio.to_thread(require_manager, c)
        nodes = await asyncio.to_thread(swarm_nodes, c)
        staged = {n.name for _, n in self.topology.nodes() if self.plan.stage_of_node(n.name)}
        placement = place(wanted_of(self.topology, staged), nodes)  # decide before acting
        info = await asyncio.to_thread(ensure_image, self.image_mode)
        local_id = str(swarm_state(c).get("NodeID"))
        targets = {i for p in placement.values() for i in p.candidates}
        image = await asyncio.to_thread(
            distribute_image,
            c,
            info.tag,
            [n for n in nodes if n.id in targets],
            local_id,
            self.registry,
        )
        tb.image = image
        gpu_units = sum(n.gpus for n in nodes)
        tiers = list(self.topology.tier_names)
        links = plan_peer_links(self.plan)
        nets = network_names(self.run_id, tiers, links)
        subnets = await asyncio.to_thread(free_subnets, c, len(nets), SUBNET_POOL)
        net_ids: dict[str, str] = {}  # link overlays: id -> name
        link_nets = {link_net_name(self.run_id, x) for x in links}
        for (name, joins), subnet in zip(nets, subnets, strict=True):
            net = await asyncio.to_thread(self._create_network, c, name, str(subnet), joins)
            tb.networks.append(name)
            if name in link_nets:
                net_ids[net.id] = name
        await asyncio.to_thread(tb.save)

        shaping = plan_shaping(self.topology, self.backend)
        services: dict[str, Any] = {}
        for j, tier in enumerate(self.topology.tiers):
            for node in tier.nodes:
                stage = self.plan.stage_of_node(node.name)
                if stage is None:
                    tb.notes.append(f"{node.name}: holds no blocks in this plan; not started")
                    continue
                dev = node.device
                device = "cpu"
                use_gpu = dev.kind == "gpu" and gpu_units > 0
                if dev.kind == "gpu":
                    device = "cuda" if use_gpu else "cpu (no swarm node advertises NVIDIA-GPU)"
                ep = node_endpoint(  # address and url: once the task runs (published port)
                    self.run_id, tier, j, node, stage, shaping[node.name], device=device
                )
                tb.nodes[node.name] = ep
                services[node.name] = await asyncio.to_thread(
                    self._create_service,
                    c,
                    ep,
                    node_networks(self.run_id, tier.name, node.name, links),
                    image,
                    info.mounts,
                    placement[node.name].constraints,
                    gpu_ask(node.gpus) if use_gpu else None,
                )
        await asyncio.to_thread(tb.save)
        addr_of = {n.id: n.addr for n in nodes}
        into = {r: link_net_name(self.run_id, x) for x in links for r in x.receivers}
        local_tasks: dict[str, dict[str, Any]] = {}
        for name, svc in services.items():
            node_id, ports, task = await asyncio.to_thread(wait_running, svc, RUNNING_TIMEOUT_S)
            ep = tb.nodes[name]
            ep.link_addresses = task_addresses(task, net_ids) or None
            if name in into:  # forwarding: where the previous stage reaches it
                ep.peer_address = (ep.link_addresses or {}).get(into[name])
                if ep.peer_address is None:
                    raise RuntimeBackendError(f"{name}: its task has no address on {into[name]}")
                ep.peer_url = peer_url(ep.peer_address)
            ep.address = addr_of.get(node_id) or "127.0.0.1"
            ep.url = f"http://{ep.address}:{ports[STAGE_PORT]}"
            ep.probe_port = ports[PROBE_PORT]
            if node_id == local_id:  # on this host: reached at its docker_gwbridge address too
                local_tasks[name] = task
            tb.notes.append(f"{name}: on swarm node {node_id[:12]} ({ep.address})")
        for i, n in enumerate(sorted(tb.nodes)):
            tb.nodes[n].make_hook(self.seed * 1000 + i)
        await asyncio.to_thread(tb.save)
        shapes = {n: (shaping[n].downlink, shaping[n].uplink) for n in tb.nodes}
        await shape_nodes(c, tb, shapes, info.mounts, link_shapes(tb, shapes))
        log_up(f"{len(tb.nodes)} services up, links shaped ({self.backend}); waiting for stages")
        direct = await asyncio.to_thread(gwbridge_addresses, c, local_tasks)
        await wait_stages(tb, services, health_timeout_s, direct)
        tb.status = "up"
        await asyncio.to_thread(tb.save)

    def _create_network(self, c: Any, name: str, subnet: str, joins: str) -> Any:
        import docker
        from docker.types import IPAMConfig, IPAMPool

        try:
            return c.networks.create(
                name,
                driver="overlay",
                attachable=True,
                check_duplicate=True,
                ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=subnet)]),
                labels={LABEL_RUN: self.run_id, LABEL_TIER: joins},
            )
        except docker.errors.APIError as exc:
            raise RuntimeBackendError(f"creating overlay {name} ({subnet}) failed: {exc}") from exc

    def _create_service(
        self,
        c: Any,
        ep: NodeEndpoint,
        networks: list[str],
        image: str,
        mounts: tuple[tuple[str, str], ...],
        constraints: tuple[str, ...],
        gpu: GpuAsk | None,
    ) -> Any:
        import docker
        from docker.types import Mount, Resources, RestartPolicy

        serve = stage_serve_argv(
            cli_launcher("python3"),
            MODEL_IN_CONTAINER,
            (ep.start, ep.end),
            host="0.0.0.0",
            port=STAGE_PORT,
            name=ep.name,
            max_batch=ep.max_batch,
        )
        probe = ["python3", "-m", "testbed.net.probe", "serve", "--port", str(PROBE_PORT)]
        cmd = ["sh", "-c", f"{shlex.join(probe)} & exec {shlex.join(serve)}"]
        mount_list = [Mount(MODEL_IN_CONTAINER, str(self.model_dir), type="bind", read_only=True)]
        mount_list += [Mount(dst, src, type="bind", read_only=True) for src, dst in mounts]
        mount_list.append(Mount("/dev/shm", None, type="tmpfs", tmpfs_size=SHM_BYTES))
        env = {"OMP_NUM_THREADS": str(max(1, round(ep.cpus or 1))), "TESTBED_NODE": ep.name}
        generic = None
        if gpu is not None:
            req = swarm_gpu_request(gpu)
            env |= req.env
            generic = req.generic_resources
        res = Resources(
            cpu_limit=round(ep.cpus * 1e9) if ep.cpus else None,
            mem_limit=ep.mem_limit_bytes,
            generic_resources=generic,
        )
        labels = {LABEL_RUN: self.run_id, LABEL_NODE: ep.name, LABEL_TIER: ep.tier}
        ports = [
            {"Protocol": "tcp", "TargetPort": p, "PublishMode": "host"}
            for p in (STAGE_PORT, PROBE_PORT)
        ]
        try:
            return c.services.create(
                image,
                cmd,
                name=ep.container,
                hostname=ep.name,
                networks=networks,
                env=[f"{k}={v}" for k, v in env.items()],
                labels=labels,
                container_labels=labels,
                mounts=mount_list,
                resources=res,
                constraints=list(constraints),
                restart_policy=RestartPolicy(condition="none"),
                endpoint_spec={"Mode": "vip", "Ports": ports},
            )
        except docker.errors.APIError as exc:
            raise RuntimeBackendError(f"creating the service of {ep.name} failed: {exc}") from exc


async def shape_nodes(
    c: Any,
    tb: RunningTestbed,
    shapes: dict[str, tuple[DirShape, DirShape]],
    mounts: tuple[tuple[str, str], ...],
    links: dict[str, list[tuple[str, DirShape]]] | None = None,
) -> None:
    """Run the shaping agent on every host; every node of ``shapes`` (and of ``links``, the
    link overlays' NICs) must be reported."""
    assert tb.image is not None
    plan = shape_plan(tb.run_id, tb.backend, shapes, links)
    recs = await asyncio.to_thread(
        lambda: run_agent_job(
            c,
            run_id=tb.run_id,
            name=f"shape-{int(time.time() * 1000) % 10**8}",
            image=tb.image,  # type: ignore[arg-type]
            argv=["python3", "-m", "testbed.runtime.swarm_agent", "shape"],
            env={PLAN_ENV: plan},
            mounts=mounts,
        )
    )
    shaped = {r["shaped"]: r for r in recs if "shaped" in r}
    linked = {r["linked"]: r for r in recs if "linked" in r}
    missing = sorted((set(shapes) - set(shaped)) | (set(links or {}) - set(linked)))
    if missing:
        raise RuntimeBackendError(f"shaping agent found no container for {', '.join(missing)}")
    for name, r in shaped.items():
        if name in tb.nodes:
            tb.nodes[name].down_iface = {"ifname": r["down"], "host": r["host"]}
            tb.nodes[name].up_iface = {"ifname": r["up"], "host": r["host"]}
    for name, r in linked.items():
        if name in tb.nodes:  # its NICs on the link overlays, in the plan's order
            tb.nodes[name].peer_up_iface = {"ifnames": r["ifaces"], "host": r["host"]}


# -- teardown -----------------------------------------------------------------------------


def remove_swarm_by_label(c: Any, label_filter: str) -> tuple[int, int]:
    """Remove services, then (once their containers are gone) networks; returns counts."""
    import docker

    try:
        svcs = c.services.list(filters={"label": label_filter})
    except docker.errors.APIError:  # not (or no longer) a swarm manager: no services here
        svcs = []
    for s in svcs:
        with contextlib.suppress(docker.errors.NotFound):
            s.remove()
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while time.monotonic() < deadline:
        left = c.containers.list(all=True, filters={"label": label_filter}, sparse=True)
        if not left or not svcs:
            break
        time.sleep(0.5)
    # what the engine has not reaped (a finished agent task's container): remove it here
    for ctr in c.containers.list(all=True, filters={"label": label_filter}, sparse=True):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            ctr.remove(force=True)
    nets = c.networks.list(filters={"label": label_filter})
    removed = 0
    for net in nets:
        for _ in range(20):  # an endpoint may linger a moment after its container
            try:
                net.remove()
                removed += 1
                break
            except docker.errors.NotFound:
                break
            except docker.errors.APIError:
                time.sleep(0.5)
    return len(svcs), removed


def down_swarm(run_id: str) -> tuple[int, int]:
    return remove_swarm_by_label(client(), f"{LABEL_RUN}={run_id}")
