"""What a running testbed looks like to its users (broker, CLI), for every runtime.

``RunningTestbed`` lists the nodes with a stage base URL reachable *from the host*, their
tier and block range, and the app-shaper hook (``before_send(nbytes)``) the stage client must
call on the hop *into* each node when the shaping backend needs one. It is rebuilt from the
state file (``$TESTBED_STATE_DIR`` or ``~/.local/state/testbed/<run>.json``) by
:func:`load_running`, so another process (``testbed replay``) can use a testbed that
``testbed up`` started.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError, RuntimeBackendError
from testbed.net.appshaper import AppShaper, HopShape
from testbed.net.shaping import DirShape, ShapingBackend
from testbed.paths import state_dir

__all__ = ["state_dir"]  # re-exported: callers import it from here

RuntimeName = str  # a name in testbed.runtime.interface.RUNTIMES ("local", "docker", ...)
LABEL_RUN = "testbed.run"
LABEL_NODE = "testbed.node"
LABEL_TIER = "testbed.tier"
STAGE_PORT = 8000
# how to run the CLI in a node (`python -m testbed.cli.main` would build a second, empty app)
CLI_CODE = "from testbed.cli.main import main; main()"
PROBE_PORT = 9101


RUN_ID_RE = re.compile(r"^tb[0-9a-f]{8}$")


def new_run_id() -> str:
    return "tb" + secrets.token_hex(4)


def check_run_id(run_id: str) -> str:
    """A run id names files under the state folder: only ``tb`` + 8 hex digits is one."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise ConfigError(
            f"{run_id!r} is not a run id (tb + 8 hex digits, e.g. tb1a2b3c4d); "
            "see `testbed status` for the running ones",
            field="RUN",
        )
    return run_id


def cli_launcher(python: str) -> list[str]:
    """How to run the testbed CLI with ``python`` (a node's interpreter)."""
    return [python, "-c", CLI_CODE]


def stage_serve_argv(
    launcher: Sequence[str],
    model_dir: str,
    blocks: tuple[int, int],
    *,
    host: str,
    port: int,
    name: str,
    extra: Sequence[str] = (),
    max_batch: int | None = None,
) -> list[str]:
    """The one ``testbed stage serve`` command line (local processes, containers, tests);
    ``launcher`` runs the CLI (:func:`cli_launcher`, or the leash of a local node);
    ``max_batch``: the node's (testbed.spec.batching; None: the server's default)."""
    start, end = blocks
    batch = [] if max_batch is None else ["--max-batch", str(max_batch)]
    return [
        *launcher,
        "stage",
        "serve",
        "--model-dir",
        model_dir,
        "--blocks",
        f"{start}:{end}",
        "--host",
        host,
        "--port",
        str(port),
        "--name",
        name,
        *batch,
        *extra,
    ]


@dataclass(frozen=True)
class LinkCheck:
    """A link's configured vs measured values after `up` (or `status --measure`), at ``at``."""

    node: str
    link: str  # "edge->fog"
    configured_rtt_s: float
    configured_rate_bps: float | None
    measured_rtt_s: float | None
    measured_rate_bps: float | None
    ok: bool
    note: str = ""
    measured_at: float | None = None  # time.time() of the measurement (None: files before it)
    src: str = "host"  # where the probe ran: "host", or the sending node (a node-to-node link)


@dataclass
class NodeEndpoint:
    name: str
    tier: str
    tier_index: int
    url: str  # stage server base URL reachable from the host, e.g. http://10.213.1.2:8000
    start: int  # first block
    end: int  # one past the last block
    device: str  # "cpu" or "cuda" (what the node runs on), with the reason for a fallback
    address: str  # IP the node has on its tier network (127.0.0.1 locally)
    probe_port: int
    cpus: float | None = None
    base_cpus: float | None = None  # the topology's cpus (speed 1.0), before any slowdown
    mem_limit_bytes: int | None = None
    container: str | None = None  # docker: container name
    pid: int | None = None  # local: process id
    max_batch: int | None = None  # its server's --max-batch (None: the server's default)
    link: str | None = None  # the link feeding this node ("edge->fog"), None on tier 0
    link_rtt_s: float = 0.0  # configured round trip of that link (2 x one-way delay)
    link_rate_bps: float | None = None  # configured rate of that link
    hop: HopShape | None = None  # app-level part of that link (None: nothing at app level)
    partitioned: bool = False  # cut off at app level (a timeline partition, non-kernel shaping)
    # running, but outside the current plan (a later plan of `compare` left it out): it still
    # holds [start, end) and serves nothing (testbed.runtime.reload)
    parked: bool = False
    # kernel-side shaping, for changes while running (docker): ifindex/netns per direction
    down_iface: dict[str, Any] | None = None
    up_iface: dict[str, Any] | None = None
    # forwarding (docker): the node's address on the link network joining it to the previous
    # stage's nodes, its stage URL there, and that network's veth pair (shaped as its link)
    peer_address: str | None = None
    peer_url: str | None = None
    peer_down_iface: dict[str, Any] | None = None
    peer_up_iface: dict[str, Any] | None = None
    # an emulated device's speed (a timeline slowdown, paced by its stage: POST /speed)
    speed: float = 1.0
    # forwarding (swarm): its address on each link overlay it joins (network -> address)
    link_addresses: dict[str, str] | None = None
    hook: AppShaper | None = field(default=None, compare=False, repr=False)

    @property
    def emulated(self) -> bool:
        """The node is an emulated device (the runtimes label its device "emulated ...")."""
        return self.device.startswith("emulated ")

    def make_hook(self, seed: int) -> None:
        self.hook = AppShaper(self.hop, seed=seed, name=self.name) if self.hop is not None else None


