"""Shared fixtures. Keep this small: factories live in tests/factories.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_model(arch="phi3", **sizes)`` -> a generated HF model folder.

    Each distinct argument set is generated once per session (about a second, ~1 MB).
    """
    made: dict[tuple[tuple[str, Any], ...], Path] = {}

    def make(arch: str = "phi3", **kwargs: Any) -> Path:
        from testbed.model.tiny import make_tiny_model

        key = (("arch", arch), *sorted(kwargs.items()))
        if key not in made:
            name = "-".join(f"{v}" for _, v in key)
            made[key] = make_tiny_model(tmp_path_factory.mktemp(f"model-{name}"), arch, **kwargs)
        return made[key]

    return make
