"""Runs shared by integration tests: a scenario replayed with its testbed brought up and down
here, then simulated by `testbed fidelity` (tests/integration/test_fidelity_*.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from rich.console import Console

from testbed.broker.broker import Broker, BrokerConfig, BrokerResult
from testbed.broker.layout import Layout, WorkPredictor
from testbed.broker.state import Tracker
from testbed.experiment.replay import ReplayOptions, make_transport, replay_scenario
from testbed.sim.fidelity import check_fidelity
from testbed.spec.scenario import load_scenario


def replay_and_score(scenario: Path, state_dir: Path, requests: int) -> tuple[Any, ...]:
    """Replay ``scenario`` on a local testbed (up and down here; every one of ``requests``
    completed, nothing left in ``state_dir``), then its fidelity: (run, result, checks by
    metric, a printable table of the figures)."""
    loaded = load_scenario(scenario)
    opts = ReplayOptions(up=True, runtime="local", progress=False, plots=False)
    run = asyncio.run(replay_scenario(loaded, opts, Console(quiet=True)))
    assert run.summary.completed == requests
    assert not list(state_dir.glob("tb*.json")), "the testbed was not brought down"
    res = check_fidelity(run.out_dir)
    table = "\n".join(
        [
            f"{c.metric}: real {c.real} sim {c.sim} error {c.error} limit {c.limit}"
            for c in res.checks
        ]
        + [f"overruns {res.overrun_fraction}, per-call overhead {res.hop_overhead_s}", *res.notes]
    )
    print(table)  # the figures, with `pytest -s`
    return run, res, {c.metric: c for c in res.checks}, table


class TokenBroker(Broker):
    """The broker, keeping each request's generated token ids (records keep only times)."""

    tokens: dict[int, list[int]]

    def _finish(self, tr: Tracker, status: str, reason: str | None = None) -> None:
        self.tokens = getattr(self, "tokens", {})
        self.tokens[tr.req.request_id] = list(tr.tokens)
        super()._finish(tr, status, reason)


async def broker_tokens(
    tb: Any, prep: Any, transport: str, *, call_timeout_s: float
) -> tuple[dict[int, list[int]], BrokerResult]:
    """``prep``'s requests through the broker on the running ``tb`` with ``transport``:
    (request id -> its generated token ids, the broker's result)."""
    layout = Layout.from_running(tb, prep.topology, prep.cost)
    broker = TokenBroker(
        layout,
        WorkPredictor(layout, prep.cost),
        prep.make_scheduler(),
        make_transport(tb),
        prep.prompt_fn(),
        config=BrokerConfig(call_timeout_s=call_timeout_s, transport=transport),  # type: ignore[arg-type]
    )
    async with broker:
        res = await broker.run(prep.requests)
    return broker.tokens, res
