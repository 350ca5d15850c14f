"""The Docker engine for integration tests that need one: a client, or the test skipped with
the reason (no docker package, engine unreachable, not root for shaping namespaces)."""

from __future__ import annotations

import os
from typing import Any

import pytest


def docker_or_skip(
    *, timeout: int = 30, root_reason: str = "shaping container namespaces needs root"
) -> Any:
    """A pinged ``docker.DockerClient``; skips the calling test when Docker cannot be used."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"Docker not reachable: {exc}")
    if os.geteuid() != 0:
        pytest.skip(root_reason)
    return client
