"""`--runtime local`: nodes as local processes on loopback, all shaping in the app (no root).

Each node is a ``testbed stage serve`` process in its own session (so Ctrl-C in the shell
does not reach it, and it outlives `testbed up`), on a leash (:mod:`testbed.runtime.owner`):
it stops by itself when the run's owner dies without cleaning up (SIGKILL of `testbed up`
while starting, or of `replay --up`). `testbed down` / `clean` stop it by the pid recorded in
the state file. One probe process serves link measurements for all nodes: on loopback the
path is the same for every node, and what differs, the hop's app shaper, runs in the
measuring client. CPU quotas are not enforced locally; the device profile's numbers are shown
as planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from testbed.errors import RuntimeBackendError
from testbed.net.links import plan_shaping
from testbed.paths import state_dir
from testbed.runtime import owner
from testbed.runtime.base import NodeEndpoint, RunningTestbed, new_run_id, stage_serve_argv
from testbed.runtime.interface import UpRequest
from testbed.runtime.measure import wait_healthy
from testbed.runtime.processes import is_testbed_process, kill_pids, pid_alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(argv: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(  # own session on purpose: the testbed outlives `testbed up`
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
    return proc.pid


def _leash(tb: RunningTestbed) -> list[str]:
    """Run a command on the run's leash: ``python -m testbed.runtime.owner STATE ...``."""
    return [sys.executable, "-m", "testbed.runtime.owner", str(tb.state_path)]


async def up_local(req: UpRequest) -> RunningTestbed:
    extra_serve_args = dict(req.extra_serve_args or {})  # node -> flags (emulated devices)
    run_id = new_run_id()
    model_dir = await asyncio.to_thread(req.model_dir.resolve)
    tb = RunningTestbed(
        run_id,
        "local",
        "app",
        req.topology_path,
        req.topology.name,
        str(model_dir),
        {},
        seed=req.seed,
        owner=owner.me(),
    )
    logs = state_dir() / f"{run_id}-logs"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(tb.save)
    try:
        shaping = plan_shaping(req.topology, "app")
        probe_port = _free_port()
        probe_argv = [*_leash(tb), "testbed.net.probe", "serve"]
        probe_argv += ["--host", "127.0.0.1", "--port", str(probe_port)]
        probe_pid = await asyncio.to_thread(_spawn, probe_argv, logs / "probe.log")
        tb.extra_pids.append(probe_pid)
        for j, tier in enumerate(req.topology.tiers):
            for node in tier.nodes:
                stage = req.plan.stage_of_node(node.name)
                if stage is None:
                    tb.notes.append(f"{node.name}: holds no blocks in this plan; not started")
                    continue
                port = _free_port()
                ns = shaping[node.name]
                argv = stage_serve_argv(
                    [*_leash(tb), "cli"],
                    str(model_dir),
                    (stage.start, stage.end),
                    host="127.0.0.1",
                    port=port,
                    name=node.name,
                    extra=extra_serve_args.get(node.name, ()),  # emulated devices
                    max_batch=node.max_batch,
                )
                pid = await asyncio.to_thread(_spawn, argv, logs / f"{node.name}.log")
                tb.nodes[node.name] = NodeEndpoint(
                    name=node.name,
                    tier=tier.name,
                    tier_index=j,
                    url=f"http://127.0.0.1:{port}",
                    start=stage.start,
                    end=stage.end,
                    device=(
                        f"emulated {node.device.label or node.device.kind}"
                        if node.name in extra_serve_args
                        else "cpu (local process)"
                    ),
                    address="127.0.0.1",
                    probe_port=probe_port,
                    cpus=node.device.cpus,
                    mem_limit_bytes=None,
                    pid=pid,
                    max_batch=node.max_batch,
                    link=ns.link,
                    link_rtt_s=ns.configured_rtt_s,
                    link_rate_bps=ns.configured_rate_bps,
                    hop=ns.hop,
                )
                await asyncio.to_thread(tb.save)
        for i, n in enumerate(sorted(tb.nodes)):
            tb.nodes[n].make_hook(req.seed * 1000 + i)
        tb.notes.append("local runtime: CPU quotas and memory limits are not enforced")
        if extra_serve_args:  # emulated devices
            from testbed.emulation.plumbing import EMULATION_NOTE

            tb.notes.append(EMULATION_NOTE)
        try:
            await wait_healthy(tb, req.health_timeout_s)
        except Exception as exc:
            tails = []
            for ep in tb.nodes.values():
                with contextlib.suppress(OSError):
                    text = (logs / f"{ep.name}.log").read_text(errors="replace")[-600:]
                    tails.append(f"--- {ep.name}:\n{text}")
            raise RuntimeBackendError(f"{exc}\n" + "\n".join(tails)) from exc
        tb.status = "up"
        await asyncio.to_thread(tb.save)
        return tb
    except BaseException:
        await asyncio.shield(asyncio.to_thread(remove_local, run_id, tb))
        raise


