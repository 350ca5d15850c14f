"""Factories for topologies and scenarios (instead of copy-pasted fixtures)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from testbed.spec.topology import Topology, topology_from_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces"


def topology_dict(
    tiers: int = 3,
    nodes_per_tier: int = 2,
    device: Any = "rtx-3090",
    bandwidth: str = "100Mbit",
    delay: str = "10ms",
) -> dict[str, Any]:
    names = ["edge", "fog", "cloud"] + [f"tier{j}" for j in range(3, tiers)]
    names = names[:tiers]
    return {
        "name": "t",
        "tiers": [
            {
                "name": n,
                "nodes": [
                    {"name": f"{n}-{k}", "device": copy.deepcopy(device)}
                    for k in range(nodes_per_tier)
                ],
            }
            for n in names
        ],
        "links": [
            {"from": names[j], "to": names[j + 1], "bandwidth": bandwidth, "delay": delay}
            for j in range(tiers - 1)
        ],
    }


def topology(**kw: Any) -> Topology:
    return topology_from_dict(topology_dict(**kw))


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def scenario_dict(topology_path: str = "topo.yaml", **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "s",
        "topology": topology_path,
        "model": "tiny",
        "partitioner": "bsdp",
        "scheduler": {"name": "arts", "params": {"alpha": 0.3}},
        "workload": {
            "kind": "synthetic",
            "rate_rps": 2,
            "num_requests": 5,
            "prompt_tokens": 16,
            "output_tokens": 4,
        },
    }
    d.update(over)
    return d


def shipped_scenario(
    tmp: Path,
    name: str,
    *,
    topology: Path | None = None,
    workload: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    """``scenarios/NAME.yaml`` rewritten as ``tmp/scenario.yaml`` for a test: its topology
    (or ``topology``) and trace as absolute paths, ``workload`` merged into its workload,
    ``top`` over its top-level fields, results under ``tmp/results``."""
    base = REPO / "scenarios"
    data = yaml.safe_load((base / f"{name}.yaml").read_text())
    data["topology"] = str(topology or Path(os.path.normpath(base / data["topology"])))
    if "path" in data["workload"]:
        data["workload"]["path"] = str(base / data["workload"]["path"])
    data["workload"].update(workload or {})
    data["output"] = str(tmp / "results")
    data.update(top)
    return write_yaml(tmp / "scenario.yaml", data)


def reference_generate(path: Path | str, prompt: list[int], new_tokens: int) -> list[int]:
    """The whole model's greedy ``generate`` (prompt + new tokens): what a pipeline's tokens
    must equal."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    return list(out[0].tolist())
