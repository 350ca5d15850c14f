"""Per-step options (class, priority, slack): declared once, sent as meta, parsed back, and
passed through every transport unchanged."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.broker.gate import GatedTransport
from testbed.broker.slo import slack_s, step_options
from testbed.broker.state import Tracker
from testbed.broker.transport import NO_OPTIONS, StepOptions, StepResult
from testbed.model.contract import ExecutorInputError
from testbed.spec.classes import RequestClass
from testbed.stage.forward import parse_options
from testbed.workload.request import TraceRequest

CHAT = RequestClass.model_validate(
    {"name": "chat", "share": 1.0, "slo": {"ttft": "2s", "tpot": "0.5s"}, "priority": 3}
)


def test_options_round_trip_through_the_meta() -> None:
    opts = StepOptions(slo_class="chat", priority=2, slack_s=0.25)
    assert opts.to_meta() == {"class": "chat", "priority": 2, "slack_s": 0.25}
    assert parse_options(opts.to_meta()) == opts
    assert NO_OPTIONS.to_meta() == {} and parse_options({}) == NO_OPTIONS


@pytest.mark.parametrize("meta", [{"priority": True}, {"slack_s": "soon"}, {"class": ""}])
def test_bad_options_are_refused(meta: dict[str, Any]) -> None:
    with pytest.raises(ExecutorInputError):
        parse_options(meta)


def test_the_broker_sends_priority_and_slack_only_when_the_scheduler_orders_queues() -> None:
    tr = Tracker(TraceRequest(7, 1.0, 4, 3, source_row=0), released_s=1.0, slo_class=CHAT)
    assert step_options(tr, 1.5, ordered=False) == StepOptions("chat", 0, None)
    assert step_options(tr, 1.5, ordered=True) == StepOptions("chat", 3, 1.5)  # TTFT due at 3 s
    tr.token_times_s.append(2.0)
    assert slack_s(tr, 2.25) == pytest.approx(0.25)  # next token due 0.5 s after the last
    plain = Tracker(TraceRequest(8, 0.0, 4, 3, source_row=1), released_s=0.0)
    assert step_options(plain, 1.0, ordered=True) == NO_OPTIONS


class _Recorder:
    """A transport that records what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, StepOptions]] = []

    async def forward(self, node: str, *args: Any, timeout_s: float, options: StepOptions = NO_OPTIONS) -> StepResult:  # fmt: skip
        self.sent.append((node, options))
        return StepResult(output=[1], service_s=0.0)


async def test_the_partition_gate_passes_the_options_through() -> None:
    inner = _Recorder()
    gate = GatedTransport(inner, lambda _n: False)  # type: ignore[arg-type]
    opts = StepOptions("chat", 1, 0.5)
    await gate.forward("edge-1", "r", "prefill", 0, [1, 2], timeout_s=1.0, options=opts)
    await gate.forward("edge-2", "r", "decode", 2, [3], timeout_s=1.0)
    assert inner.sent == [("edge-1", opts), ("edge-2", NO_OPTIONS)]
