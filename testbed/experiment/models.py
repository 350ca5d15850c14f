"""The weights a run executes: a local Hugging Face folder, or the generated tiny model, made
once into the cache folder (:func:`testbed.paths.cache_dir`) and shared by every command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError
from testbed.paths import cache_dir
from testbed.spec.scenario import LoadedScenario

TINY_MODEL_ARGS: dict[str, Any] = {"arch": "phi3", "size": "tiny", "seed": 0}


def tiny_model_dir() -> Path:
    """``<cache>/models/tiny-<hash>``: the generated CI model, keyed by its arguments."""
    key = hashlib.sha256(json.dumps(TINY_MODEL_ARGS, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "models" / f"tiny-{key}"


def ensure_tiny_model() -> Path:
    """Generate the tiny model once (atomically: concurrent callers never see half a folder)."""
    dest = tiny_model_dir()
    if (dest / "config.json").exists():
        return dest
    from testbed.model.tiny import make_tiny_model

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        make_tiny_model(
            tmp, TINY_MODEL_ARGS["arch"], size=TINY_MODEL_ARGS["size"], seed=TINY_MODEL_ARGS["seed"]
        )
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def model_folder(model: str, *, field: str = "--model") -> Path:
    """A local Hugging Face folder, or ``tiny`` (the cached generated model)."""
    p = Path(model)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(
                f"{p} has no config.json; give a Hugging Face model folder", field=field
            )
        return p.resolve()
    if model == "tiny":
        return ensure_tiny_model()
    raise ConfigError(
        f"{model!r} is not a model folder; stages load real weights: give a local Hugging Face "
        "folder or `tiny` (the generated test model)",
        field=field,
    )


def resolve_model_dir(loaded: LoadedScenario) -> Path:
    """The weights the stages execute: ``model_dir``, the model if it is a folder, or the
    generated tiny model for ``model: tiny``."""
    spec = loaded.spec
    if spec.model_dir is not None:
        return loaded.resolve(spec.model_dir)
    as_path = loaded.resolve(Path(spec.model))
    if (as_path / "config.json").exists():
        return as_path
    if spec.model == "tiny":
        return ensure_tiny_model()
    raise ConfigError(
        f"model {spec.model!r} is a planning preset without weights; to replay, set model_dir to a "
        "local Hugging Face folder of that model (or use model: tiny)",
        source=str(loaded.path),
        field="model_dir",
    )


def model_source(loaded: LoadedScenario) -> str | Path:
    """Where the studied model's profile is read from without weights: ``model_dir``, the
    model if it is a folder, else the model as a planning preset's name."""
    spec = loaded.spec
    if spec.model_dir is not None:
        return loaded.resolve(spec.model_dir)
    folder = loaded.resolve(Path(spec.model))
    return folder if (folder / "config.json").exists() else spec.model


def special_token_ids(model_dir: Path) -> list[int]:
    """BOS/EOS/PAD ids from config.json (prompts avoid them)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return []
    out: list[int] = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        out += [int(x) for x in v] if isinstance(v, list) else ([int(v)] if v is not None else [])
    return sorted(set(out))
