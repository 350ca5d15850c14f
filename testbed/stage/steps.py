"""The stage server's side of the step queue (:mod:`testbed.stage.batcher`): run one batch on
a worker thread, and encode a finished step's answer for the wire."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from testbed.model.batch import BatchStep
from testbed.model.contract import StageExecutor, StepOutput
from testbed.stage.batcher import Pending
from testbed.stage.forward import ForwardReply, ForwardRequest
from testbed.stage.metrics import StageMetrics
from testbed.stage.wire import encode_parts


async def run_batch(
    pool: ThreadPoolExecutor,
    executor: StageExecutor,
    metrics: StageMetrics,
    steps: list[BatchStep],
) -> list[StepOutput | Exception]:
    """One batch on a worker thread of `pool` (the step queue's runner), counted in `metrics`.

    An executor whose ``instant`` attribute is true (the model-free echo with no compute time)
    runs on the loop itself: a thread hop would cost more than its step."""
    if getattr(executor, "instant", False):
        outs = executor.step_batch(steps)
    else:
        loop = asyncio.get_running_loop()
        outs = await loop.run_in_executor(pool, executor.step_batch, steps)
    ok = [o for o in outs if isinstance(o, StepOutput)]
    metrics.count_batch(len(ok), ok[0].compute_s if ok else 0.0)
    return outs


def encode_reply(
    executor: StageExecutor, req: ForwardRequest, out: StepOutput, done: Pending
) -> tuple[ForwardReply, float]:
    """A finished step's answer, encoded for the wire, and its compute seconds."""
    ex = executor
    tensors = {}
    if out.hidden is not None:
        tensors["hidden"] = out.hidden
    if req.want_logits and out.logits is not None:
        tensors["logits"] = out.logits
    first = done.first_run_s if done.first_run_s is not None else done.ready_s
    meta = {
        "request_id": req.request_id,
        "kind": req.kind,
        "start_pos": req.start_pos,
        "length": out.length,
        "token_id": out.token_id,
        "service_s": out.compute_s,
        "queue_s": first - done.ready_s,
        "batch_size": done.batch_size,
        "stage": [ex.start, ex.end],
        "status": 200,
    }
    emulation = getattr(out, "emulation", None)  # an emulated device's pacing numbers
    if emulation:
        meta["emulation"] = emulation
    return ForwardReply(meta, encode_parts(meta, tensors)), out.compute_s
