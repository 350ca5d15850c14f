"""ARTS over many replicas: route_ledger (numpy over the ledger's arrays) takes exactly the
decisions route(snapshot) takes; the ledger's batch progress and arrays equal its one-by-one
updates and its snapshots."""

from __future__ import annotations

import random

import pytest

from testbed.schedule import SCHEDULERS, NoRouteError, RequestView, StageCompletion
from testbed.schedule.arts import Arts
from testbed.schedule.ledger import Ledger

STAGES = (
    tuple(f"e{i:03d}" for i in range(60)),
    tuple(f"f{i:02d}" for i in (5, 3, 1, 4, 2, 0, 9, 8, 7, 6)),  # not in name order
    tuple(f"c{i}" for i in range(4)),
)


def ledger(kv: int = 10_000) -> Ledger:
    names = [n for st in STAGES for n in st]
    return Ledger(
        STAGES, {n: kv for n in names}, {n: 1.0 + (i % 3) * 0.5 for i, n in enumerate(names)}
    )


def view(i: int, rng: random.Random, shapes: list[dict[str, float]]) -> RequestView:
    return RequestView(
        i, 0.0, 16, 4, shapes[rng.randrange(len(shapes))], (rng.choice([0, 3000]),) * 3
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_ledger_decides_as_route(seed: int) -> None:
    rng = random.Random(seed)
    names = [n for st in STAGES for n in st]
    # a few request shapes; equal work on many nodes makes ties (broken by C_hat, then name)
    shapes = [
        {n: 1.0 for n in names},
        {n: rng.choice([0.5, 1.0, 2.0]) for n in names},
        {n: rng.random() for n in names},
    ]
    led_a, led_b = ledger(), ledger()
    fast, slow = Arts(alpha=0.3), Arts(alpha=0.3)
    live: list[int] = []
    for i in range(400):
        v = view(i, rng, shapes)
        if i % 37 == 5:
            down = rng.choice(names)
            for led in (led_a, led_b):
                led.mark_down(down, "test")
        if i % 53 == 7:
            for led in (led_a, led_b):
                for n in names:
                    led.mark_up(n)
        try:
            ra = fast.route_ledger(v, led_a, float(i))
        except NoRouteError:
            with pytest.raises(NoRouteError):
                slow.route(v, led_b.snapshot(float(i)))
            continue
        rb = slow.route(v, led_b.snapshot(float(i)))
        assert ra == rb, i
        work = [v.work_s[n] for n in ra]
        for led in (led_a, led_b):
            led.charge(i, ra, work, v.kv_bytes)
        live.append(i)
        # some steps finish (learned capacities diverge per node), some requests leave
        for _ in range(3):
            if not live:
                break
            j = rng.choice(live)
            route = led_a.route_of(j)
            assert route is not None
            s = rng.randrange(3)
            done, svc = rng.random() * 0.3, rng.choice([0.0, rng.random()])
            led_a.progress_many([(route[s], j, s, done, svc, float(i))])
            led_b.progress(j, s, done)
            observe = fast.step_observer()
            assert observe is not None
            observe([(route[s], j, s, done, svc, float(i)), (route[0], j, 0, done, 0.0, 0.0)])
            slow.on_complete(StageCompletion(route[s], j, done, svc, float(i)))
            slow.on_complete(StageCompletion(route[0], j, done, 0.0, 0.0))
        if rng.random() < 0.4 and live:
            j = live.pop(rng.randrange(len(live)))
            led_a.leave(j)
            led_b.leave(j)
    assert fast._c_hat == slow._c_hat
    # the arrays show what snapshots show
    snap = led_a.snapshot(0.0)
    for st, arr in zip(snap.stages, led_a.stage_arrays(), strict=True):
        by = {n.name: n for n in st}
        for i, name in enumerate(arr.names):
            assert arr.queued_work_s[i] == by[name].queued_work_s
            assert arr.mem_free_bytes[i] == by[name].mem_free_bytes
            assert arr.up[i] == by[name].up
    assert [b.queued_work_s for b in led_a.books.values()] == [
        b.queued_work_s for b in led_b.books.values()
    ]


def test_route_ledger_falls_back_for_small_clusters_and_subclasses() -> None:
    led = Ledger((("a", "b"), ("c",)))
    v = RequestView(0, 0.0, 4, 2, {"a": 2.0, "b": 1.0, "c": 1.0}, ())
    assert Arts().route_ledger(v, led, 0.0) == ("b", "c")
    assert SCHEDULERS.create("arts").step_observer() is not None

    class Custom(Arts):
        def on_complete(self, event: StageCompletion) -> None:
            pass

    assert Custom().step_observer() is None
