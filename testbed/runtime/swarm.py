"""Docker Swarm helpers: what the swarm looks like, where nodes go, how images get there.

Placement is a pure function (:func:`place`): topology nodes x swarm node descriptions ->
placement constraints, decided before anything is created. A node's ``host:`` names

- a swarm node's **hostname** (``host: gpu-box``), or its ``testbed.host`` label
  (``docker node update --label-add testbed.host=gpu-box NODE``): one node, pinned by id;
- a **label** ``key=value`` (``host: zone=edge``): any node with that label, chosen by the
  engine among them.

Nodes without ``host:`` are spread by the engine. A name that matches no available node is
an error naming the topology field, the value and the nodes there are.

Images reach workers without a registry through their own engines: ``docker save`` here and
``images.load`` there, for each engine named in ``$TESTBED_SWARM_ENGINES``
(``hostname=ssh://user@host,hostname2=tcp://host:2376``); or from a registry when
``$TESTBED_SWARM_REGISTRY`` (``host:5000``) is set: the image is pushed there and services
pull it. On a single-node swarm both are no-ops.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import ConfigError, RuntimeBackendError
from testbed.runtime.gpus import SWARM_GPU_RESOURCE

HOST_LABEL = "testbed.host"
ENGINES_ENV = "TESTBED_SWARM_ENGINES"
REGISTRY_ENV = "TESTBED_SWARM_REGISTRY"


def _log(msg: str) -> None:
    print(f"[swarm] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SwarmNode:
    """One node of the swarm as placement sees it (from ``docker node inspect``)."""

    id: str
    hostname: str
    role: str = "worker"  # "manager" or "worker"
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True  # Status.State == ready and Spec.Availability == active
    addr: str = ""  # Status.Addr: where its published ports are reached
    gpus: int = 0  # NVIDIA-GPU units it advertises

    @staticmethod
    def from_attrs(a: Mapping[str, Any]) -> SwarmNode:
        spec, desc, status = a.get("Spec", {}), a.get("Description", {}), a.get("Status", {})
        gpus = 0
        for res in (desc.get("Resources") or {}).get("GenericResources") or []:
            for kind, body in res.items():
                if body.get("Kind") != SWARM_GPU_RESOURCE:
                    continue
                gpus += int(body.get("Value", 1)) if kind == "DiscreteResourceSpec" else 1
        addr = status.get("Addr", "")
        if addr in ("", "0.0.0.0") and a.get("ManagerStatus"):
            addr = str(a["ManagerStatus"].get("Addr", "")).rsplit(":", 1)[0]
        return SwarmNode(
            id=a["ID"],
            hostname=desc.get("Hostname", ""),
            role=spec.get("Role", "worker"),
            labels=dict(spec.get("Labels") or {}),
            ready=status.get("State") == "ready" and spec.get("Availability") == "active",
            addr=addr,
            gpus=gpus,
        )


@dataclass(frozen=True)
class Wanted:
    """A topology node as placement sees it."""

    name: str
    host: str | None
    field: str  # "tiers[1].nodes[0].host", for messages


@dataclass(frozen=True)
class Placement:
    constraints: tuple[str, ...]  # swarm placement constraints ("node.id==...")
    candidates: tuple[str, ...]  # ids of the swarm nodes it may land on


def _matches(host: str, n: SwarmNode) -> bool:
    if "=" in host:
        key, _, value = host.partition("=")
        return n.labels.get(key.strip()) == value.strip()
    return n.hostname == host or n.labels.get(HOST_LABEL) == host


def place(wanted: Sequence[Wanted], nodes: Sequence[SwarmNode]) -> dict[str, Placement]:
    """Placement constraints for every wanted node (pure; raises ConfigError on no match)."""
    ready = [n for n in nodes if n.ready]
    if not ready:
        raise RuntimeBackendError("the swarm has no ready, active node; see `docker node ls`")
    out: dict[str, Placement] = {}
    for w in wanted:
        if w.host is None:
            out[w.name] = Placement((), tuple(n.id for n in ready))
            continue
        hits = [n for n in ready if _matches(w.host, n)]
        if not hits:
            known = ", ".join(
                n.hostname
                + (f" ({', '.join(f'{k}={v}' for k, v in n.labels.items())})" if n.labels else "")
                for n in nodes
            )
            raise ConfigError(
                f"{w.field}: {w.host!r} matches no ready swarm node; nodes: {known}; name a "
                f"hostname, a {HOST_LABEL} label or a key=value node label",
                field=w.field,
            )
        if "=" in w.host:
            key, _, value = w.host.partition("=")
            cons: tuple[str, ...] = (f"node.labels.{key.strip()}=={value.strip()}",)
        elif len(hits) == 1:
            cons = (f"node.id=={hits[0].id}",)
        else:
            raise ConfigError(
                f"{w.field}: {w.host!r} matches {len(hits)} swarm nodes "
                f"({', '.join(n.hostname for n in hits)}); use a unique {HOST_LABEL} label",
                field=w.field,
            )
        out[w.name] = Placement(cons, tuple(n.id for n in hits))
    return out


def wanted_of(topology: Any, names: set[str] | None = None) -> list[Wanted]:
    """The topology's nodes (only ``names`` when given) as :class:`Wanted`."""
    out = []
    for j, tier in enumerate(topology.tiers):
        for k, node in enumerate(tier.nodes):
            if names is None or node.name in names:
                out.append(Wanted(node.name, node.host, f"tiers[{j}].nodes[{k}].host"))
    return out


