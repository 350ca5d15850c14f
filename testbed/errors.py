"""The testbed's error hierarchy.

Every error the testbed raises on purpose derives from :class:`TestbedError`; each subclass
also derives from the matching built-in so callers can catch either (``except ValueError``
works for a bad config, ``except TimeoutError`` for a stage timeout).
Messages name the file, the field, the bad value and the fix.
"""

from __future__ import annotations


class TestbedError(Exception):
    """Root of every error the testbed raises deliberately."""

    __test__ = False  # not a pytest test class despite the name

    exit_code: int = 1


class ConfigError(TestbedError, ValueError):
    """A topology, scenario, profile or CLI value is invalid. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        prefix = ""
        if source:
            prefix += f"{source}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


class InfeasibleError(TestbedError, ValueError):
    """No partition fits the tiers' memory (names the tier and the shortfall). Exit code 2."""

    exit_code = 2


class StageError(TestbedError, RuntimeError):
    """A stage server refused or failed a request (kinds: :mod:`testbed.stage.errors`)."""

    stage: str | None = None  # which stage (its URL or node name), when known


class StageTimeoutError(StageError, TimeoutError):
    """A stage server did not answer in time."""

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(message)
        self.stage = stage


class RuntimeBackendError(TestbedError, RuntimeError):
    """Starting, shaping or stopping nodes failed (Docker, netlink, processes)."""


class WorkloadError(TestbedError, ValueError):
    """A trace file is malformed beyond what can be skipped. Exit code 2."""

    exit_code = 2


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, in time and memory bounded by ``limit``
    whatever the value (a huge list or string is never formatted whole): for error messages."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
