"""`make demo`'s path from nothing: the Makefile's default scenario, compared through Docker by
the CLI exactly as `make demo` runs it (cut to a few requests). Under .ci/run the node image's
base is built from scratch here (fresh TESTBED_BASE_TAG and cache), so this is the cold path a
fresh machine takes, debootstrap install included when it is missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)]


def _demo_scenario() -> Path:
    m = re.search(r"^SCENARIO \?= (\S+)", (REPO / "Makefile").read_text(), flags=re.M)
    assert m, "Makefile has no SCENARIO default"
    return REPO / m.group(1)


def _labelled_containers(client) -> set[str]:
    return {c.id for c in client.containers.list(all=True, filters={"label": "testbed.run"})}


def test_default_scenario_compares_through_docker_from_the_cli(tmp_path: Path) -> None:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"Docker not reachable: {exc}")
    if os.geteuid() != 0:
        pytest.skip("shaping container namespaces needs root")

    src = _demo_scenario()
    data = yaml.safe_load(src.read_text())
    for key in ("topology",):
        data[key] = str((src.parent / data[key]).resolve())
    wl = data["workload"]
    if "path" in wl:
        wl["path"] = str((src.parent / wl["path"]).resolve())
    wl["max_requests"] = 3
    data["output"] = str(tmp_path / "results")
    scenario = tmp_path / src.name
    scenario.write_text(yaml.safe_dump(data))

    before = _labelled_containers(client)
    env = {**os.environ, "TESTBED_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", "compare", str(scenario), "--runtime", "docker"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "results").glob("*-compare"))
    assert len(runs) == 1, proc.stderr[-2000:]
    table = (runs[0] / "comparison.md").read_text()
    for pair in data["compare"]:
        assert pair in table
    for pair_dir in (p for p in runs[0].iterdir() if p.is_dir()):
        summary = json.loads((pair_dir / "summary.json").read_text())
        assert summary["completed"] == 3, (pair_dir.name, summary)
        config = json.loads((pair_dir / "config.json").read_text())
        assert config["testbed"]["runtime"] == "docker"
    assert _labelled_containers(client) - before == set(), "compare left containers behind"
