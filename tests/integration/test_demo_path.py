"""`make demo`'s path from nothing: the Makefile's default scenario (Phi-3-medium emulated on the
paper-like cluster) compared through Docker by the CLI as `make demo` runs it, cut to two short
requests (`--max-requests 2`, 8 output tokens, 1 s apart, time dilation 10). Under
.ci/run the node image's base is built from scratch here (fresh TESTBED_BASE_TAG and cache), so
this is the cold path a fresh machine takes, debootstrap install included when it is missing.

It also covers emulation in containers (it replaced test_emulation_docker.py): one testbed
serves the three plans, the second and third loaded into the running stage servers (POST
/load), every request completes, and each pair's results carry the pacing fidelity at the
scenario's time dilation and its bottleneck utilisation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dockerenv import docker_or_skip

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)]


def _demo_scenario() -> Path:
    m = re.search(r"^SCENARIO \?= (\S+)", (REPO / "Makefile").read_text(), flags=re.M)
    assert m, "Makefile has no SCENARIO default"
    return REPO / m.group(1)


def _labelled_containers(client) -> set[str]:
    return {c.id for c in client.containers.list(all=True, filters={"label": "testbed.run"})}


def test_default_scenario_compares_through_docker_from_the_cli(tmp_path: Path) -> None:
    client = docker_or_skip()

    src = _demo_scenario()
    data = yaml.safe_load(src.read_text())
    assert data.get("execution") == "emulated", "make demo's scenario is the emulated one"
    for key in ("topology",):
        data[key] = str((src.parent / data[key]).resolve())
    wl = data["workload"]
    if "path" in wl:
        wl["path"] = str((src.parent / wl["path"]).resolve())
    # two short requests about 1 s apart; time dilation 10 (make demo's is lower: its 20x
    # longer run could not fit a CI job) keeps a busy CI host inside the emulated windows
    wl.update(max_output_tokens=8, time_scale=0.25)
    data["dilation"] = 10
    data["output"] = str(tmp_path / "results")
    scenario = tmp_path / src.name
    scenario.write_text(yaml.safe_dump(data))

    before = _labelled_containers(client)
    env = {**os.environ, "TESTBED_STATE_DIR": str(tmp_path / "state")}
    argv = [sys.executable, "-m", "testbed", "compare", str(scenario), "--runtime", "docker"]
    proc = subprocess.run(
        [*argv, "--max-requests", "2", "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    out = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    runs = list((tmp_path / "results").glob("*-compare"))
    assert len(runs) == 1, proc.stderr[-2000:]
    table = (runs[0] / "comparison.md").read_text()
    for pair in data["compare"]:
        assert pair in table
    run_ids = set()
    for pair in data["compare"]:
        pair_dir = runs[0] / pair
        summary = json.loads((pair_dir / "summary.json").read_text())
        assert summary["completed"] == 2, (pair, summary)
        em = summary["emulation"]
        assert em["dilation"] == data["dilation"] and em["steps"] > 0, em
        # warmed-up stages at dilation 10: 0 of 48 windows per pair overran on the development
        # host at load 1-4 (real work at most 0.44 of a window, p99); a too slow host or a
        # broken pacer overruns most windows (61 % at dilation 4 under load 13). The 1 % target
        # is the README's figure; a busy CI host may overrun a few prefill windows here
        assert em["overrun_fraction"] < 0.2, (pair, em)
        # each plan's bottleneck utilisation beside its results (two requests 1 s apart are
        # no steady rate: make demo's 6 requests at 0.2 req/s are what the scenario sizes)
        load = summary["load"]
        assert load["bottleneck_utilisation"] == pytest.approx(
            load["offered_rps"] / load["capacity_rps"]
        ), (pair, load)
        config = json.loads((pair_dir / "config.json").read_text())
        assert config["testbed"]["runtime"] == "docker"
        nodes = [n for n in config["testbed"]["nodes"] if not n["parked"]]
        assert all(n["device"].startswith("emulated ") for n in nodes)
        planned = {
            n: [st["start"], st["end"]]
            for st in config["plan"]["stages"]
            if st["end"] > st["start"]
            for n in st["nodes"]
        }
        assert {n["name"]: n["blocks"] for n in nodes} == planned, pair
        run_ids.add(config["testbed"]["run_id"])
    assert len(run_ids) == 1, "each plan should be loaded into the one running testbed"
    assert "loading the even plan" in out or "loading the even plan" in proc.stdout, out
    assert _labelled_containers(client) - before == set(), "compare left containers behind"
