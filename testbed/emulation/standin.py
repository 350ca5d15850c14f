"""The stand-in of a studied model: same architecture family, same number of blocks, tiny widths.

Generated once with :func:`testbed.model.tiny.make_tiny_model` (real architecture, real loading
code, random weights from a fixed seed) into the testbed's cache folder, keyed by its arguments,
so every node of every run executes the same weights and a plan's block ranges apply unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError
from testbed.spec.model_profile import ModelProfile

# Widths of every stand-in: small enough that 40 blocks run in milliseconds on one CPU core.
STANDIN_HIDDEN = 64
STANDIN_HEADS = 4
STANDIN_INTERMEDIATE = 128
STANDIN_VOCAB = 512
STANDIN_SEED = 0


def standin_args(profile: ModelProfile) -> dict[str, Any]:
    """make_tiny_model's arguments for the stand-in of ``profile``."""
    arch = profile.arch
    from testbed.model.tiny import ARCHITECTURES

    if arch.model_type not in ARCHITECTURES:
        raise ConfigError(
            f"no stand-in for architecture {arch.model_type!r}; emulation supports "
            f"{', '.join(ARCHITECTURES)}",
            field="model",
        )
    grouped = arch.num_kv_heads < arch.num_heads  # keep GQA when the studied model has it
    return {
        "arch": arch.model_type,
        "layers": arch.num_blocks,
        "hidden_size": STANDIN_HIDDEN,
        "heads": STANDIN_HEADS,
        "kv_heads": STANDIN_HEADS // 2 if grouped else STANDIN_HEADS,
        "intermediate_size": STANDIN_INTERMEDIATE,
        "vocab_size": STANDIN_VOCAB,
        "max_position_embeddings": arch.max_position_embeddings,
        "seed": STANDIN_SEED,
    }


def standin_dir(profile: ModelProfile) -> Path:
    """``<cache>/models/standin-<model>-<hash of the arguments>``."""
    from testbed.runtime.image import cache_dir

    args = standin_args(profile)
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in profile.arch.name)[:40]
    return cache_dir() / "models" / f"standin-{safe}-{key}"


def ensure_standin(profile: ModelProfile) -> Path:
    """Generate the stand-in once (atomically: concurrent callers never see half a folder)."""
    dest = standin_dir(profile)
    if (dest / "config.json").exists():
        return dest
    from testbed.model.tiny import make_tiny_model

    args = standin_args(profile)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        make_tiny_model(tmp, args.pop("arch"), size="tiny", **args)
        meta_path = tmp / "testbed-model.json"
        meta = json.loads(meta_path.read_text())
        meta["standin_for"] = profile.arch.model_dump(mode="json")
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_standin(model_dir: Path, profile: ModelProfile) -> None:
    """A given stand-in folder must have the studied model's number of blocks."""
    from testbed.model.info import read_model_info

    info = read_model_info(model_dir)
    if info.num_blocks != profile.num_blocks:
        raise ConfigError(
            f"the stand-in {str(model_dir)!r} has {info.num_blocks} blocks but "
            f"{profile.arch.name} has {profile.num_blocks}; leave model_dir unset to generate "
            "a matching stand-in",
            field="model_dir",
        )