def remove_local(run_id: str, tb: RunningTestbed | None) -> str:
    """Stop the run's processes (SIGTERM, then SIGKILL), remove its state file and logs."""
    from testbed.runtime.control import forget

    stop_throttles(run_id)
    n = kill_pids(tb.pids()) if tb is not None else 0
    forget(run_id)
    return f"{run_id}: stopped {n} processes, removed its state and logs"


# -- changes while running (a scenario timeline) ------------------------------------------


def kill_local_node(tb: RunningTestbed, node: str) -> None:
    """A crash: SIGKILL the node's stage server (no clean shutdown) and wait until it is gone."""
    ep = tb.nodes[node]
    pid = ep.pid
    if pid and pid_alive(pid) and is_testbed_process(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # ours when this process started the run
            time.sleep(0.02)


async def restart_local_node(tb: RunningTestbed, node: str) -> None:
    """The node's stage server again, on the same port, loading its blocks anew."""
    ep = tb.nodes[node]
    port = int(ep.url.rsplit(":", 1)[1])
    argv = stage_serve_argv(
        [*_leash(tb), "cli"], tb.model_dir, (ep.start, ep.end), host="127.0.0.1", port=port,
        name=node, max_batch=ep.max_batch,
    )  # fmt: skip
    log = state_dir() / f"{tb.run_id}-logs" / f"{node}.log"
    ep.pid = await asyncio.to_thread(_spawn, argv, log)
    await asyncio.to_thread(tb.save)
    speed = _speeds.get((tb.run_id, node))
    if speed is not None and speed < 1.0:
        await asyncio.to_thread(throttle, tb, node, speed)


THROTTLE_PERIOD_S = 0.1
_speeds: dict[tuple[str, str], float] = {}
_throttles: dict[tuple[str, str], tuple[threading.Thread, threading.Event]] = {}


def _duty_cycle(pid: int, speed: float, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            os.kill(pid, signal.SIGCONT)
            if stop.wait(speed * THROTTLE_PERIOD_S):
                break
            os.kill(pid, signal.SIGSTOP)
            stop.wait((1.0 - speed) * THROTTLE_PERIOD_S)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def throttle(tb: RunningTestbed, node: str, speed: float) -> None:
    """Run the node's process ``speed`` of each period (1.0 or more: unthrottled)."""
    key = (tb.run_id, node)
    old = _throttles.pop(key, None)
    if old is not None:
        old[1].set()
        old[0].join(timeout=1.0)
    _speeds[key] = speed
    pid = tb.nodes[node].pid
    if speed >= 1.0 or not pid or not (pid_alive(pid) and is_testbed_process(pid)):
        return
    stop = threading.Event()
    t = threading.Thread(target=_duty_cycle, args=(pid, speed, stop), daemon=True)
    t.start()
    _throttles[key] = (t, stop)


def stop_throttles(run_id: str) -> None:
    for key in [k for k in _throttles if k[0] == run_id]:
        t, stop = _throttles.pop(key)
        stop.set()
        t.join(timeout=1.0)
    for key in [k for k in _speeds if k[0] == run_id]:
        del _speeds[key]
