"""What a model folder says about itself, read from its JSON files (no torch import)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("phi3", "llama", "qwen2", "mistral")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder says about itself (read from config.json, no weights loaded)."""

    path: str
    name: str  # folder name
    model_type: str  # "phi3", "llama", ...
    architecture: str  # e.g. "Phi3ForCausalLM"
    num_blocks: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    checkpoint_dtype: str
    eos_token_ids: tuple[int, ...]


def read_model_info(model_dir: str | Path) -> ModelInfo:
    """Read a model folder's config.json (and generation_config.json for the EOS ids)."""
    root = Path(model_dir)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(
            "no config.json here; pass a Hugging Face model folder "
            "(make one with `testbed model make-tiny DIR`)",
            source=str(root),
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config.json is not valid JSON: {exc}", source=str(root)) from exc
    model_type = str(cfg.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}",
            source=str(cfg_path),
            field="model_type",
        )
    eos: Any = cfg.get("eos_token_id")
    gen_path = root / "generation_config.json"
    if gen_path.is_file():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc}", source=str(gen_path)) from exc
    eos_ids: tuple[int, ...]
    if eos is None:
        eos_ids = ()
    elif isinstance(eos, list):
        eos_ids = tuple(int(e) for e in eos)
    else:
        eos_ids = (int(eos),)
    archs = cfg.get("architectures") or [f"{model_type}ForCausalLM"]
    return ModelInfo(
        path=str(root.resolve()),
        name=root.resolve().name,
        model_type=model_type,
        architecture=str(archs[0]),
        num_blocks=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        checkpoint_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        eos_token_ids=eos_ids,
    )
