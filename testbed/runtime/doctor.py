"""Host checks for `testbed doctor`: each returns what it found and what to do about it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    found: str
    fix: str = ""


def run_checks() -> list[Check]:
    out: list[Check] = []
    root = os.geteuid() == 0
    out.append(
        Check(
            "permissions",
            "ok" if root else "warn",
            "running as root" if root else f"uid {os.geteuid()} (not root)",
            ""
            if root
            else "shaping enters container namespaces (CAP_NET_ADMIN + CAP_SYS_ADMIN): "
            "run `sudo testbed up`, or use --runtime local (no root, app-level shaping)",
        )
    )
    c = None
    try:
        import docker

        c = docker.from_env(timeout=10)
        ver = c.version()
        info = c.info()
        out.append(
            Check(
                "docker",
                "ok",
                f"engine {ver.get('Version')} (API {ver.get('ApiVersion')}), "
                f"storage {info.get('Driver')}, {info.get('NCPU')} CPUs",
            )
        )
        cg_driver, cg_ver = info.get("CgroupDriver"), info.get("CgroupVersion")
        lvl: Level = "ok" if cg_driver else "warn"
        out.append(
            Check(
                "cgroups",
                lvl,
                f"driver {cg_driver}, version {cg_ver}",
                "" if lvl == "ok" else "CPU quotas and memory limits need cgroups",
            )
        )
        nvidia = "nvidia" in (info.get("Runtimes") or {})
        out.append(
            Check(
                "nvidia runtime",
                "ok" if nvidia else "warn",
                "present: GPU nodes get device requests"
                if nvidia
                else "absent: GPU nodes run on CPU",
                "" if nvidia else "install the NVIDIA Container Toolkit for GPU passthrough",
            )
        )
    except Exception as exc:  # docker missing, socket permission, daemon down
        out.append(
            Check(
                "docker",
                "fail",
                f"not reachable: {exc}",
                "start the Docker engine, add yourself to the docker group, or set DOCKER_HOST; "
                "--runtime local works without Docker",
            )
        )
    try:
        from testbed.net.detect import probe_qdiscs_sync

        q = probe_qdiscs_sync()
        found = f"netem {'yes' if q.netem else 'NO'}, htb {'yes' if q.htb else 'NO'}, tbf {'yes' if q.tbf else 'NO'} ({q.method})"
        backend = q.backend("docker")
        if q.netem and (q.htb or q.tbf):
            out.append(Check("qdiscs", "ok", found + f"; shaping backend: {backend}"))
        elif q.htb or q.tbf:
            out.append(
                Check(
                    "qdiscs",
                    "warn",
                    found + f"; shaping backend: {backend}",
                    "delay/jitter/loss are applied by the testbed's transport; for kernel netem: "
                    "modprobe sch_netem (Ubuntu: apt install linux-modules-extra-$(uname -r))",
                )
            )
        else:
            out.append(
                Check(
                    "qdiscs",
                    "fail",
                    found + "; shaping backend: app",
                    "no kernel rate shaping: modprobe sch_htb sch_tbf, or use --runtime local",
                )
            )
    except Exception as exc:
        out.append(
            Check(
                "qdiscs", "fail", f"probe failed: {exc}", "run as root to probe a throwaway netns"
            )
        )
    if c is not None:
        try:
            from testbed.runtime.docker import SUBNET_POOL, free_subnets

            nets = free_subnets(c, 3)
            out.append(Check("subnets", "ok", f"free /24s in {SUBNET_POOL}, e.g. {nets[0]}"))
        except Exception as exc:
            out.append(
                Check(
                    "subnets",
                    "fail",
                    str(exc),
                    "set TESTBED_SUBNET_POOL=10.x.0.0/16 to a free range",
                )
            )
        try:
            import docker

            from testbed.runtime.image import BASE_REPO, BASE_TAG, PUBLIC_BASE

            public = ":".join(PUBLIC_BASE)
            try:
                c.images.get(f"{BASE_REPO}:{BASE_TAG}")
                out.append(
                    Check("node image", "ok", f"offline base {BASE_REPO}:{BASE_TAG} present")
                )
            except docker.errors.ImageNotFound:
                out.append(
                    Check(
                        "node image",
                        "ok",
                        f"not built yet: the first `testbed up` uses {public} if it can be "
                        "pulled, else builds a Debian base with debootstrap (~2 min)",
                    )
                )
        except Exception as exc:
            out.append(Check("node image", "warn", str(exc)))
    if c is not None:
        from testbed.runtime.doctor_swarm import swarm_checks

        try:
            out.extend(swarm_checks(c))
        except Exception as exc:  # a check reports, it does not raise
            out.append(Check("swarm", "warn", f"could not inspect the swarm: {exc}"))
    out.extend(_system_tool_checks())
    py_ok = sys.version_info[:2] == (3, 11)
    out.append(
        Check(
            "python",
            "ok" if py_ok else "warn",
            f"{sys.version.split()[0]} at {sys.executable}",
            ""
            if py_ok
            else "the offline image mounts this venv into Debian's Python 3.11: "
            "use a 3.11 venv or --image-mode dockerfile",
        )
    )
    return out


def _system_tool_checks() -> list[Check]:
    """Every system tool the testbed can need, found or not, and how it gets installed."""
    from testbed.runtime.sysdeps import can_auto_install, install_command, tool_states

    auto = can_auto_install()
    out: list[Check] = []
    for tool, path in tool_states():
        if path:
            out.append(Check(f"tool {tool.command}", "ok", f"{path} (for {tool.needed_for})"))
            continue
        how = (
            "`testbed up` installs it with apt-get when needed (root on Debian/Ubuntu)"
            if auto and tool.command == "debootstrap"
            else install_command(tool)
        )
        out.append(Check(f"tool {tool.command}", "warn", f"missing (for {tool.needed_for})", how))
    return out
