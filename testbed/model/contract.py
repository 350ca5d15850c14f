"""What a stage server needs from an executor: the interface, its errors, one step validator.

Three executors implement :class:`StageExecutor`: the real one
(:class:`testbed.model.executor.LayerRangeExecutor`), the model-free echo
(:class:`testbed.broker.echo.EchoExecutor`), and the coming emulated one (a small stand-in model
computes while the step is paced to a predicted device time). All of them validate a step with
the same pure function, :func:`check_step`, so a step that one rejects the others reject with the
same error type (and the stage server with the same HTTP status and code).

Threading contract (what :class:`testbed.stage.server.StageServer` does, and what an executor
must allow):

- ``step()`` and ``step_batch()`` run on the server's worker threads (on the event loop
  itself for an executor whose ``instant`` attribute is true: one that computes nothing and
  never blocks, the echo without compute time): up to ``max_inflight`` batches at once, never two steps for the same request id at once (the server holds a
  per-request lock around each step, and a request is in at most one batch row).
- Everything else - ``check_input``, ``release``, ``has_request``, ``request_ids``,
  ``idle_requests``, ``kv_bytes``, ``info`` and the attributes - is called from the event loop
  thread *while* steps run on workers. An executor therefore guards its request table with a
  lock: readers take a snapshot under it, ``step`` changes the table under it, and ``step``
  re-checks its input under the same lock (the loop's ``check_input`` is only an early answer;
  the cache-slot cap is enforced where the slot is taken).
- ``release`` of a request whose step is running is never called by the server (it waits for
  the request's lock); an executor may still return either answer then, but must not corrupt
  its table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from testbed.errors import TestbedError
from testbed.model.batch import BatchStep

__all__ = ["BatchStep"]  # re-exported: the executors' batch row type

StepKind = Literal["prefill", "decode"]
STEP_KINDS: tuple[str, ...] = ("prefill", "decode")


class ExecutorInputError(TestbedError, ValueError):
    """A step's input does not fit this executor or the request's cache (HTTP 400)."""

    exit_code = 2


class UnknownRequestError(ExecutorInputError, KeyError):
    """A decode or release names a request id this executor holds no cache for (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CacheStateError(ExecutorInputError):
    """A step does not fit the request's cache: wrong position, prefill over a live cache, or
    past the model's context (HTTP 409)."""


class CacheFullError(TestbedError, RuntimeError):
    """The executor already holds its maximum number of request caches (HTTP 503)."""


@dataclass(frozen=True)
class StepOutput:
    """What one prefill/decode step produced on one stage."""

    hidden: torch.Tensor | None  # [1, q, H] for the next stage (None on the last stage)
    logits: torch.Tensor | None  # [1, vocab] float32 at the last position (last stage only)
    token_id: int | None  # greedy next token (last stage only)
    length: int  # tokens now in the request's cache
    compute_s: float  # wall time of the step on this stage


class ModelInfoLike(Protocol):
    """The model facts a stage reports in /info (:class:`testbed.model.info.ModelInfo`)."""

    @property
    def path(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def model_type(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...


@runtime_checkable
class StageExecutor(Protocol):
    """One contiguous block range of a model with a KV cache per request.

    See the module docstring for which thread may call what.
    """

    @property
    def info(self) -> ModelInfoLike: ...
    @property
    def start(self) -> int:
        """First block (inclusive)."""
        ...

    @property
    def end(self) -> int:
        """Last block (exclusive)."""
        ...

    @property
    def is_first(self) -> bool:
        """Takes token ids (holds the embedding)."""
        ...

    @property
    def is_last(self) -> bool:
        """Returns a token (holds the final norm and LM head)."""
        ...

    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def param_bytes(self) -> int:
        """Bytes of weights held."""
        ...

    def kv_bytes(self) -> int:
        """Bytes held by request caches (a snapshot; safe while steps run)."""
        ...

    @property
    def request_ids(self) -> list[str]:
        """Ids of the request caches held (a snapshot)."""
        ...

    def has_request(self, request_id: str) -> bool: ...

    def idle_requests(self, idle_s: float) -> list[str]:
        """Ids of caches not used for more than ``idle_s`` seconds."""
        ...

    def release(self, request_id: str) -> bool:
        """Free the request's cache; False when it held none."""
        ...

    def check_input(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        """Raise an :class:`ExecutorInputError` / :class:`CacheFullError` when the step does not
        fit now (changes nothing). Called on the event loop before a step is queued."""
        ...

    def step(self, request_id: str, kind: str, x: torch.Tensor, start_pos: int) -> StepOutput:
        """Run one prefill (whole prompt at 0) or decode (one token) step; worker thread."""
        ...

    def step_batch(self, steps: Sequence[BatchStep]) -> list[StepOutput | Exception]:
        """One iteration of continuous batching over several requests (each on its own cache
        and position; a prefill may come in chunks, see :class:`BatchStep`); worker thread.
        Answers per row, in order: its output or the exception that refused it."""
        ...


def describe(x: torch.Tensor) -> str:
    """``float32[1, 3, 64]``: a tensor's dtype and shape for error messages."""
    return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"


def check_step(
    kind: str,
    x: torch.Tensor,
    start_pos: int,
    request_id: str,
    *,
    start: int,
    end: int,
    is_first: bool,
    vocab_size: int,
    hidden_size: int,
    max_context: int,
    cached_length: int | None,
    held: int,
    max_requests: int,
) -> None:
    """Raise when the step does not fit the stage and the request's cache; pure (no state).

    ``cached_length``: tokens in the request's cache (None: no cache); ``held``: caches held
    now (a prefill needs a free slot below ``max_requests``).
    """
    if kind not in STEP_KINDS:
        raise ExecutorInputError(f"step kind {kind!r} is not prefill or decode")
    if is_first:
        if x.dtype not in (torch.int64, torch.int32) or x.dim() != 2 or x.shape[0] != 1:
            raise ExecutorInputError(
                f"the first stage takes token ids int64[1, q], got {describe(x)}"
            )
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
            raise ExecutorInputError(
                f"token ids must be in [0, {vocab_size}), got {int(x.min())}..{int(x.max())}"
            )
    elif not x.is_floating_point() or x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != hidden_size:
        raise ExecutorInputError(
            f"stage {start}:{end} takes hidden states float[1, q, {hidden_size}], got {describe(x)}"
        )
    elif x.numel() and not bool(torch.isfinite(x).all()):
        raise ExecutorInputError(
            "the input hidden states hold NaN or Inf values (a stage before this one diverged, "
            "or the sender is broken); nothing was computed"
        )
    q = int(x.shape[1])
    if q < 1:
        raise ExecutorInputError("a step needs at least one token")
    if kind == "prefill":
        if cached_length is not None:
            raise CacheStateError(
                f"request {request_id!r} already has a cache of {cached_length} tokens; "
                "release it before a new prefill"
            )
        if start_pos != 0:
            raise CacheStateError(f"prefill starts at position 0, got {start_pos}")
    else:
        if cached_length is None:
            raise UnknownRequestError(
                f"unknown request id {request_id!r}: no prefill on this stage (or it was released)"
            )
        if q != 1:
            raise ExecutorInputError(f"a decode step carries exactly 1 token, got {q}")
        if start_pos != cached_length:
            raise CacheStateError(
                f"request {request_id!r}: decode at position {start_pos} but the cache "
                f"holds {cached_length} tokens (expected position {cached_length})"
            )
    if start_pos + q > max_context:
        raise CacheStateError(
            f"request {request_id!r}: {start_pos + q} tokens exceed the model's "
            f"context of {max_context}"
        )
    if kind == "prefill" and held >= max_requests:
        raise CacheFullError(
            f"stage holds {held} request caches (max {max_requests}); release finished requests"
        )
