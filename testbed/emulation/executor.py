"""EmulatedExecutor: the stand-in's real blocks, paced to the emulated device, padded on the wire.

It wraps a :class:`testbed.model.executor.LayerRangeExecutor` of the stand-in model (same
number of blocks as the studied model, tiny widths) and offers the same duck-typed interface
the stage server calls (``info``, ``start``, ``end``, ``check_input``, ``step``, ``release``,
the accounting methods). Per step:

* **Time**: the window opens when the step starts on the node's worker (one at a time: the
  server runs emulated stages with one worker, so no other step runs meanwhile) and lasts the
  predicted time of the studied model's blocks on the device (:class:`StageTiming`). The real
  compute runs inside the window; the reply is held until a monotonic deadline. A step whose
  real work does not fit is an *overrun* (its window is the real work).
* **Bytes**: hidden states on the wire have the studied model's shape and dtype
  ``[1, q, H]``; each token's row starts with the stand-in's float32 hidden state as raw bytes
  and the rest is zero. The receiver checks the shape, the dtype and that the padding is zero
  (else a 400) and strips it, so tokens stay exact.
* **Memory**: KV capacity is the studied model's on the device after its weights; a prefill that
  would exceed it is refused with :class:`CacheFullError` (503, the broker retries), a decode
  that outgrows it too (as an out-of-memory device would).

Every step's (predicted, emulated, real) seconds are kept for the run's fidelity report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from testbed.emulation.timing import StageTiming
from testbed.model.batch import BatchStep
from testbed.model.executor import CacheFullError, ExecutorInputError, StepOutput

_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_STEPS_KEPT = 1_000_000


@dataclass(frozen=True)
class EmulatedStepOutput(StepOutput):
    """A step's output plus its pacing numbers (the server adds them to the reply's meta)."""

    emulation: dict[str, float] | None = None


@dataclass(frozen=True)
class StepPacing:
    kind: str
    tokens: int
    context: int
    predicted_s: float  # the window: the device's predicted time
    emulated_s: float  # how long the step held the node
    real_s: float  # the stand-in's real work (unpack, compute, pack)

    @property
    def overrun(self) -> bool:
        return self.real_s > self.predicted_s


def wire_dtype(name: str) -> torch.dtype:
    if name not in _WIRE_DTYPES:
        raise ExecutorInputError(
            f"the studied model's dtype {name!r} cannot travel as hidden states; "
            f"use one of {', '.join(_WIRE_DTYPES)}"
        )
    return _WIRE_DTYPES[name]


def pack_hidden(hidden: torch.Tensor, studied_hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Stand-in float32 hidden [1, q, h] -> studied-size [1, q, H] of ``dtype``: each row's
    leading bytes are the stand-in's float32 values, the rest zero."""
    h32 = hidden.detach().to("cpu", torch.float32).contiguous()
    b, q, h = h32.shape
    row = studied_hidden * torch.empty((), dtype=dtype).element_size()
    if h * 4 > row:
        raise ExecutorInputError(
            f"the stand-in's hidden state ({h} x float32 = {h * 4} bytes) does not fit the "
            f"studied model's ({row} bytes per token)"
        )
    out = torch.zeros((b, q, row), dtype=torch.uint8)
    out[:, :, : h * 4] = h32.view(torch.uint8).reshape(b, q, h * 4)
    return out.view(dtype).reshape(b, q, studied_hidden)


def unpack_hidden(
    x: torch.Tensor, studied_hidden: int, dtype: torch.dtype, standin_hidden: int
) -> torch.Tensor:
    """The inverse of :func:`pack_hidden`; ExecutorInputError (400) when the shape or dtype is
    not the studied model's, or the padding is not zero."""
    if x.dtype != dtype or x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != studied_hidden:
        raise ExecutorInputError(
            f"an emulated stage takes the studied model's hidden states "
            f"{str(dtype).removeprefix('torch.')}[1, q, {studied_hidden}], got "
            f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
        )
    q = x.shape[1]
    raw = x.contiguous().view(torch.uint8).reshape(1, q, -1)
    n = standin_hidden * 4
    if raw[:, :, n:].any():
        raise ExecutorInputError(
            f"hidden-state padding is not zero: bytes {n}.. of each token row must be zero "
            "(a sender that is not an emulated stage of the same scenario?)"
        )
    return raw[:, :, :n].contiguous().view(torch.float32).reshape(1, q, standin_hidden)


