"""Read YAML/JSON files and turn validation failures into errors a new user can act on.

Every message is one line naming the file, the field path (``tiers[0].nodes[1].device.mem``),
the bad value (cut to ~80 characters) and the fix; unknown keys get a "did you mean" from the
model's own field names. The same formatter serves topologies, scenarios, workloads and model
configs.

A file is bounded before anything is built from it: at most :data:`MAX_FILE_BYTES`, nested at
most :data:`MAX_DEPTH` levels, at most :data:`MAX_VALUES` values once YAML aliases are expanded
(a "billion laughs" file is refused after one pass over its events), no key twice in a mapping.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from testbed.errors import ConfigError, brief

M = TypeVar("M")

MAX_FILE_BYTES = 4 * 2**20  # a spec file; the largest shipped one is a few KiB
MAX_DEPTH = 32  # nested mappings/lists
MAX_VALUES = 200_000  # scalars + collections after alias expansion
MAX_PROBLEMS = 3  # validation problems spelled out in one message ("and N more")
_MAX_MSG = 300  # characters of one problem's explanation

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: fast


class _Loader(_Base):
    """Safe loader that refuses a key written twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(key_node.value, line, first[key])
            first[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _check_events(text: str, source: str) -> None:
    """One pass over the YAML events (no objects built): depth and expanded size."""
    anchors: dict[str, int] = {}
    stack: list[list[Any]] = []  # [values so far, anchor] per open collection
    total = 0

    def add(n: int, mark: Any) -> None:
        nonlocal total
        if stack:
            stack[-1][0] += n
            grown = stack[-1][0]
        else:
            total += n
            grown = total
        if grown > MAX_VALUES:
            raise ConfigError(
                f"line {mark.line + 1}: holds more than {MAX_VALUES:,} values once its YAML "
                "aliases (*name) are expanded; write the values out or use fewer aliases",
                source=source,
            )

    for ev in yaml.parse(text, Loader=_Base):
        if isinstance(ev, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise ConfigError(
                    f"line {ev.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels; "
                    "a spec file is a few levels deep, check the indentation and brackets",
                    source=source,
                )
            stack.append([1, ev.anchor])
        elif isinstance(ev, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            n, anchor = stack.pop()
            if anchor is not None:
                anchors[anchor] = n
            add(n, ev.start_mark)
        elif isinstance(ev, yaml.ScalarEvent):
            if ev.anchor is not None:
                anchors[ev.anchor] = 1
            add(1, ev.start_mark)
        elif isinstance(ev, yaml.AliasEvent):
            add(anchors.get(ev.anchor or "", 1), ev.start_mark)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {brief(k)} appears twice in one object; keep one")
        out[k] = v
    return out


def _json_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {brief(text)} is out of range; write a finite number")
    return v


def _json_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a number here; write a finite number")


def load_text(path: str | Path, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """The file as UTF-8 text, refused (not read) when larger than ``limit`` bytes."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} file not found; check the path", source=str(p))
    if p.is_dir():
        raise ConfigError(f"is a folder, expected a {what} file", source=str(p))
    if not p.is_file():
        raise ConfigError(f"is not a regular file, expected a {what} file", source=str(p))
    try:
        with p.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} file: {exc.strerror or exc}", source=str(p)
        ) from None
    if len(raw) > limit:
        raise ConfigError(
            f"{what} file is larger than {limit // 2**20} MiB; a spec file is a few KiB, "
            "check that this is the right file",
            source=str(p),
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"line {line}: byte {exc.start} ({raw[exc.start : exc.start + 1]!r}) is not UTF-8 "
            "text; save the file as UTF-8",
            source=str(p),
        ) from None


def parse_text(text: str, source: str, *, as_json: bool) -> Any:
    """Parse YAML (bounded, duplicate keys refused) or JSON (duplicates, NaN, inf refused)."""
    try:
        if as_json:
            return json.loads(
                text,
                object_pairs_hook=_json_pairs,
                parse_float=_json_float,
                parse_constant=_json_constant,
            )
        _check_events(text, source)
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as exc:
        raise ConfigError(
            f"key {brief(exc.key)} appears twice in one mapping (first at line {exc.first}); "
            "YAML keeps only the last, keep one",
            source=f"{source}:{exc.line}",
        ) from None
    except RecursionError:
        raise ConfigError(
            f"nested deeper than {MAX_DEPTH} levels; check the brackets", source=source
        ) from None
    except (yaml.YAMLError, ValueError) as exc:
        kind = "JSON" if as_json else "YAML"
        text_ = " ".join(str(exc).split())
        raise ConfigError(f"not valid {kind}: {text_[:_MAX_MSG]}", source=source) from None


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Load a YAML (or ``.json``) file that must hold a mapping at top level."""
    p = Path(path)
    data = parse_text(load_text(p, what), str(p), as_json=p.suffix == ".json")
    if data is None:
        raise ConfigError(f"{what} file is empty", source=str(p))
    if not isinstance(data, dict):
        raise ConfigError(
            f"a {what} file must be a mapping of keys, got {type(data).__name__}", source=str(p)
        )
    return data


# --- validation errors ---------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    out: list[type[BaseModel]] = []
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            out.append(a)
        else:
            stack.extend(reversed(typing.get_args(a)))  # keeps the declared order
    return out


def _field(model: type[BaseModel], key: Any) -> Any:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def _tags(model: type[BaseModel], field: str | None = None) -> list[Any]:
    """Literal values of ``model``'s fields (of ``field`` only, if given): union tags."""
    out: list[Any] = []
    for name, f in model.model_fields.items():
        if field is not None and field not in (name, f.alias):
            continue
        if typing.get_origin(f.annotation) is typing.Literal:
            out.extend(typing.get_args(f.annotation))
    return out


def _walk_shown(roots: list[type[BaseModel]], loc: tuple[Any, ...]) -> str:
    shown = ""
    cands = list(roots)
    for part in loc:
        if isinstance(part, int):
            shown += f"[{part}]"
            continue
        owners = [m for m in cands if _field(m, part) is not None]
        if owners:
            cands = [x for m in owners for x in _models_in(_field(m, part).annotation)]
        elif cands and any(part in _tags(m) for m in cands):
            cands = [m for m in cands if part in _tags(m)]
            continue
        elif "[" in str(part) and "]" in str(part):
            continue
        shown += ("." if shown else "") + str(part)
    return shown


def _owners(roots: list[type[BaseModel]], loc: tuple[Any, ...]) -> list[type[BaseModel]]:
    cands = list(roots)
    for part in loc:
        if isinstance(part, int):
            continue
        owners = [m for m in cands if _field(m, part) is not None]
        if owners:
            cands = [x for m in owners for x in _models_in(_field(m, part).annotation)]
        elif any(part in _tags(m) for m in cands):
            cands = [m for m in cands if part in _tags(m)]
    return cands


def _explain(err: Any, roots: list[type[BaseModel]], prefix: tuple[Any, ...]) -> str:
    loc = tuple(err["loc"])
    field = _walk_shown(roots, loc)
    field = ".".join(str(p) for p in prefix) + ("." if prefix and field else "") + field
    field = field.replace(".[", "[") or "(top level)"
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        owner_field = _walk_shown(roots, loc[:-1])
        field = ".".join(str(p) for p in prefix) + ("." if prefix and owner_field else "")
        field = (field + owner_field).replace(".[", "[") or "(top level)"
        known = sorted(
            {f.alias or n for m in _owners(roots, loc[:-1]) for n, f in m.model_fields.items()}
        )
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
        return f"{field}: unknown field {brief(key)}; {hint}"
    if kind == "missing":
        return f"{field}: required field is missing; add it"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        disc = str(ctx.get("discriminator", "")).strip("'")
        tags = list(dict.fromkeys(str(t) for m in _owners(roots, loc) for t in _tags(m, disc)))
        choices = ", ".join(tags) or str(ctx.get("expected_tags", "")).replace("'", "")
        if kind == "union_tag_not_found":
            return f"{field}: missing {disc!r}; use one of {choices}"
        return f"{field}: {disc} must be one of {choices} (got {brief(ctx.get('tag'))})"
    msg = " ".join(str(err["msg"]).removeprefix("Value error, ").split())
    if len(msg) > _MAX_MSG:
        msg = msg[: _MAX_MSG - 3] + "..."
    if "input" in err and not isinstance(err["input"], dict):
        shown = brief(err["input"])
        if shown not in msg:
            msg += f" (got {shown})"
    return msg if field == "(top level)" else f"{field}: {msg}"


def _without_echoes(errs: list[Any]) -> list[Any]:
    """Drop pydantic's "too short" for a sequence whose items failed: it counts only the items
    that validated, so one bad node of a one-node tier also reads as an empty tier."""
    failed_under = {tuple(e["loc"][:i]) for e in errs for i in range(len(e["loc"]))}
    kept = [e for e in errs if not (e["type"] == "too_short" and tuple(e["loc"]) in failed_under)]
    return kept or errs


def format_errors(
    exc: ValidationError, roots: list[type[BaseModel]], prefix: tuple[Any, ...] = ()
) -> str:
    """Every problem of ``exc`` on one line (the first :data:`MAX_PROBLEMS` spelled out)."""
    errs = _without_echoes(exc.errors(include_url=False))
    lines = [_explain(e, roots, prefix) for e in errs[:MAX_PROBLEMS]]
    if len(errs) == 1:
        return lines[0]
    more = f"; and {len(errs) - MAX_PROBLEMS} more" if len(errs) > MAX_PROBLEMS else ""
    return f"{len(errs)} problems: " + "; ".join(lines) + more


# Validation from files: bare numbers where a unit is needed are refused (see quantities).
FILE_CONTEXT = {"units_required": True}


def validate(
    model: type[M] | TypeAdapter[M],
    data: Any,
    source: str,
    prefix: tuple[Any, ...] = (),
    *,
    roots: list[type[BaseModel]] | None = None,
    from_file: bool = True,
) -> M:
    """Validate ``data`` (from a file) as ``model`` (a pydantic model, or a TypeAdapter with the
    ``roots`` models it may produce); errors become one ConfigError naming the file, the field
    path, the bad value and the fix. ``from_file=False`` (a dict built in Python) lets
    quantities be bare numbers in their base unit."""
    ctx = {**(FILE_CONTEXT if from_file else {}), "source": source}
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(data, context=ctx)
        return model.model_validate(data, context=ctx)  # type: ignore[attr-defined]
    except ValidationError as exc:
        if roots is None:
            roots = [model] if isinstance(model, type) and issubclass(model, BaseModel) else []
        raise ConfigError(format_errors(exc, roots, prefix), source=source) from None
