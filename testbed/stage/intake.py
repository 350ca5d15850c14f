"""How a stage server takes input in: payload caps, the memory budget, read timeouts.

One :class:`Intake` per server, used by the HTTP routes and (through the server's
``reserve_now`` / ``reserve_payload``) by the tensor port; the rules are those of
:mod:`testbed.stage.limits`. Refusals go through the server's ``refuse`` so they are counted
in its metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from testbed.model.contract import StageExecutor
from testbed.stage.errors import ErrorCode, StageRejectedError
from testbed.stage.limits import InputLimits, PayloadBudget, Reservation
from testbed.stage.wire import WireFormatError, WireLimits, WireMessage, read_message

JSON_BODY_MAX_BYTES = 1 << 16  # /release and any other JSON route
# aiohttp's per-connection read buffer (it buffers up to twice this before pausing a sender):
# bytes an HTTP upload can hold outside the memory budget
READ_BUFSIZE_BYTES = 1 << 18

Refuse = Callable[[int, ErrorCode, str], StageRejectedError]


class Intake:
    """Payload caps per op, one shared :class:`PayloadBudget`, timed reads (event loop only)."""

    def __init__(
        self,
        label: str,
        wire: WireLimits,
        inputs: InputLimits,
        caps: dict[str, int],
        *,
        refuse: Refuse,
        refuse_exc: Callable[[BaseException], StageRejectedError],
    ):
        self.label = label
        self.wire = wire
        self.inputs = inputs
        self.caps = caps  # op -> the largest payload accepted
        self.budget = PayloadBudget(inputs.mem_budget_bytes)
        self._refuse = refuse
        self._refuse_exc = refuse_exc

    @staticmethod
    def caps_for(ex: StageExecutor, wire: WireLimits, inputs: InputLimits) -> dict[str, int]:
        """op -> the largest payload a stage accepts: a forward's input is at most the context
        of token ids (int64) or of hidden states (float32, the widest float that travels); a
        sink's is what the memory budget holds. Neither is over the wire limit."""
        context = getattr(ex, "max_context", None) or wire.max_body_bytes
        # an executor whose wire tokens are not its own hidden states (an emulated device pads
        # them to the studied model's size) says so; else token ids or float32 hidden states
        per_token = getattr(ex, "input_bytes_per_token", None) or (
            8 if ex.is_first else 4 * ex.info.hidden_size
        )
        budget = inputs.mem_budget_bytes
        return {
            "forward": min(wire.max_body_bytes, budget, context * per_token),
            "sink": min(wire.max_body_bytes, budget),
        }

    def check(self, op: str, nbytes: int) -> None:
        """Refuse (400 unknown op, 413 too large) before anything is allocated."""
        cap = self.caps.get(op)
        if cap is None:
            raise self._refuse(400, ErrorCode.BAD_INPUT, f"unknown op {op!r}")
        if nbytes > cap:
            raise self._refuse(
                413,
                ErrorCode.BAD_INPUT,
                f"a {op} payload of {nbytes} bytes exceeds stage {self.label}'s limit of {cap} "
                "bytes (its largest input, capped by the memory budget)",
            )

    def reserve_now(self, op: str, nbytes: int) -> Reservation | None:
        self.check(op, nbytes)
        return self.budget.try_reserve(nbytes)

    async def reserve(self, op: str, nbytes: int) -> Reservation:
        """Wait up to ``budget_wait_s`` for the bytes; 429 ``busy`` when they never fit."""
        self.check(op, nbytes)
        try:
            return await self.budget.reserve(nbytes, self.inputs.budget_wait_s)
        except TimeoutError:
            raise self._refuse(
                429,
                ErrorCode.BUSY,
                f"stage {self.label}: its input memory budget ({self.inputs.mem_budget_bytes} "
                "bytes) is held by other payloads; retry later",
            ) from None

    async def read_body(self, request: web.Request, op: str) -> tuple[WireMessage, Reservation]:
        """A wire body read under the cap, the budget and the read timeout. The caller releases
        the reservation once it no longer needs the message's tensors."""
        held: list[Reservation] = []

        async def admit(meta: dict[str, object], nbytes: int) -> None:
            held.append(await self.reserve(op, nbytes))

        timeout_s = self.inputs.read_timeout_s
        try:
            try:
                msg = await read_message(
                    request.content,
                    request.content_length,
                    self.wire,
                    admit=admit,
                    read_timeout_s=timeout_s,
                )
            except BaseException:
                for h in held:
                    h.release()
                raise
        except WireFormatError as exc:
            raise self._refuse_exc(exc) from None
        except TimeoutError:
            raise self._stalled(timeout_s) from None
        except ConnectionError:  # the client went away mid-body; nobody reads an answer
            raise self._refuse(400, ErrorCode.BAD_INPUT, "client disconnected mid-body") from None
        return msg, held[0]

    async def read_json(self, request: web.Request) -> object:
        """A JSON route's body (at most ``JSON_BODY_MAX_BYTES``, read within the timeout);
        raises ``ValueError``/``RecursionError`` for bad JSON, :class:`StageRejectedError` for
        a body too large, stalled or cut off."""
        timeout_s = self.inputs.read_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise self._refuse(
                413, ErrorCode.BAD_INPUT, f"JSON body over {JSON_BODY_MAX_BYTES} bytes"
            ) from None
        except TimeoutError:
            raise self._stalled(timeout_s) from None
        except ConnectionError:
            raise self._refuse(400, ErrorCode.BAD_INPUT, "client disconnected mid-body") from None

    def _stalled(self, timeout_s: float) -> StageRejectedError:
        return self._refuse(
            408, ErrorCode.BAD_INPUT, f"no body bytes for {timeout_s:g}s: upload dropped"
        )
