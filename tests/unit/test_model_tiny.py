"""Generated model folders load with the stock Hugging Face loaders, deterministically."""

from __future__ import annotations

import hashlib

import pytest

from testbed.errors import ConfigError
from testbed.model.tiny import make_tiny_model

pytestmark = pytest.mark.model


@pytest.mark.parametrize("arch", ["phi3", "llama", "qwen2"])
def test_generated_folder_loads_with_auto_classes(tiny_model, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(path)  # warnings are errors here
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    assert len(tok) == model.config.vocab_size == 512
    assert 0 <= model.config.pad_token_id < model.config.vocab_size
    ids = tok("Once upon a time the river ran")["input_ids"]
    assert tok.decode(ids) == "Once upon a time the river ran"
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 3_000_000  # "tiny": a few MB at most


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model):
    first = tiny_model("phi3")
    again = make_tiny_model(tmp_path / "again", "phi3")
    other = make_tiny_model(tmp_path / "other", "phi3", seed=1)

    def digest(p):
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    assert digest(first) == digest(again)
    assert digest(first) != digest(other)


def test_overrides_change_the_shape(tmp_path):
    import json

    p = make_tiny_model(tmp_path / "m", "llama", layers=2, hidden_size=32, heads=2, kv_heads=1)
    cfg = json.loads((p / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (2, 32, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "gpt2"}, "unknown architecture"),
        ({"size": "huge"}, "unknown size"),
        ({"hidden_size": 60, "heads": 8}, "not a multiple of heads"),
        ({"heads": 4, "kv_heads": 3}, "not a multiple of kv heads"),
        ({"vocab_size": 100}, "too small"),
        ({"layers": 0}, ">= 1"),
    ],
)
def test_bad_shapes_are_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_tiny_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m" / "config.json").exists()
