"""What a model folder says about itself, read from its JSON files (no torch import)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("phi3", "llama", "qwen2", "mistral")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
# Sanity bounds on config.json counts (far above any real model; checked before anything is
# sized from them).
MAX_BLOCKS = 4096
MAX_HIDDEN = 1 << 17
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 24


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
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(
            f"not valid UTF-8 JSON ({exc}); restore the model's config.json",
            source=str(cfg_path),
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(cfg_path)) from None
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"must be a JSON object, got a {type(cfg).__name__}; restore the model's config.json",
            source=str(cfg_path),
        )
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
            gen = json.loads(gen_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"not valid UTF-8 JSON: {exc}", source=str(gen_path)) from None
        if isinstance(gen, dict):
            eos = gen.get("eos_token_id", eos)
    eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_list):
        raise ConfigError(
            f"{eos!r} is not a token id or a list of them",
            source=str(cfg_path),
            field="eos_token_id",
        )
    eos_ids = tuple(eos_list)
    archs = cfg.get("architectures") or [f"{model_type}ForCausalLM"]
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ConfigError(
            f"{archs!r} is not a list of names", source=str(cfg_path), field="architectures"
        )

    def count(key: str, limit: int, default: int | None = None) -> int:
        value = cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ConfigError(
                f"{value!r} is not an integer in 1..{limit}; restore the model's config.json",
                source=str(cfg_path),
                field=key,
            )
        return value

    return ModelInfo(
        path=str(root.resolve()),
        name=root.resolve().name,
        model_type=model_type,
        architecture=archs[0],
        num_blocks=count("num_hidden_layers", MAX_BLOCKS),
        hidden_size=count("hidden_size", MAX_HIDDEN),
        vocab_size=count("vocab_size", MAX_VOCAB),
        max_position_embeddings=count("max_position_embeddings", MAX_CONTEXT, 2048),
        checkpoint_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        eos_token_ids=eos_ids,
    )
