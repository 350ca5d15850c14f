"""What a model folder says about itself, read from its JSON files (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError, brief
from testbed.spec.loading import read_mapping
from testbed.spec.model_profile import arch_from_hf_config, read_hf_config

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


def _eos_ids(value: Any, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if len(items) > 64 or not all(isinstance(e, int) and not isinstance(e, bool) for e in items):
        raise ConfigError(
            f"must be a token id or a list of token ids, got {brief(value)}",
            source=source,
            field="eos_token_id",
        )
    return tuple(items)


def read_model_info(model_dir: str | Path) -> ModelInfo:
    """Read a model folder's config.json (and generation_config.json for the EOS ids); the
    config is checked as the planner checks it (types, ranges, heads vs hidden size)."""
    root = Path(model_dir)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(
            "no config.json here; pass a Hugging Face model folder "
            "(make one with `testbed model make-tiny DIR`)",
            source=str(root),
        )
    cfg = read_hf_config(cfg_path)
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type {brief(model_type)} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}",
            source=str(cfg_path),
            field="model_type",
        )
    arch = arch_from_hf_config(cfg, root.name, str(cfg_path))
    eos = _eos_ids(cfg.get("eos_token_id"), str(cfg_path))
    gen_path = root / "generation_config.json"
    if gen_path.is_file():
        gen = read_mapping(gen_path, "generation config")
        if "eos_token_id" in gen:
            eos = _eos_ids(gen["eos_token_id"], str(gen_path))
    archs = cfg.get("architectures") or [f"{model_type}ForCausalLM"]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return ModelInfo(
        path=str(root.resolve()),
        name=root.resolve().name,
        model_type=model_type,
        architecture=str(archs[0]) if isinstance(archs, list) else str(archs),
        num_blocks=arch.num_blocks,
        hidden_size=arch.hidden_size,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        checkpoint_dtype=str(dtype),
        eos_token_ids=eos,
    )