class PacingLog:
    """The steps a stage's emulated device paced, in the order they ran. One stage's log goes
    on across the block ranges it loads beside each other (:meth:`EmulatedExecutor.
    continue_log`), so a report's step indices (``since``) stay valid through a migration."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # steps: worker threads; reports: the event loop
        self._steps: list[StepPacing] = []
        self._dropped = 0

    def append(self, pace: StepPacing) -> None:
        with self._lock:
            if len(self._steps) < _MAX_STEPS_KEPT:
                self._steps.append(pace)
            else:
                self._dropped += 1

    def read(self, since: int) -> tuple[list[StepPacing], int, int]:
        """(steps from index ``since`` on, steps recorded, steps dropped past the cap)."""
        with self._lock:
            return self._steps[since:], len(self._steps), self._dropped


class EmulatedExecutor:
    """A stand-in executor paced as the emulated device (see the module docstring)."""

    def __init__(
        self,
        inner: Any,
        timing: StageTiming,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if (inner.start, inner.end) != (timing.start, timing.end):
            raise ValueError("the stand-in executor and the timing hold different blocks")
        if inner.info.num_blocks != timing.spec.profile.num_blocks:
            raise ExecutorInputError(
                f"the stand-in has {inner.info.num_blocks} blocks, the studied model "
                f"{timing.spec.profile.num_blocks}; plans apply only with equal block counts"
            )
        self.inner = inner
        self.timing = timing
        self.info = inner.info
        self.start, self.end = inner.start, inner.end
        self.is_first, self.is_last = inner.is_first, inner.is_last
        self.device = inner.device
        self.dtype = inner.dtype
        self.max_requests = inner.max_requests
        self.max_context = inner.max_context
        self.wire_dtype = wire_dtype(timing.spec.profile.dtype)
        self.studied_hidden = timing.spec.profile.arch.hidden_size
        # what one input token takes on the wire: the studied model's padded hidden state
        # (the stage server's payload cap reads this)
        self.input_bytes_per_token = (
            8 if self.is_first else self.studied_hidden * self.wire_dtype.itemsize
        )
        self.kv_capacity_tokens = timing.kv_capacity_tokens()
        self._kv_per_token = timing.kv_bytes_per_token()
        self._clock = clock
        self._sleep = sleep
        # the device runs at `speed` x its profile (a timeline slowdown): windows / speed
        self.speed = timing.spec.speed
        self.log = PacingLog()
        if not self.is_first:  # fail now, not on the first step
            pack_hidden(
                torch.zeros(1, 1, self.info.hidden_size), self.studied_hidden, self.wire_dtype
            )

    # -- accounting (the studied model's numbers) ---------------------------------------------
    @property
    def param_bytes(self) -> int:
        return self.timing.weight_bytes()

    def tokens_held(self) -> int:
        return sum(self.inner.request_length(r) or 0 for r in self.inner.request_ids)

    def kv_bytes(self) -> int:
        return self.tokens_held() * self._kv_per_token

    @property
    def request_ids(self) -> list[str]:
        return list(self.inner.request_ids)

    def has_request(self, request_id: str) -> bool:
        return bool(self.inner.has_request(request_id))

    def idle_requests(self, idle_s: float) -> list[str]:
        return list(self.inner.idle_requests(idle_s))

    def request_length(self, request_id: str) -> int | None:
        length: int | None = self.inner.request_length(request_id)
        return length

    def release(self, request_id: str) -> bool:
        return bool(self.inner.release(request_id))

    # -- steps -----------------------------------------------------------------------------------
    def _unpack(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            return x
        return unpack_hidden(x, self.studied_hidden, self.wire_dtype, self.info.hidden_size)

    def _check_memory(self, kind: str, q: int) -> None:
        held = self.tokens_held()
        if held + q > self.kv_capacity_tokens:
            what = "prefill" if kind == "prefill" else "decode"
            raise CacheFullError(
                f"emulated {self.timing.spec.device.label or 'device'}: KV cache full "
                f"({held} of {self.kv_capacity_tokens} tokens held, a {what} needs {q} more)"
            )

    def check_input(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        inner_x = self._unpack(x)
        self.inner.check_input(kind, inner_x, start_pos, request_id)
        self._check_memory(kind, int(inner_x.shape[1]))

    def step(self, request_id: str, kind: str, x: torch.Tensor, start_pos: int) -> StepOutput:
        t0 = self._clock()
        inner_x = self._unpack(x)
        q = int(inner_x.shape[1])
        predicted = self.timing.step_s(kind, q, start_pos) / self.speed  # type: ignore[arg-type]
        deadline = t0 + predicted
        self._check_memory(kind, q)
        out = self.inner.step(request_id, kind, inner_x, start_pos)
        hidden = out.hidden
        if hidden is not None:
            hidden = pack_hidden(hidden, self.studied_hidden, self.wire_dtype)
        t_real = self._clock()
        left = deadline - t_real
        if left > 0:
            self._sleep(left)
        t_end = self._clock()
        pace = StepPacing(kind, q, start_pos, predicted, t_end - t0, t_real - t0)
        self.log.append(pace)
        return EmulatedStepOutput(
            hidden=hidden,
            logits=out.logits,
            token_id=out.token_id,
            length=out.length,
            compute_s=pace.emulated_s,
            emulation={
                "predicted_s": predicted,
                "emulated_s": pace.emulated_s,
                "real_s": pace.real_s,
            },
        )

    def step_batch(self, steps: Sequence[BatchStep]) -> list[StepOutput | Exception]:
        """A batched step on the emulated device: the stand-in computes every row (its own
        batched forward) inside one window, the roofline of the whole batch
        (:meth:`StageTiming.batch_s`); a row refused on input or memory does not stop the others."""
        t0 = self._clock()
        results: list[StepOutput | Exception | None] = [None] * len(steps)
        taken: list[tuple[int, BatchStep]] = []
        rows: list[tuple[Any, int, int]] = []
        for i, s in enumerate(steps):
            try:
                x = self._unpack(s.x)
                q = int(x.shape[1])
                self._check_memory(s.kind, q)
            except Exception as exc:  # this row only
                results[i] = exc
                continue
            taken.append((i, replace(s, x=x)))
            rows.append((s.kind, q, s.start_pos))
        if not taken:
            return [r for r in results if r is not None]
        predicted = self.timing.batch_s(rows) / self.speed
        outs = self.inner.step_batch([s for _, s in taken])
        t_real = self._clock()
        left = t0 + predicted - t_real
        if left > 0:
            self._sleep(left)
        t_end = self._clock()
        kind = "decode" if all(k == "decode" for k, _, _ in rows) else "prefill"
        tokens = sum(q for _, q, _ in rows)
        context = max(c for _, _, c in rows)
        pace = StepPacing(kind, tokens, context, predicted, t_end - t0, t_real - t0)
        self.log.append(pace)
        emulation = {
            "predicted_s": predicted,
            "emulated_s": pace.emulated_s,
            "real_s": pace.real_s,
        }
        for (i, _), out in zip(taken, outs, strict=True):
            if isinstance(out, Exception):
                results[i] = out
                continue
            hidden = out.hidden
            if hidden is not None:
                hidden = pack_hidden(hidden, self.studied_hidden, self.wire_dtype)
            results[i] = EmulatedStepOutput(
                hidden=hidden,
                logits=out.logits,
                token_id=out.token_id,
                length=out.length,
                compute_s=pace.emulated_s,
                emulation=emulation,
            )
        return [r for r in results if r is not None]

    # -- reports ---------------------------------------------------------------------------------
    def continue_log(self, previous: EmulatedExecutor) -> None:
        """Record this executor's steps in ``previous``'s log from now on (a range loaded
        beside the one the stage serves: one record of the stage; what this executor paced
        before, its warm-up, is left out)."""
        self.log = previous.log

    def pacing_report(self, since: int = 0) -> dict[str, Any]:
        """Steps from index ``since`` on: [kind, tokens, context, predicted_s, emulated_s,
        real_s] each, plus the device and the capacity (served at GET /emulation)."""
        steps, total, dropped = self.log.read(since)
        spec = self.timing.spec
        return {
            "node": spec.node,
            "device": spec.device.label,
            "model": spec.profile.arch.name,
            "dtype": spec.profile.dtype,
            "dilation": spec.dilation,
            "speed": self.speed,
            "cost_source": self.timing.cost.source,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "steps_total": total,
            "steps_dropped": dropped,
            "since": since,
            "steps": [
                [s.kind, s.tokens, s.context, s.predicted_s, s.emulated_s, s.real_s] for s in steps
            ],
        }
