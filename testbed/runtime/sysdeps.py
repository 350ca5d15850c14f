"""System packages the testbed needs outside Python, found or installed by the project itself.

A fresh machine has only what the project's own files install. The Python packages come from
``uv.lock`` (``make setup``); the one system tool the Docker runtime can need is
``debootstrap`` (to build the offline base image when no registry is reachable). When it is
missing, :func:`ensure_tool` installs it with apt-get if this process is root on a Debian or
Ubuntu host, and otherwise raises :class:`SystemDependencyError` (exit code 2) with the exact
command to run. ``testbed doctor`` lists every entry of :data:`SYSTEM_TOOLS` with its state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TestbedError


class SystemDependencyError(TestbedError, RuntimeError):
    """A system tool is missing and could not be installed here. Exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class SystemTool:
    command: str  # executable looked up on PATH
    debian_package: str
    needed_for: str


SYSTEM_TOOLS: tuple[SystemTool, ...] = (
    SystemTool(
        "debootstrap", "debootstrap", "the offline node image, when no registry is reachable"
    ),
    SystemTool("ip", "iproute2", "network namespaces and link probes"),
    SystemTool("docker", "docker.io", "the docker runtime; --runtime local needs none"),
)

APT_TIMEOUT_S = 900


def _is_debian_like() -> bool:
    return Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


def install_command(tool: SystemTool) -> str:
    """The command a user runs to install ``tool`` (what the error message says)."""
    if _is_debian_like():
        sudo = "" if os.geteuid() == 0 else "sudo "
        return f"{sudo}apt-get install -y --no-install-recommends {tool.debian_package}"
    return f"install {tool.debian_package} with your distribution's package manager"


def can_auto_install() -> bool:
    return os.geteuid() == 0 and _is_debian_like()


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=APT_TIMEOUT_S,
        check=False,
    )


def ensure_tool(command: str) -> str:
    """Path of ``command``; installs its Debian package when missing and allowed, else raises."""
    found = shutil.which(command)
    if found:
        return found
    tool = next(t for t in SYSTEM_TOOLS if t.command == command)
    if not can_auto_install():
        raise SystemDependencyError(
            f"{command} is missing; it is needed for {tool.needed_for}. "
            f"Run: {install_command(tool)}"
        )
    print(f"[sysdeps] {command} missing: apt-get install {tool.debian_package}", file=sys.stderr)
    pkg = tool.debian_package
    proc = _apt("install", "-y", "--no-install-recommends", pkg)
    if proc.returncode != 0:  # a fresh machine often has no package lists yet
        update = _apt("update")
        proc = (
            _apt("install", "-y", "--no-install-recommends", pkg)
            if update.returncode == 0
            else update
        )
    found = shutil.which(command)
    if proc.returncode != 0 or not found:
        tail = (proc.stdout + proc.stderr)[-800:]
        raise SystemDependencyError(
            f"installing {pkg} with apt-get failed (exit {proc.returncode}); "
            f"run `{install_command(tool)}` yourself:\n{tail}"
        )
    return found


def tool_states() -> list[tuple[SystemTool, str | None]]:
    """Every system tool with its path, or None when missing (for `testbed doctor`)."""
    return [(t, shutil.which(t.command)) for t in SYSTEM_TOOLS]