@dataclass
class RunningTestbed:
    run_id: str
    runtime: RuntimeName
    backend: ShapingBackend
    topology_path: str
    topology_name: str
    model_dir: str
    nodes: dict[str, NodeEndpoint]
    image: str | None = None
    seed: int = 0
    networks: list[str] = field(default_factory=list)
    checks: list[LinkCheck] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    status: str = "starting"  # starting | up | failed
    notes: list[str] = field(default_factory=list)
    extra_pids: list[int] = field(default_factory=list)  # local helper processes (probe)
    # the process that owns the run until it is handed over (`testbed up` hands it over once
    # the testbed is up; `replay --up` owns it to the end): (pid, start time in clock ticks).
    # None: detached, the user stops it with `testbed down`.
    owner: tuple[int, int] | None = None

    def pids(self) -> list[int]:
        """Every local process of the run (stage servers and helpers)."""
        return [n.pid for n in self.nodes.values() if n.pid] + list(self.extra_pids)

    # -- what the broker uses --------------------------------------------------------------
    def stage_nodes(self) -> list[NodeEndpoint]:
        """Nodes that serve blocks, in pipeline order (tier, then name); parked ones do not."""
        return sorted(
            (n for n in self.nodes.values() if n.end > n.start and not n.parked),
            key=lambda n: (n.tier_index, n.name),
        )

    def route_url(self, node: str) -> str:
        """The stage URL of ``node`` as the previous stage reaches it (forwarding)."""
        ep = self.nodes[node]
        return ep.peer_url or ep.url

    def hooks_by_url(self) -> dict[str, AppShaper | None]:
        """For ``PipelineClient(hooks_by_url=...)``: the hop hook of every node's stage URL."""
        return {n.url: n.hook for n in self.nodes.values()}

    def hook_for(self, node: str) -> AppShaper | None:
        """The hop hook to await before sending to ``node`` (None: the kernel does it all)."""
        return self.nodes[node].hook

    # -- persistence -----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return state_dir() / f"{self.run_id}.json"

    def to_json(self) -> dict[str, Any]:
        nodes = {}
        for name, n in self.nodes.items():
            d = asdict(n)
            d.pop("hook", None)
            nodes[name] = d
        out = asdict(self) | {"nodes": nodes}
        return out

    def save(self) -> Path:
        path = self.state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)
        return path

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunningTestbed:
        nodes = {}
        for name, d in data["nodes"].items():
            hop = d.get("hop")
            if hop is not None:
                hop = HopShape(
                    DirShape(**hop["forward"]), DirShape(**hop["reverse"]), hop["apply_rate"]
                )
            nodes[name] = NodeEndpoint(**(d | {"hop": hop}))
        checks = [LinkCheck(**c) for c in data.get("checks", [])]
        owner = data.get("owner")
        owner = (int(owner[0]), int(owner[1])) if owner else None
        tb = RunningTestbed(**(data | {"nodes": nodes, "checks": checks, "owner": owner}))
        for i, n in enumerate(sorted(tb.nodes)):
            tb.nodes[n].make_hook(tb.seed * 1000 + i)
        return tb


def list_states() -> list[Path]:
    d = state_dir()
    return sorted(d.glob("tb*.json"), key=lambda p: p.stat().st_mtime) if d.exists() else []


def load_running(run_id: str | None = None) -> RunningTestbed:
    """The testbed ``run_id`` (default: the most recent one) from its state file."""
    if run_id is None:
        states = list_states()
        if not states:
            raise RuntimeBackendError(
                "no testbed is running (no state file); start one with `testbed up`"
            )
        path = states[-1]
    else:
        path = state_dir() / f"{check_run_id(run_id)}.json"
        if not path.exists():
            raise RuntimeBackendError(
                f"no testbed run {run_id!r} (no {path}); see `testbed status`"
            )
    try:
        return RunningTestbed.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeBackendError(
            f"state file {path} is unreadable ({exc}); `testbed clean` removes it"
        ) from exc
