"""Reading a stage's weights: device and dtype choice, and the safetensors checkpoint index.

Only the tensors of the stage's own modules are read (one memory-mapped file at a time), cast
to the stage's dtype and moved to its device; pickled ``.bin`` checkpoints are never read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from testbed.errors import ConfigError

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when present, else CPU."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"not a torch device: {device!r} (use cpu or cuda[:N])") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """`auto`: the checkpoint's dtype on CUDA, float32 on CPU (fast and exact there)."""
    if dtype in (None, "auto"):
        if device.type == "cuda" and checkpoint_dtype in _DTYPES:
            return _DTYPES[checkpoint_dtype]
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class SafetensorsIndex:
    """Which file holds which tensor, for single-file and sharded checkpoints."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "model.safetensors.index.json"
        single = root / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of: dict[str, Path] = {k: root / v for k, v in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            raise ConfigError(
                "no model.safetensors or model.safetensors.index.json; only safetensors "
                "checkpoints are read (never pickled .bin files)",
                source=str(root),
            )

    def load(self, names: Iterable[str], device: torch.device, dtype: torch.dtype) -> dict:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.file_of:
                raise ConfigError(f"checkpoint has no tensor {name!r}", source=str(self.root))
            by_file.setdefault(self.file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    src = t
                    if t.is_floating_point():
                        t = t.to(dtype)
                    t = t.to(device)
                    if t is src:  # still the file's memory map: page cache pressure would
                        t = t.clone()  # evict it and turn every step into disk reads
                    out[key] = t
        return out


def load_modules(
    root: Path,
    modules: Sequence[tuple[str, nn.Module]],
    config: Any,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Fill each (checkpoint prefix, meta-device module) from the checkpoint in ``root``.

    A tied LM head (``tie_word_embeddings``) without its own tensor reads the embedding's.
    """
    index = SafetensorsIndex(root)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for prefix, module in modules:
        wanted = {prefix + k: k for k in module.state_dict()}
        source = dict(wanted)
        if prefix == "lm_head." and "lm_head.weight" not in index.file_of and tied:
            source = {"model.embed_tokens.weight": "weight"}
        tensors = index.load(source, device, dtype)
        state = {source[k]: v for k, v in tensors.items()}
        module.load_state_dict(state, strict=True, assign=True)
        for name, p in [*module.named_parameters(), *module.named_buffers()]:
            if p.is_meta:
                raise ConfigError(f"{prefix}{name} was not loaded", source=str(root))
        module.eval()
