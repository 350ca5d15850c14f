"""System tools and the lock: what a fresh machine gets from the project's own files."""

from __future__ import annotations

import re
import tomllib

import pytest

from testbed.runtime import sysdeps
from testbed.runtime.image import locked_version
from tests.factories import REPO


def _locked() -> dict[str, set[str]]:
    data = tomllib.loads((REPO / "uv.lock").read_text(encoding="utf-8"))
    out: dict[str, set[str]] = {}
    for entry in data["package"]:
        out.setdefault(entry["name"], set()).add(entry["version"])
    return out


def test_node_requirements_are_exported_from_the_lock():
    """images/requirements-node.txt pins exactly uv.lock's versions (`make lock` exports it)."""
    locked = _locked()
    text = (REPO / "images/requirements-node.txt").read_text(encoding="utf-8")
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", text, flags=re.M)
    assert len(pins) > 20
    for name, version in pins:
        assert version in locked.get(name.lower(), set()), f"{name}=={version} is not in uv.lock"
    names = {n.lower() for n, _ in pins}
    assert {"transformers", "aiohttp", "safetensors", "pydantic"} <= names
    assert "torch" not in names  # installed at locked_version("torch") from the CPU index
    blocks = [b for b in re.split(r"^(?=[A-Za-z0-9])", text, flags=re.M) if "==" in b]
    assert len(blocks) == len(pins)
    assert all("--hash=sha256:" in block for block in blocks)


def test_locked_version_reads_the_lock():
    assert locked_version("torch") in _locked()["torch"]
    with pytest.raises(Exception, match="not locked"):
        locked_version("no-such-package-xyz")


def test_present_tool_is_found_without_installing():
    assert sysdeps.ensure_tool("ip").endswith("/ip")


def test_missing_tool_without_root_names_the_exact_command(monkeypatch):
    monkeypatch.setattr(sysdeps.shutil, "which", lambda _cmd: None)
    monkeypatch.setattr(sysdeps.os, "geteuid", lambda: 1000)
    with pytest.raises(sysdeps.SystemDependencyError) as err:
        sysdeps.ensure_tool("debootstrap")
    assert err.value.exit_code == 2
    msg = str(err.value)
    assert "debootstrap is missing" in msg
    assert "apt-get install" in msg or "package manager" in msg


def test_doctor_lists_every_system_tool():
    from testbed.runtime.doctor import _system_tool_checks

    names = {c.name for c in _system_tool_checks()}
    assert names == {f"tool {t.command}" for t in sysdeps.SYSTEM_TOOLS}
