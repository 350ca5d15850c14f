"""A stage server holding two block ranges side by side (adaptive re-partitioning's overlap).

``POST /load {"start", "end", "keep": true}`` loads a new range *beside* the one the stage
serves (:mod:`testbed.stage.reload`): the server's executor becomes a :class:`Generations`, an
executor that holds one executor per loaded range (a generation, numbered from 0 in load
order) and sends every request to the right one:

- a request whose cache a generation holds keeps using it (a request in flight finishes on
  the blocks it started on);
- a new request goes to the generation whose blocks its step names (the ``blocks`` option
  of /forward, which the broker sends during a migration), else to the newest generation.

``POST /unload {"start", "end"}`` drops an older generation once it holds no cache (409
``in_use`` otherwise); with one generation left the server serves that executor alone again.
A batch with steps of several generations runs as one ``step_batch`` per generation, in turn.
Memory during the overlap is both ranges' weights (``param_bytes`` adds them up) plus the
caches of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from testbed.model.batch import BatchStep
from testbed.model.contract import (
    ExecutorInputError,
    ModelInfoLike,
    StageExecutor,
    StepOutput,
)

Blocks = tuple[int, int]


class BlocksNotHeldError(ExecutorInputError):
    """A step names a block range that no generation of the stage holds."""


class Generations:
    """Several executors of one model on one stage server (see the module docstring)."""

    def __init__(self, first: StageExecutor, number: int = 0) -> None:
        self._gens: dict[int, StageExecutor] = {number: first}
        self._bound: dict[str, int] = {}  # request id -> generation (chosen at its first step)

    # -- generations -----------------------------------------------------------------------------
    @property
    def newest(self) -> StageExecutor:
        return self._gens[max(self._gens)]

    @property
    def numbers(self) -> list[int]:
        return sorted(self._gens)

    def executor(self, number: int) -> StageExecutor:
        return self._gens[number]

    def add(self, executor: StageExecutor) -> int:
        """Serve ``executor`` beside the others; new requests go to it. Its generation."""
        number = max(self._gens) + 1
        self._gens[number] = executor
        return number

    def find(self, blocks: Blocks) -> int | None:
        """The newest generation holding exactly ``blocks``."""
        hits = [g for g, ex in self._gens.items() if (ex.start, ex.end) == tuple(blocks)]
        return max(hits) if hits else None

    def holders(self, number: int) -> list[str]:
        """Requests that generation ``number`` holds a cache for or has been chosen for."""
        held = set(self._gens[number].request_ids)
        held.update(r for r, g in self._bound.items() if g == number)
        return sorted(held)

    def remove(self, number: int) -> StageExecutor:
        """Drop generation ``number`` (the caller checked it holds nothing); not the last one."""
        if len(self._gens) == 1:
            raise ValueError("a stage keeps at least one generation")
        for rid in [r for r, g in self._bound.items() if g == number]:
            del self._bound[rid]
        return self._gens.pop(number)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"generation": g, "blocks": [ex.start, ex.end], "requests": len(ex.request_ids),
             "param_bytes": ex.param_bytes, "kv_bytes": ex.kv_bytes()}
            for g, ex in sorted(self._gens.items())
        ]  # fmt: skip

    # -- which executor a request uses --------------------------------------------------------------
    def bind(self, request_id: str, blocks: Blocks | None) -> StageExecutor:
        """The executor of ``request_id``'s step (module docstring); remembered for its next
        steps. Raises :class:`BlocksNotHeldError` when ``blocks`` is not a loaded range."""
        for ex in self._gens.values():
            if ex.has_request(request_id):
                return ex
        if blocks is not None:
            g = self.find(blocks)
            if g is None:
                held = ", ".join(f"{ex.start}:{ex.end}" for ex in self._gens.values())
                raise BlocksNotHeldError(
                    f"the step is for blocks {blocks[0]}:{blocks[1]}, this stage holds {held}"
                )
        else:
            g = self._bound.get(request_id, max(self._gens))
        self._bound[request_id] = g
        return self._gens[g]

    def unbind(self, request_id: str) -> None:
        """Forget a choice whose step was refused before it opened a cache."""
        if not any(ex.has_request(request_id) for ex in self._gens.values()):
            self._bound.pop(request_id, None)

    def _of(self, request_id: str) -> StageExecutor:
        for ex in self._gens.values():
            if ex.has_request(request_id):
                return ex
        return self._gens[self._bound.get(request_id, max(self._gens))]

    # -- the executor contract (testbed.model.contract), per request ------------------------------
    @property
    def info(self) -> ModelInfoLike:
        return self.newest.info

    @property
    def start(self) -> int:
        return self.newest.start

    @property
    def end(self) -> int:
        return self.newest.end

    @property
    def is_first(self) -> bool:
        return self.newest.is_first

    @property
    def is_last(self) -> bool:
        return self.newest.is_last

    @property
    def device(self) -> torch.device:
        return self.newest.device

    @property
    def dtype(self) -> torch.dtype:
        return self.newest.dtype

    @property
    def param_bytes(self) -> int:
        return sum(ex.param_bytes for ex in self._gens.values())

    def kv_bytes(self) -> int:
        return sum(ex.kv_bytes() for ex in self._gens.values())

    @property
    def request_ids(self) -> list[str]:
        return [r for ex in self._gens.values() for r in ex.request_ids]

    @property
    def max_context(self) -> int | None:
        """The intake's cap (:meth:`testbed.stage.intake.Intake.caps_for`): the widest."""
        got = [getattr(ex, "max_context", None) for ex in self._gens.values()]
        return None if None in got else max(int(c) for c in got if c is not None)

    @property
    def input_bytes_per_token(self) -> int:
        """The largest input per token of any generation (token ids or hidden states)."""
        return max(
            getattr(ex, "input_bytes_per_token", None)
            or (8 if ex.is_first else 4 * ex.info.hidden_size)
            for ex in self._gens.values()
        )

    def has_request(self, request_id: str) -> bool:
        return any(ex.has_request(request_id) for ex in self._gens.values())

    def idle_requests(self, idle_s: float) -> list[str]:
        return [r for ex in self._gens.values() for r in ex.idle_requests(idle_s)]

    def release(self, request_id: str) -> bool:
        self._bound.pop(request_id, None)
        return any([ex.release(request_id) for ex in self._gens.values()])

    def check_input(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        self._of(request_id).check_input(kind, x, start_pos, request_id)

    def step(self, request_id: str, kind: str, x: torch.Tensor, start_pos: int) -> StepOutput:
        return self._of(request_id).step(request_id, kind, x, start_pos)

    def step_batch(self, steps: Sequence[BatchStep]) -> list[StepOutput | Exception]:
        groups: dict[int, list[int]] = {}
        exs: dict[int, StageExecutor] = {}
        for i, st in enumerate(steps):
            ex = self._of(st.request_id)
            groups.setdefault(id(ex), []).append(i)
            exs[id(ex)] = ex
        out: list[StepOutput | Exception | None] = [None] * len(steps)
        for key, rows in groups.items():
            for i, o in zip(rows, exs[key].step_batch([steps[i] for i in rows]), strict=True):
                out[i] = o
        return [o for o in out if o is not None]
