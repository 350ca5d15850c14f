"""The one vocabulary for a stage that failed a call, on both sides of the wire.

A call to a stage ends in one of three ways a caller can act on (as aiohttp's client
exceptions split them):

- :class:`StageUnreachableError` (also ``ConnectionError``): no answer at all - connection
  refused, reset or closed; the stage is down (its process died, or the network is cut).
- :class:`StageTimeoutError` (also ``TimeoutError``): no answer within the timeout.
- :class:`StageRejectedError`: the stage answered with an error: the HTTP ``status`` and a
  machine-readable :class:`ErrorCode` (``code``) from the JSON error body
  ``{"error": message, "status": status, "code": code}`` (the same keys in a tensor-port
  answer's meta).

:class:`StageProtocolError` is an answer that is not a valid one (malformed message, missing
fields). Callers decide from the type and the code, never from the message text:
:func:`marks_node_down` is the broker's rule, :attr:`ErrorCode.retry_later` the back-off rule.

The server side maps executor exceptions to (status, code) with :func:`status_and_code`, the
one table of that mapping.
"""

from __future__ import annotations

from enum import StrEnum

from testbed.errors import StageError, StageTimeoutError
from testbed.model.contract import (
    CacheFullError,
    CacheStateError,
    ExecutorInputError,
    UnknownRequestError,
)
from testbed.stage.wire import WireFormatError

__all__ = [
    "ErrorCode",
    "StageError",
    "StageProtocolError",
    "StageRejectedError",
    "StageTimeoutError",
    "StageUnreachableError",
    "marks_node_down",
    "status_and_code",
]


class ErrorCode(StrEnum):
    """Why a stage refused or failed a step (the ``code`` of its error answer)."""

    BUSY = "busy"  # 429: the step queue is full; retry later
    CACHE_FULL = "cache_full"  # 503: every request-cache slot is taken; retry after releases
    SHUTTING_DOWN = "shutting_down"  # 503: the stage is stopping; route elsewhere
    BAD_INPUT = "bad_input"  # 400 (413 when too large): malformed message, meta or tensor
    BAD_POSITION = "bad_position"  # 409: wrong position, prefill over a live cache, context
    UNKNOWN_REQUEST = "unknown_request"  # 404: no cache for the request id
    MODEL_ERROR = "model_error"  # 500: the model failed inside the step
    IN_USE = "in_use"  # 409: a /load while request caches or steps are held

    @property
    def retry_later(self) -> bool:
        """Backpressure, not a failure: the same step may succeed on the same stage later."""
        return self in (ErrorCode.BUSY, ErrorCode.CACHE_FULL)


class StageUnreachableError(StageError, ConnectionError):
    """The stage did not answer at all: connection refused, reset or closed."""

    def __init__(self, stage: str, reason: str):
        self.stage = stage  # the stage's URL, or the node name its client was given
        self.reason = reason
        super().__init__(f"stage {stage} unreachable: {reason} (did the stage process die?)")


class StageRejectedError(StageError):
    """The stage answered with an error: HTTP ``status`` and ``code`` (None when the answer
    carried no code, e.g. a 404 for an unknown route from the HTTP framework itself)."""

    def __init__(self, stage: str, status: int, code: ErrorCode | None, reason: str):
        self.stage = stage
        self.status = status
        self.code = code
        self.reason = reason
        what = f"HTTP {status}" + (f" {code}" if code is not None else "")
        super().__init__(f"stage {stage} answered {what}: {reason}")

    def body(self) -> dict[str, object]:
        """The JSON error body (and tensor-port meta) the server sends for this error."""
        return {"error": self.reason, "status": self.status, "code": self.code}


class StageProtocolError(StageError):
    """The stage answered something that is not a valid answer (malformed, fields missing)."""

    def __init__(self, stage: str, reason: str):
        self.stage = stage
        self.reason = reason
        super().__init__(f"stage {stage}: {reason}")


def parse_code(value: object) -> ErrorCode | None:
    """The code of an error answer, or None when it carries none this side knows."""
    try:
        return ErrorCode(value) if isinstance(value, str) else None
    except ValueError:
        return None


def marks_node_down(exc: BaseException) -> bool:
    """Whether a failed call means the node is gone (route elsewhere) rather than the request
    being wrong: no answer (unreachable, timeout) or an answer saying it is shutting down."""
    if isinstance(exc, StageUnreachableError | StageTimeoutError):
        return True
    return isinstance(exc, StageRejectedError) and exc.code == ErrorCode.SHUTTING_DOWN


# The one table from executor exceptions to answers; the first matching row wins (subclasses
# first). Anything else raised inside a step is a model error (500).
_EXECUTOR_ERRORS: tuple[tuple[type[BaseException], int, ErrorCode], ...] = (
    (UnknownRequestError, 404, ErrorCode.UNKNOWN_REQUEST),
    (CacheStateError, 409, ErrorCode.BAD_POSITION),
    (ExecutorInputError, 400, ErrorCode.BAD_INPUT),
    (CacheFullError, 503, ErrorCode.CACHE_FULL),
    (ValueError, 400, ErrorCode.BAD_INPUT),
)


def status_and_code(exc: BaseException) -> tuple[int, ErrorCode]:
    """(HTTP status, code) the server answers for an exception from a step or its input."""
    if isinstance(exc, WireFormatError):
        return (413 if exc.too_large else 400), ErrorCode.BAD_INPUT
    for kind, status, code in _EXECUTOR_ERRORS:
        if isinstance(exc, kind):
            return status, code
    return 500, ErrorCode.MODEL_ERROR
