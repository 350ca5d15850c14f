"""Name -> class registries for plug-in policies (partitioners, schedulers).

A plug-in is one small file: a frozen dataclass whose fields are its parameters, decorated with
``@PARTITIONERS.register("name")`` (or SCHEDULERS). CLI choices and contract tests read the
registry, so adding a policy touches no other file.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from testbed.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind  # "partitioner" / "scheduler", for messages
        self._package = package  # modules in this package are imported to fill the registry
        self._entries: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            if not dataclasses.is_dataclass(cls):
                raise TypeError(
                    f"{self.kind} {name!r} must be a dataclass (its fields are its parameters)"
                )
            self._entries[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self._package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self._package}.{mod.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(self.names())}"
            ) from None

    def params(self, name: str) -> list[dataclasses.Field[Any]]:
        return list(dataclasses.fields(self.get(name)))  # type: ignore[arg-type]

    def create(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        source: str | None = None,
        field: str | None = None,
    ) -> T:
        """Instantiate ``name`` with ``params``; unknown or ill-typed parameters are a ConfigError."""
        try:
            cls = self.get(name)
        except ConfigError as exc:
            raise ConfigError(str(exc), source=source, field=field) from None
        params = dict(params or {})
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        for key in params:
            if key not in known:
                raise ConfigError(
                    f"{self.kind} {name!r} has no parameter {key!r}; its parameters are: "
                    f"{', '.join(known) or '(none)'}",
                    source=source,
                    field=field,
                )
        for key, value in params.items():
            problem = _type_problem(cls, key, value)
            if problem:
                raise ConfigError(
                    f"{self.kind} {name!r}: parameter {key!r}: {problem}",
                    source=source,
                    field=field,
                )
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.kind} {name!r}: {exc}", source=source, field=field) from None

    def describe(self) -> list[dict[str, Any]]:
        """For `testbed list`: name, doc line, parameters with defaults."""
        out = []
        for name in self.names():
            cls = self._entries[name]
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            ps = []
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                if not f.init:  # running state (a scheduler's counters, RNG), not a parameter
                    continue
                default = f.default if f.default is not dataclasses.MISSING else None
                ps.append({"name": f.name, "default": default})
            out.append({"name": name, "doc": doc, "params": ps})
        return out


def _type_problem(cls: type, key: str, value: Any) -> str | None:
    """Why ``value`` does not fit the declared type of parameter ``key`` (strictly: no "maybe"
    for a bool, no "5" for an int, no NaN or inf for a float), or None."""
    import math
    import typing

    from testbed.errors import brief

    hint = typing.get_type_hints(cls).get(key)
    allowed = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool):
            return None
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None if math.isfinite(value) else f"{brief(value)} is not a finite number"
        if t is str and isinstance(value, str):
            return None
        if t not in (bool, int, float, str, type(None)):
            return None  # a type this check does not know: left to the class
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    wanted = " or ".join(words.get(t, "null") for t in allowed)
    return f"{brief(value)} is not {wanted}; write {wanted} (no quotes around numbers or booleans)"
