"""The broker's per-node call slots: a cap on outstanding calls whose waiters take freed slots
in the order of their key (the stages' batch order for ``slo``), else first come, first served."""

from __future__ import annotations

import asyncio

import pytest

from testbed.broker.slo import wait_order
from testbed.broker.slots import NodeSlots, OrderKey, fifo
from testbed.broker.state import Tracker
from testbed.spec.classes import RequestClass
from testbed.workload.request import TraceRequest

CHAT = RequestClass.model_validate(
    {"name": "chat", "share": 0.5, "slo": {"ttft": "1s", "tpot": "0.5s"}, "priority": 1}
)
BATCH = RequestClass.model_validate({"name": "batch", "share": 0.5, "slo": {"e2e": "30s"}})


async def _admission_order(slots: NodeSlots, keys: dict[str, OrderKey]) -> list[str]:
    """Hold the only slot, queue one waiter per key (in the dict's order), then let go: the
    order in which the waiters got the slot."""
    got: list[str] = []
    gate = asyncio.Event()

    async def holder() -> None:
        async with slots.hold():
            await gate.wait()

    async def waiter(name: str, key: OrderKey) -> None:
        async with slots.hold(key):
            got.append(name)
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(holder())
        await asyncio.sleep(0)
        for name, key in keys.items():
            tg.create_task(waiter(name, key))
            await asyncio.sleep(0)
        assert slots.waiting == len(keys) and slots.free == 0
        gate.set()
    assert slots.free == 1 and slots.waiting == 0
    return got


def _const(key: tuple[object, ...]) -> OrderKey:
    return lambda _now_s: key


async def test_without_keys_the_waiters_are_served_first_come_first_served() -> None:
    slots = NodeSlots(1, clock=lambda: 0.0)
    order = await _admission_order(slots, {n: fifo for n in ("a", "b", "c")})
    assert order == ["a", "b", "c"]


async def test_a_freed_slot_goes_to_the_least_key_at_release_time() -> None:
    now = [0.0]
    slots = NodeSlots(1, clock=lambda: now[0])
    due = {"batch": (0, False, 30.0), "chat": (-1, False, 2.0), "chat_sooner": (-1, False, 1.5)}
    # a key that depends on the time: this one turns late (after the rest) once now > 1.0
    keys: dict[str, OrderKey] = {
        "late": lambda t: (-1, 1.0 < t, 1.0),
        **{n: _const(k) for n, k in due.items()},
    }
    now[0] = 5.0
    assert await _admission_order(slots, keys) == ["chat_sooner", "chat", "late", "batch"]


async def test_the_cap_holds_and_a_cancelled_waiter_gives_its_place_up() -> None:
    slots = NodeSlots(2, clock=lambda: 0.0)
    inside = 0
    peak = 0

    async def call() -> None:
        nonlocal inside, peak
        async with slots.hold():
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(call()) for _ in range(6)]
        await asyncio.sleep(0)
        tasks[-1].cancel()  # waiting: leaves the queue without taking a slot
    assert peak == 2 and slots.free == 2 and slots.waiting == 0


def test_the_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="limit"):
        NodeSlots(0, clock=lambda: 0.0)


def test_the_broker_waits_in_the_stages_batch_order_only_for_an_ordering_scheduler() -> None:
    chat = Tracker(TraceRequest(1, 2.0, 8, 4, source_row=0), released_s=2.0, slo_class=CHAT)
    batch = Tracker(TraceRequest(2, 0.0, 8, 4, source_row=1), released_s=0.0, slo_class=BATCH)
    assert wait_order(chat, ordered=False) is fifo and wait_order(batch, ordered=False) is fifo
    first = wait_order(chat, ordered=True)
    assert first(2.5) == (-1, False, 3.0)  # TTFT due at arrival + 1 s, on time
    assert first(3.5) == (-1, True, 3.0)  # past it: after the chat steps still on time
    chat.token_times_s.append(2.8)
    assert wait_order(chat, ordered=True)(3.0) == (-1, False, pytest.approx(3.3))  # + TPOT
    assert wait_order(batch, ordered=True)(3.0) == (0, False, 30.0)  # E2E only, priority 0
