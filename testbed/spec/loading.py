"""Read YAML/JSON files and turn validation failures into errors a new user can act on.

Every message names the file, the field path (``tiers[0].nodes[1].device.mem``), the bad value
and the fix; unknown keys get a "did you mean" from the model's own field names.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from testbed.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Load a YAML (or JSON) file that must hold a mapping at top level."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} file not found; check the path", source=str(p))
    if p.is_dir():
        raise ConfigError(f"is a folder, expected a {what} YAML file", source=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file: {exc}", source=str(p)) from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}", source=str(p)
        ) from None
    if data is None:
        raise ConfigError(f"{what} file is empty", source=str(p))
    if not isinstance(data, dict):
        raise ConfigError(
            f"a {what} file must be a mapping of keys, got {type(data).__name__}", source=str(p)
        )
    return data


def _loc_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a validation location through nested models to find the model owning the last key."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            # part may be a union tag; keep current
            continue
        ann = fields[part].annotation
        current = None
        stack = [ann]
        while stack:
            a = stack.pop()
            if isinstance(a, type) and issubclass(a, BaseModel):
                current = a
                break
            stack.extend(typing.get_args(a))
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def validate(model: type[M], data: Any, source: str, prefix: tuple[Any, ...] = ()) -> M:
    """``model.model_validate(data)`` with errors rewritten as one ConfigError naming every problem."""
    try:
        return model.model_validate(data, context={"source": source})
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = prefix + tuple(err["loc"])
            # drop pydantic's union/function tags like 'function-after[...]'
            loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p and "]" in p)))
            field = _loc_str(loc) or "(top level)"
            kind = err["type"]
            if kind == "extra_forbidden":
                key = loc[-1] if loc else "?"
                owner = _model_at(model, tuple(err["loc"])[:-1])
                known = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = (
                    f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
                )
                lines.append(f"{field}: unknown field {key!r}; {hint}")
            elif kind == "missing":
                lines.append(f"{field}: required field is missing; add it")
            else:
                msg = err["msg"]
                if msg.startswith("Value error, "):
                    msg = msg[len("Value error, ") :]
                bad = err.get("input")
                shown = "" if isinstance(bad, dict | list) else f" (got {bad!r})"
                if repr(bad) in msg:
                    shown = ""
                lines.append(f"{field}: {msg}{shown}")
        if len(lines) == 1:
            raise ConfigError(lines[0], source=source) from None
        raise ConfigError(
            f"{len(lines)} problems:\n  " + "\n  ".join(lines), source=source
        ) from None
