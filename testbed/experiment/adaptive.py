"""Adaptive re-partitioning in a replay (``repartition:``, :mod:`testbed.spec.repartition`).

The replay-side twin of the simulator's :mod:`testbed.sim.migrate` (same decision, same
record format). Every ``every`` seconds of the run clock the :class:`Replanner` measures:

- each inter-tier link's bandwidth from the broker's own transfers over it as they happen
  (every hop's transfer span, bytes and seconds, of the last check interval when they show a
  bandwidth on their own, so a change is acted on one check after it, else of the last two): a
  prefill's hidden states are many times a decode step's, so the extra seconds of the median
  prefill transfer over the median decode transfer, for the extra bytes, is the bandwidth,
  the per-message cost (HTTP, framing, the link's delay) cancelling out. It only counts when
  the extra seconds stand out from the decode transfers' spread (their interquartile range
  over the square root of the number of prefills, at least 1 ms): below that the link shows
  no slowdown and is taken at its configured rate (on a busy host a few ms of jitter hide a
  fast link's transfer time). A link with no prefill and decode transfer in that time (no
  traffic, or no longer crossed by the plan) keeps its last estimate (the topology's at the
  start);
- each node's speed from the scheduler's capacity estimates (ARTS's C_hat) relative to their
  median, counted only when it is at least 2x off (:func:`testbed.cost.replan.normalized_speed`;
  1 otherwise, and without an estimate);

and asks :func:`testbed.cost.replan.decide`. When it says migrate (``confirm`` checks in a
row proposing the same split; one migration at a time):

1. every node of the new plan whose range changes loads it beside its current one
   (``POST /load`` with ``keep: true``, all in parallel; :mod:`testbed.stage.generations`);
   the stages keep serving meanwhile. A refusal aborts the migration (ranges already loaded
   are unloaded again) and is recorded;
2. memory during the overlap: each such node's ``/info`` (both ranges' weights, caches, RSS);
3. the broker switches: new requests take the new layout, requests in flight finish on the
   old one (every step names its blocks, :mod:`testbed.broker.generation`);
4. once the old plan's last request left, each node unloads its old range (``POST /unload``).
   A node the new plan leaves out keeps its only range (it gets no new request).

Every check is recorded (when, the decision and why, the measured links and speeds, old and
new cuts, predicted bottlenecks); a migration also its load, switch and drain times and the
overlap memory. Migrations are listed with the timeline's events (``kind: replan``), so the
plots and the Perfetto trace mark them.

A dilated run (emulated devices, ``dilation: k``) checks every k x ``every`` of real time,
measures its transfers back on the emulated clock (times / k, so the links come out as
configured, not k times slower), decides on the emulated links and devices, and records every
time on the emulated clock (a load's real seconds / k too).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from testbed.broker.layout import Layout, WorkPredictor
from testbed.cost.replan import (
    Confirmation,
    MeasuredState,
    ReplanDecision,
    decide,
    measured_topology,
    normalized_speed,
)
from testbed.emulation.dilation import dilate_link, undilate_topology
from testbed.errors import ConfigError
from testbed.metrics.records import Span
from testbed.spec.repartition import RepartitionSpec
from testbed.spec.topology import LinkSpec, Topology

if TYPE_CHECKING:
    from rich.console import Console

    from testbed.broker.broker import Broker, BrokerConfig
    from testbed.experiment.prepare import Prepared
    from testbed.runtime.base import RunningTestbed

UNLOAD_TRIES = 5  # a cache whose release is still on its way: try again a second later


RUNTIMES_MIGRATING = ("local", "docker")  # stage servers reached over HTTP from this host


def check_adaptive(src: str, runtime: str) -> None:
    """A ConfigError (exit 2) when a replay on this runtime cannot re-partition yet; called
    before a testbed comes up."""
    if runtime not in RUNTIMES_MIGRATING:
        raise ConfigError(
            f"re-partitioning in a replay runs on the {' and '.join(RUNTIMES_MIGRATING)} "
            f"runtimes so far, not {runtime}; use `testbed simulate` for it",
            source=src,
            field="repartition",
        )


def adaptive_replanner(
    prep: Prepared, tb: RunningTestbed, config: BrokerConfig, console: Console
) -> Replanner:
    """The re-planner of an adaptive run (``repartition:``, or a ``+adaptive`` pair); a
    ConfigError for what it does not support yet."""
    spec = prep.loaded.spec.repartition
    src = str(prep.loaded.path)
    if spec is None:
        raise ConfigError(
            f"{prep.pair} re-partitions but the scenario has no `repartition:`; add e.g. "
            "repartition: {every: 10s, threshold: 10%}",
            source=src,
            field="repartition",
        )
    check_adaptive(src, tb.runtime)

    def said(m: dict[str, Any]) -> None:
        console.print(
            f"[magenta]re-plan[/] {m['switched_s']:.2f}s: {m['old_cuts']} -> {m['new_cuts']} "
            f"(loaded in {m['load_s']:.2f}s)"
        )

    return Replanner(spec, prep, tb, on_replan=said)


class LinkMeter:
    """Per inter-tier link, the bandwidth the broker's transfers over it show (module doc).
    ``topology``: the links as planned; ``k``: a dilated run's time dilation (its transfers
    are measured back on the emulated clock: times / k)."""

    def __init__(self, topology: Topology, k: float = 1.0) -> None:
        topo = topology
        self.k = k
        self.tiers = topo.tier_names
        self.tier_of = {n.name: self.tiers[j] for j, n in topo.nodes()}
        self.nominal = [topo.uplink(j) for j in range(len(self.tiers) - 1)]
        self.estimate = [ln.bandwidth_bps if ln else 0.0 for ln in self.nominal]
        self._samples: list[list[tuple[float, str, int, float]]] = [[] for _ in self.nominal]

    def observe(self, spans: list[Span]) -> None:
        """A hop's spans (the broker's ``on_spans``)."""
        for sp in spans:
            if sp.kind != "transfer" or sp.peer is None or not sp.nbytes:
                continue
            a, b = self.tier_of.get(sp.node), self.tier_of.get(sp.peer)
            if a is None or b is None or a == b:
                continue
            j = min(self.tiers.index(a), self.tiers.index(b))
            k = self.k
            self._samples[j].append((sp.start_s / k, sp.phase, int(sp.nbytes), sp.dur_s / k))

    def measure(
        self, since_s: float, recent_s: float | None = None
    ) -> tuple[tuple[LinkSpec, ...], list[dict[str, Any]]]:
        """The links as measured from the transfers that started after ``recent_s`` when
        they alone show a bandwidth (a change is seen one interval after it), else from all
        that started after ``since_s``."""
        links, seen = [], []
        for j, link in enumerate(self.nominal):
            assert link is not None
            self._samples[j] = [x for x in self._samples[j] if x[0] > since_s]
            got, window = None, since_s
            if recent_s is not None:
                got, window = (
                    self._slope([x[1:] for x in self._samples[j] if x[0] > recent_s]),
                    recent_s,
                )
            if got is None:
                got, window = self._slope([x[1:] for x in self._samples[j]]), since_s
            if got is not None:
                self.estimate[j] = min(got, link.bandwidth_bps)
            links.append(link.model_copy(update={"bandwidth_bps": self.estimate[j]}))
            seen.append({"link": f"{self.tiers[j]}->{self.tiers[j + 1]}",
                         "bandwidth_bps": self.estimate[j], "measured": got is not None,
                         "since_s": window if got is not None else None,
                         "samples": len(self._samples[j])})  # fmt: skip
        return tuple(links), seen

    @staticmethod
    def _slope(samples: list[tuple[str, int, float]]) -> float | None:
        """Bandwidth (bit/s) the samples show; inf: no slowdown shows; None: too few."""
        big = sorted((d, n) for k, n, d in samples if k == "prefill")
        small = sorted((d, n) for k, n, d in samples if k != "prefill")
        if not big or len(small) < 4:
            return None
        (db, nb), (ds, ns) = big[len(big) // 2], small[len(small) // 2]
        iqr = small[(3 * len(small)) // 4][0] - small[len(small) // 4][0]
        if nb <= ns or db - ds <= max(iqr / len(big) ** 0.5, 1e-3):
            return float("inf")
        return 8 * (nb - ns) / (db - ds)


class Replanner:
    """Checks, decides and migrates during one replay (see the module docstring)."""

    def __init__(
        self,
        spec: RepartitionSpec,
        prep: Prepared,
        tb: RunningTestbed,
        *,
        on_replan: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.spec, self.prep, self.tb = spec, prep, tb
        # a dilated run (emulated devices, `dilation: k`) runs k times slower on links k times
        # slower: checks every k x `every`, decided on the emulated clock and links, recorded
        # back on the emulated clock (the broker's layouts keep the dilated links)
        self.k = prep.dilation
        self.topology = undilate_topology(prep.topology, self.k)
        self.meter = LinkMeter(self.topology, self.k)
        self.nodes = [(j, n.name) for j, n in prep.topology.nodes()]
        self.checks: list[dict[str, Any]] = []
        self.migrations: list[dict[str, Any]] = []
        self.on_replan = on_replan
        self._cuts = tuple(prep.plan.cuts)
        self._busy = False
        self._confirm = Confirmation(spec.confirm)
        self._tasks: set[asyncio.Task[Any]] = set()

    def markers(self) -> list[dict[str, Any]]:
        """The migrations as timeline entries (plot markers, Perfetto instants)."""
        return [
            {"at_s": m["decided_s"], "applied_s": m["switched_s"] or m["decided_s"],
             "kind": "replan", "what": f"re-plan {m['old_cuts']} -> {m['new_cuts']} "
             f"(load {m['load_s']:.3g}s)"}
            for m in self.migrations
        ]  # fmt: skip

    def summary(self) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(mode="json"), "checks": self.checks,
                "migrations": self.migrations}  # fmt: skip

    async def run(self, broker: Broker) -> None:
        """Check every ``every`` seconds of ``broker``'s run clock until cancelled."""
        broker.generational = True  # every step names its blocks from the start
        broker.on_spans = self.meter.observe
        n = 1
        try:
            while True:
                delay = n * self.spec.every_s * self.k - broker.now_s()
                if delay > 0:
                    await asyncio.sleep(delay)
                n += 1
                await self.check(broker)
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def now_s(self, broker: Broker) -> float:
        """The broker's run clock, on the emulated clock of a dilated run."""
        return broker.now_s() / self.k

    async def check(self, broker: Broker) -> None:
        now = self.now_s(broker)
        if self._busy:
            self.checks.append({"at_s": now, "migrate": False, "reason": "a migration is running"})
            return
        estimates = getattr(broker.scheduler, "capacity_estimates", None)
        raw = estimates() if callable(estimates) else {}
        speed = normalized_speed(raw, [n for _, n in self.nodes])
        every = self.spec.every_s
        links, seen = self.meter.measure(now - 2 * every, recent_s=now - every)
        prep = self.prep
        from testbed.sim.steps import planner_times

        d = decide(self._cuts, self.topology, prep.cost, prep.loaded.spec.planning,
                   MeasuredState(links, speed), threshold=self.spec.threshold,
                   allow_empty=self.spec.allow_empty,
                   node_block_s=planner_times(prep.calibrated))  # fmt: skip
        check: dict[str, Any] = {
            "at_s": now, "migrate": d.migrate, "reason": d.reason, "links": seen,
            "old_cuts": list(d.old_cuts), "new_cuts": list(d.new_cuts),
            "old_bottleneck_s": d.old_bottleneck_s, "new_bottleneck_s": d.new_bottleneck_s,
            "node_speed": dict(sorted(speed.items())),
            "capacity_estimates": dict(sorted(raw.items())),
        }  # fmt: skip
        self.checks.append(check)
        if not self._confirm(d.migrate, d.new_cuts, check):
            return
        why = self.cannot_migrate(d)
        if why is not None:
            check["migrate"] = False
            check["reason"] += f"; not migrated: {why}"
            return
        self._busy = True
        topo = measured_topology(prep.topology, [dilate_link(x, self.k) for x in links])
        task = asyncio.create_task(self.migrate(broker, d, topo, now), name="migration")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cannot_migrate(self, d: ReplanDecision) -> str | None:
        """Why the testbed cannot take ``d``'s plan (None: it can)."""
        urls = {n.name for n in self.tb.stage_nodes()}
        missing = sorted(n for st in d.plan.active_stages() for n in st.nodes if n not in urls)
        return f"{', '.join(missing)} run(s) no stage server" if missing else None

    async def migrate(
        self, broker: Broker, d: ReplanDecision, topology: Topology, decided: float
    ) -> dict[str, Any]:
        """Move ``broker``'s new requests onto ``d``'s plan (``topology``: the links as
        measured) and unload the old ranges once drained (module docstring); its record."""
        urls = {n.name: n.url for n in self.tb.stage_nodes()}
        layout = Layout.from_plan(d.plan, topology, urls, self.prep.cost)
        self._busy = True
        try:
            return await self._migrate(broker, layout, d, decided)
        finally:
            self._busy = False

    async def _migrate(
        self, broker: Broker, layout: Layout, d: ReplanDecision, decided: float
    ) -> dict[str, Any]:
        # what each node serves new requests with now (a node the last plan left out too)
        old_ranges = {ep.name: (ep.start, ep.end) for ep in self.tb.stage_nodes()}
        left_out = set(broker.layout.nodes)
        new_ranges = {n: (st.start, st.end) for st in layout.stages for n in st.nodes}
        todo = {n: r for n, r in new_ranges.items() if old_ranges.get(n) != r}
        m: dict[str, Any] = {
            "decided_s": decided, "reason": d.reason, "old_cuts": list(d.old_cuts),
            "new_cuts": list(d.new_cuts), "predicted_old_s": d.old_bottleneck_s,
            "predicted_new_s": d.new_bottleneck_s, "load_s": 0.0, "node_load_s": {},
            "switched_s": None, "drained_s": None, "unloaded": {}, "overlap_memory": {},
        }  # fmt: skip
        self.migrations.append(m)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
                t0 = time.monotonic()
                loaded = await self._load_all(http, layout, todo, m)
                m["load_s"] = (time.monotonic() - t0) / self.k
                if loaded is None:
                    return m
                for n in todo:
                    m["overlap_memory"][n] = await self._memory(http, layout.nodes[n].url, n)
                broker.switch(layout, WorkPredictor(layout, self.prep.cost))
                self._cuts = tuple(d.new_cuts)
                m["switched_s"] = self.now_s(broker)
                for n, (a, b) in new_ranges.items():  # what the testbed serves new requests with
                    ep = self.tb.nodes[n]
                    ep.start, ep.end = a, b
                await asyncio.to_thread(self.tb.save)
                if self.on_replan is not None:
                    self.on_replan(m)
                await broker.past[-1].drained.wait()
                m["drained_s"] = self.now_s(broker)
                for n in todo:
                    if n in old_ranges:
                        m["unloaded"][n] = await self._unload(
                            http, layout.nodes[n].url, old_ranges[n]
                        )
                for n in sorted(left_out - set(new_ranges)):
                    m["unloaded"][n] = "kept: the node's only range (no new request goes there)"
        except BaseException:  # the run ended (or failed) first
            if m["switched_s"] is None:
                m["failed"] = m.get("failed") or "interrupted before the switch"
            else:
                m["unloaded"] = (
                    m["unloaded"] or "not done: the run ended before the old plan drained"
                )
            raise
        return m

    async def _load_all(self, http: aiohttp.ClientSession, layout: Layout,
                        todo: dict[str, tuple[int, int]], m: dict[str, Any]) -> bool | None:  # fmt: skip
        """Load every changed range beside the current one; None (recorded) when one failed."""
        errors: dict[str, str] = {}

        async def one(n: str, a: int, b: int) -> None:
            t = time.monotonic()
            body = {"start": a, "end": b, "keep": True}
            try:
                async with http.post(layout.nodes[n].url + "/load", json=body) as resp:
                    got = await resp.json()
                    if resp.status != 200:
                        errors[n] = f"HTTP {resp.status}: {got.get('error', got)}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                errors[n] = f"{type(exc).__name__}: {exc}"
            m["node_load_s"][n] = (time.monotonic() - t) / self.k

        async with asyncio.TaskGroup() as tg:
            for n, (a, b) in sorted(todo.items()):
                tg.create_task(one(n, a, b))
        if not errors:
            return True
        m["failed"] = errors
        for n, r in todo.items():  # back to the old plan alone: drop what did load
            if n not in errors:
                await self._unload(http, layout.nodes[n].url, r)
        return None

    async def _memory(self, http: aiohttp.ClientSession, url: str, node: str) -> dict[str, Any]:
        try:
            async with http.get(url + "/info") as resp:
                info = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        _, spec = self.prep.topology.node(node)
        weights, kv = int(info["param_bytes"]), int(info["kv_bytes"])
        mem = int(spec.device.mem)
        return {"weights_bytes": weights, "kv_used_bytes": kv, "rss_bytes": info.get("rss_bytes"),
                "mem_bytes": mem, "fits": weights + kv <= mem,
                "generations": info.get("generations")}  # fmt: skip

    async def _unload(self, http: aiohttp.ClientSession, url: str, r: tuple[int, int]) -> str:
        why = ""
        for _ in range(UNLOAD_TRIES):
            try:
                async with http.post(url + "/unload", json={"start": r[0], "end": r[1]}) as resp:
                    got = await resp.json()
                    if resp.status == 200:
                        return f"unloaded {r[0]}:{r[1]} ({got.get('freed_bytes')} bytes freed)"
                    why = f"HTTP {resp.status}: {got.get('error', got)}"
                    if resp.status != 409:
                        break
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(1.0)
        return f"not unloaded: {why}"
