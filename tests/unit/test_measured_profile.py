"""A measured profile (as `testbed profile` writes it) replaces the roofline estimate in plans."""

from __future__ import annotations

import json

import pytest

from testbed.cli.main import main
from testbed.cost.model import CostModel
from testbed.errors import ConfigError
from testbed.spec.devices import CATALOG, DeviceProfile
from testbed.spec.model_profile import load_measured_profile, load_model_profile
from testbed.spec.plan import RequestShape
from tests.factories import REPO


def measured(num_blocks=4, slow_block=None, **over):
    blocks = [{"prefill_s": 0.010, "decode_s": 0.001} for _ in range(num_blocks)]
    if slow_block is not None:
        blocks[slow_block] = {"prefill_s": 0.100, "decode_s": 0.010}
    d = {
        "kind": "testbed.measured-profile",
        "version": 1,
        "model": "tiny",
        "architecture": "phi3",
        "num_blocks": num_blocks,
        "dtype": "float32",
        "device": {"kind": "cpu", "name": "test-host", "threads": 2},
        "prompt_tokens": 64,
        "context_tokens": 64,
        "blocks": blocks,
        "embed": {"prefill_s": 0.0001, "decode_s": 0.00001},
        "head": {"prefill_s": 0.0002, "decode_s": 0.0002},
        "host": "h",
        "measured_at": "2026-01-01T00:00:00",
        "versions": {"torch": "x"},
    }
    d.update(over)
    return d


def test_measured_times_are_kept_on_the_measuring_device_and_scaled_elsewhere(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(measured(slow_block=2)))
    m = load_measured_profile(p)
    cost = CostModel(load_model_profile("tiny", dtype="float32"), m)
    from testbed.cost.model import measuring_device

    ref = measuring_device(m)
    shape = RequestShape(prompt_tokens=64, output_tokens=2)  # one decode step at context 64
    t = cost.block_request_times(ref, shape)
    assert t[0] == pytest.approx(0.010 + 0.001)
    assert t[2] == pytest.approx(0.100 + 0.010)  # the measured slow block stays slow
    half = DeviceProfile(**{**ref.model_dump(), "cpus": 1.0})
    assert cost.block_request_times(half, shape)[2] > t[2]
    assert cost.source.startswith("measured:")


def test_plan_with_measured_profile_moves_cut_around_slow_block(tmp_path, capsys):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(measured(slow_block=3)))
    argv = [
        "plan",
        str(REPO / "topologies/tiny.yaml"),
        "--model",
        "tiny",
        "--dtype",
        "float32",
        "--json",
        "--prompt-tokens",
        "64",
        "--output-tokens",
        "8",
    ]
    main([*argv, "--profile", str(p)])
    plan = json.loads(capsys.readouterr().out)
    assert plan["cost_source"].startswith("measured:")
    main(argv)
    roof = json.loads(capsys.readouterr().out)
    assert roof["cost_source"] == "roofline"
    assert plan["bottleneck_s"] != roof["bottleneck_s"]


def test_measured_profile_must_match_the_model(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(measured(num_blocks=6)))
    with pytest.raises(ConfigError, match="6 blocks but the model has 4"):
        CostModel(load_model_profile("tiny"), load_measured_profile(p))


def test_malformed_measured_profile(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(measured(blocks=[{"prefill_s": 0.1, "decode_s": 0.1}])))
    with pytest.raises(ConfigError, match="num_blocks"):
        load_measured_profile(p)
    p.write_text(json.dumps(measured(device={"kind": "tpu", "name": "x", "threads": 1})))
    with pytest.raises(ConfigError, match=r"device\.kind"):
        load_measured_profile(p)


def test_catalog_devices_are_valid():
    for fields in CATALOG.values():
        assert DeviceProfile(**fields).effective_flops > 0
