"""Helpers shared by CLI modules: console, key=value parameters, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml
from rich.console import Console

from testbed.errors import ConfigError

# Tables stay readable when piped (rich falls back to 80 columns without a terminal).
console = Console(width=None if Console().is_terminal else 150)
err_console = Console(stderr=True)


def parse_params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """``["alpha=0.3", "allow_empty=true"]`` -> {"alpha": 0.3, "allow_empty": True} (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r} is not KEY=VALUE; write e.g. {flag} alpha=0.3")
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
