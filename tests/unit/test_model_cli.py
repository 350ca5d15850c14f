"""`testbed model make-tiny` and `testbed profile` from the command line."""

from __future__ import annotations

import json

import pytest

from testbed.cli.main import main

pytestmark = pytest.mark.model


def test_make_tiny_cli_writes_a_loadable_folder(tmp_path, capsys):
    main(["model", "make-tiny", str(tmp_path / "m"), "--arch", "llama", "--layers", "2"])
    assert "LlamaForCausalLM, 2 blocks" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["model_type"] == "llama"


def test_make_tiny_cli_rejects_bad_options_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["model", "make-tiny", str(tmp_path / "m"), "--arch", "gpt2"])
    assert exc.value.code == 2
    assert "unknown architecture 'gpt2'" in capsys.readouterr().err


def test_profile_writes_a_measured_profile_the_planner_accepts(tiny_model, tmp_path, capsys):
    from testbed.spec.model_profile import load_measured_profile

    out = tmp_path / "prof.json"
    main(["profile", str(tiny_model("phi3")), "--prompt-tokens", "8", "--context-tokens", "16",
          "--repeats", "1", "--device", "cpu", "--out", str(out)])  # fmt: skip
    prof = load_measured_profile(out)
    assert prof.num_blocks == 4 and len(prof.blocks) == 4
    assert prof.device.kind == "cpu" and prof.prompt_tokens == 8 and prof.context_tokens == 16
    assert all(b.prefill_s > 0 and b.decode_s > 0 for b in prof.blocks)
    assert prof.head.decode_s > 0 and prof.embed.prefill_s > 0
    assert "torch" in prof.versions and prof.architecture == "Phi3ForCausalLM"
    data = json.loads(out.read_text())
    assert data["kind"] == "testbed.measured-profile" and data["version"] == 1


def test_profile_refuses_a_context_past_the_model(tiny_model, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", str(tiny_model("phi3")), "--context-tokens", "999999"])
    assert exc.value.code == 2
    assert "exceeds the model's context" in capsys.readouterr().err
