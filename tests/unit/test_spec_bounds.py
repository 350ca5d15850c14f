"""Unit tests for the bounds and checks behind the hostile-input corpus (issue 10)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from testbed.errors import ConfigError, brief
from testbed.metrics.summary import failure_kind, summarize
from testbed.partition import PARTITIONERS
from testbed.registry import _type_problem
from testbed.schedule import SCHEDULERS
from testbed.spec.loading import MAX_VALUES, parse_text, read_mapping
from testbed.spec.topology import MAX_NODES, topology_from_dict
from testbed.workload.knobs import Knobs, apply_knobs
from testbed.workload.request import TraceRow
from tests.factories import topology_dict


def test_yaml_merge_keys_still_override_without_a_duplicate_error():
    data = parse_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n", "f.yaml", as_json=False)
    assert data["other"] == {"x": 1, "y": 3}


def test_duplicate_key_names_the_line():
    with pytest.raises(
        ConfigError, match=r"f\.yaml:3: key 'b' appears twice in one mapping \(first at line 2\)"
    ):
        parse_text("a: 1\nb: 2\nb: 3\n", "f.yaml", as_json=False)


def test_duplicate_json_key_is_refused():
    with pytest.raises(ConfigError, match="'a' appears twice"):
        parse_text('{"a": 1, "a": 2}', "c.json", as_json=True)


def test_alias_bomb_is_refused_without_expanding_it():
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
    )
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"more than {MAX_VALUES:,} values"):
        parse_text(text, "bomb.yaml", as_json=False)
    assert time.perf_counter() - t0 < 5


def test_a_few_aliases_are_fine():
    text = "gpu: &g {base: rtx-3090, mem: 20GiB}\nnodes: [" + ", ".join(["*g"] * 100) + "]\n"
    assert len(parse_text(text, "ok.yaml", as_json=False)["nodes"]) == 100


def test_special_files_are_not_read(tmp_path: Path):
    with pytest.raises(ConfigError, match="not a regular file"):
        read_mapping("/dev/zero", "topology")


def test_brief_bounds_any_value():
    nested: list[object] = [1]
    for _ in range(40):
        nested = [nested, nested]  # 2**40 leaves if expanded
    assert len(brief(nested)) <= 80
    assert len(brief("x" * 10**7)) <= 80


def test_node_name_check_is_linear():
    d = topology_dict(tiers=2, nodes_per_tier=1)
    d["tiers"][0]["nodes"] = [{"name": "n", "device": "cpu-core", "count": MAX_NODES - 1}]
    t0 = time.perf_counter()
    topo = topology_from_dict(d)
    assert len(topo.nodes()) == MAX_NODES
    assert time.perf_counter() - t0 < 5  # the quadratic check took minutes at this size


def test_count_over_the_limit_is_refused_before_building():
    d = topology_dict(tiers=2, nodes_per_tier=1)
    d["tiers"][1]["nodes"][0]["count"] = 10**12
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.nodes\[0\]\.count"):
        topology_from_dict(d)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(True, True), ("maybe", False), ("true", False), (1, False)],
)
def test_strict_bool_parameters(value, ok):
    bsdp = PARTITIONERS.get("bsdp")
    assert (_type_problem(bsdp, "include_transfer", value) is None) is ok


def test_strict_int_and_finite_float_parameters():
    rnd, arts = SCHEDULERS.get("random"), SCHEDULERS.get("arts")
    assert _type_problem(rnd, "seed", "5") is not None
    assert _type_problem(rnd, "seed", 5) is None
    assert _type_problem(arts, "alpha", float("nan")) is not None
    assert _type_problem(arts, "alpha", 1) is None  # an int is a fine float


def _rows(*lengths: tuple[int, int]) -> list[TraceRow]:
    return [TraceRow(i + 2, float(i), p, o) for i, (p, o) in enumerate(lengths)]


def test_context_clip_fits_every_request_and_counts_it(caplog):
    reqs, stats = apply_knobs(
        _rows((100, 10), (3000, 10), (5000, 5000), (10, 10)), Knobs(context_tokens=2048)
    )
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [
        (100, 10),
        (2039, 10),
        (1, 2048),
        (10, 10),
    ]
    assert all(r.prompt_tokens + r.output_tokens - 1 <= 2048 for r in reqs)
    assert stats.context_clipped == 2


def test_context_clip_is_announced(tmp_path: Path, caplog):
    from testbed.workload import load_workload, parse_workload_spec

    spec = parse_workload_spec(
        {
            "kind": "synthetic",
            "rate_rps": 1,
            "num_requests": 3,
            "prompt_tokens": 3000,
            "output_tokens": 8,
        }
    ).with_context(2048)
    with caplog.at_level(logging.WARNING):
        wl = load_workload(spec, tmp_path)
    assert wl.stats.context_clipped == 3
    assert "3 of 3 requests clipped to the model's context window of 2048" in caplog.text


def test_failure_reasons_group_without_the_request_id():
    assert failure_kind("node fog-1: request 'r1a-17-0': 3000 tokens", 17) == (
        "node fog-1: request <request>: 3000 tokens"
    )
    assert failure_kind("prefill step of 'r1a-4-2' timed out", 4) == (
        "prefill step of <request> timed out"
    )
    assert failure_kind("request 9 is already routed", 9) == "request <id> is already routed"
    assert failure_kind("node edge-17-1 down", 3) == "node edge-17-1 down"  # not its id
    assert failure_kind(None, 1) == "unknown"


def test_summary_groups_identical_failures():
    from testbed.metrics.records import RequestRecord

    recs = [
        RequestRecord(
            request_id=i,
            arrival_s=0.0,
            prompt_tokens=1,
            output_tokens=1,
            status="failed",
            reason=f"prefill step of 'run-{i}-0' timed out",
        )
        for i in range(5)
    ]
    s = summarize(recs)
    assert s.failed_by_reason == {"prefill step of <request> timed out": 5}
    assert Counter(r.reason for r in recs).most_common(1)[0][1] == 1  # records keep the id


def test_shipped_files_have_no_duplicate_keys():
    root = Path(__file__).resolve().parents[2]
    for p in [*root.glob("topologies/*.yaml"), *root.glob("scenarios/*.yaml")]:
        read_mapping(p, "spec")
        yaml.safe_load(p.read_text())


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[1, 2]", ["mapping"]),
        (b'{"model_type": "phi3", "x": "\xff"}', ["UTF-8"]),
        (b'{"model_type": "phi3", "num_hidden_layers": "4"}', ["num_hidden_layers"]),
        (b'{"model_type": "phi3", "num_hidden_layers": 100000000}', ["num_hidden_layers"]),
    ],
)
def test_model_info_reads_config_json_as_the_planner_does(tmp_path: Path, content, words):
    """`stage serve` and the executor read config.json through model/info.py (torch-free)."""
    from testbed.model.info import read_model_info

    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        read_model_info(tmp_path)
    assert "config.json" in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_model_info_eos_ids_are_strict(tmp_path: Path):
    import json

    from testbed.model.info import read_model_info
    from testbed.spec.model_profile import PRESETS

    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["tiny"], "eos_token_id": [2]}))
    assert read_model_info(tmp_path).eos_token_ids == (2,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(ConfigError, match="eos_token_id"):
        read_model_info(tmp_path)