# -- the engine's view ---------------------------------------------------------------------


def swarm_state(c: Any) -> dict[str, Any]:
    """``docker info``'s Swarm section (LocalNodeState, ControlAvailable, NodeID, ...)."""
    return dict(c.info().get("Swarm") or {})


def require_manager(c: Any) -> None:
    sw = swarm_state(c)
    if sw.get("LocalNodeState") != "active":
        raise RuntimeBackendError(
            "runtime swarm needs this engine in a swarm (state: "
            f"{sw.get('LocalNodeState') or 'inactive'}); `docker swarm init` here (one host) "
            "or join one as a manager; see README 'Several hosts (Docker Swarm)'"
        )
    if not sw.get("ControlAvailable"):
        raise RuntimeBackendError(
            "this engine is a swarm worker; run `testbed up` on a manager "
            "(`docker node ls` there lists them)"
        )


def swarm_nodes(c: Any) -> list[SwarmNode]:
    return [SwarmNode.from_attrs(n.attrs) for n in c.nodes.list()]


def parse_engines(text: str | None) -> dict[str, str]:
    """``$TESTBED_SWARM_ENGINES`` -> {hostname: docker base URL}."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, url = item.partition("=")
        if not sep or not host or not url:
            raise ConfigError(
                f"{ENGINES_ENV}: {item!r} is not hostname=URL; write e.g. "
                "worker1=ssh://root@worker1",
                field=ENGINES_ENV,
            )
        out[host.strip()] = url.strip()
    return out


def distribute_image(
    c: Any, tag: str, nodes: Sequence[SwarmNode], local_id: str, registry: str | None
) -> str:
    """Make ``tag`` available on every node in ``nodes``; returns the reference services use.

    ``registry``: push there and use ``registry/tag``. Else each other node's engine (from
    ``$TESTBED_SWARM_ENGINES``) gets ``docker save`` | ``images.load`` unless it has the tag.
    """
    import docker

    if registry:
        ref = f"{registry.rstrip('/')}/{tag}"
        repo, _, ver = ref.rpartition(":")
        c.images.get(tag).tag(repo, ver)
        _log(f"pushing {ref}")
        for line in c.images.push(repo, ver, stream=True, decode=True):
            if "error" in line:
                raise RuntimeBackendError(f"pushing {ref} failed: {line['error']}")
        return ref
    others = [n for n in nodes if n.id != local_id]
    if not others:
        return tag  # single-node swarm: the image is here
    engines = parse_engines(os.environ.get(ENGINES_ENV))
    missing = [n.hostname for n in others if n.hostname not in engines]
    if missing:
        raise RuntimeBackendError(
            f"nodes may run on {', '.join(missing)}, which need image {tag}: set "
            f"{ENGINES_ENV}=HOST=ssh://user@HOST,... (their engines) or {REGISTRY_ENV}=host:port"
        )
    blob: bytes | None = None
    for n in others:
        try:
            remote = docker.DockerClient(base_url=engines[n.hostname], use_ssh_client=True)
            try:
                remote.images.get(tag)
                continue
            except docker.errors.ImageNotFound:
                pass
            if blob is None:
                _log(f"docker save {tag}")
                blob = b"".join(c.images.get(tag).save(named=True))
            _log(f"loading {tag} on {n.hostname} ({len(blob) / 2**20:.0f} MiB)")
            remote.images.load(blob)
        except docker.errors.DockerException as exc:
            raise RuntimeBackendError(
                f"copying image {tag} to {n.hostname} ({engines[n.hostname]}) failed: {exc}"
            ) from exc
    return tag
