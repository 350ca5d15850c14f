"""Request classes in the broker: what the scheduler sees of a request's class, and the options
its steps carry to the stages (priority, and slack to the class's next SLO deadline).

Pure: no I/O, no clock of its own (the broker passes the run time in).
"""

from __future__ import annotations

import math

from testbed.broker.layout import Prediction
from testbed.broker.slots import OrderKey, fifo
from testbed.broker.state import Tracker
from testbed.broker.transport import StepOptions
from testbed.schedule.base import RequestView
from testbed.spec.classes import RequestClass
from testbed.workload.request import TraceRequest


def request_view(req: TraceRequest, pred: Prediction, cls: RequestClass | None) -> RequestView:
    """The request as the scheduler sees it: its lengths, predicted work and class targets."""
    return RequestView(
        request_id=req.request_id,
        arrival_s=req.arrival_s,
        prompt_tokens=req.prompt_tokens,
        output_tokens=req.output_tokens,
        work_s=pred.work_s,
        kv_bytes=pred.kv_bytes,
        slo_class=None if cls is None else cls.name,
        priority=0 if cls is None else cls.priority,
        ttft_slo_s=None if cls is None else cls.slo.ttft_s,
        tpot_slo_s=None if cls is None else cls.slo.tpot_s,
        e2e_slo_s=None if cls is None else cls.slo.e2e_s,
    )


def step_options(tr: Tracker, now_s: float, *, ordered: bool) -> StepOptions:
    """What the request's next step tells its stage: always its class name; its priority and
    slack only when the scheduler orders the stages' queues (``ordered``); on its last step,
    to free its cache once computed (no release message after it)."""
    cls = tr.slo_class
    return StepOptions(
        slo_class=None if cls is None else cls.name,
        priority=0 if cls is None or not ordered else cls.priority,
        slack_s=None if cls is None or not ordered else slack_s(tr, now_s),
        release=len(tr.tokens) >= tr.req.output_tokens - 1,
    )


def due_s(tr: Tracker) -> float | None:
    """Run-clock time the request's next token is due by its class's SLO (the first by the
    TTFT target, the next by the last one's time + TPOT, else the E2E deadline); None
    without targets."""
    cls = tr.slo_class
    if cls is None:
        return None
    slo, arrival = cls.slo, tr.req.arrival_s
    if not tr.token_times_s and slo.ttft_s is not None:
        return arrival + slo.ttft_s
    if tr.token_times_s and slo.tpot_s is not None:
        return tr.token_times_s[-1] + slo.tpot_s
    if slo.e2e_s is not None:
        return arrival + slo.e2e_s
    return None


def slack_s(tr: Tracker, now_s: float) -> float | None:
    """Seconds until the request's next token is due (:func:`due_s`); None without targets.
    The stages batch least slack first among equal priorities."""
    due = due_s(tr)
    return None if due is None else due - now_s


def wait_order(tr: Tracker, *, ordered: bool) -> OrderKey:
    """The key by which the request's next step takes a node's slot in the broker
    (:class:`~testbed.broker.slots.NodeSlots`) when the scheduler orders the stages' queues:
    the stage server's batch order (``testbed.stage.batcher.Pending.order``: priority, then
    the steps still on time by earliest due time, then the late ones); else first come,
    first served."""
    cls = tr.slo_class
    if cls is None or not ordered:
        return fifo
    due = due_s(tr)
    at = math.inf if due is None else due
    return lambda now_s: (-cls.priority, at < now_s, at)
