"""Loading a plan's block ranges into a running testbed (no model, no Docker): the calls made,
parked nodes, the state file, refusals; and what `compare` decides from it."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from testbed.errors import ConfigError, RuntimeBackendError
from testbed.experiment.lifecycle import plan_matches
from testbed.runtime.base import NodeEndpoint, RunningTestbed, load_running
from testbed.runtime.reload import load_ranges


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path))
    return tmp_path


class FakeStages:
    """One aiohttp app standing in for every node's stage server: /load answers like a stage
    (its new blocks), or 409 for the nodes told to refuse."""

    def __init__(self, refuse: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[tuple[str, int, int]] = []
        self.refuse = refuse
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _load(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        body = await request.json()
        self.calls.append((node, body["start"], body["end"]))
        if node in self.refuse:
            err = {"error": f"stage {node} holds 1 request cache(s)", "code": "in_use"}
            return web.json_response(err, status=409)
        return web.json_response({"name": node, "blocks": [body["start"], body["end"]]})

    async def __aenter__(self) -> FakeStages:
        app = web.Application()
        app.router.add_post("/{node}/load", self._load)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def _tb(url: str) -> RunningTestbed:
    def ep(name: str, tier: str, j: int, a: int, b: int) -> NodeEndpoint:
        return NodeEndpoint(name, tier, j, f"{url}/{name}", a, b, "cpu", "127.0.0.1", 9101)

    nodes = {
        "e1": ep("e1", "edge", 0, 0, 1),
        "e2": ep("e2", "edge", 0, 0, 1),
        "f1": ep("f1", "fog", 1, 1, 4),
    }
    tb = RunningTestbed("tb0000abcd", "local", "app", "t.yaml", "t", "/m", nodes)
    tb.save()
    return tb


async def test_load_changes_only_moved_nodes_and_parks_the_ones_left_out():
    async with FakeStages() as stages:
        tb = _tb(stages.url)
        done = await load_ranges(tb, {"e1": (0, 3), "f1": (3, 4)})
        assert sorted(stages.calls) == [("e1", 0, 3), ("f1", 3, 4)]
        assert done.loaded == {"e1": (0, 3), "f1": (3, 4)} and done.parked == ("e2",)
        assert "parked e2" in done.describe()
        saved = load_running(tb.run_id)  # the state file: what `status` and a replay read
        assert [(n.name, n.start, n.end) for n in saved.stage_nodes()] == [
            ("e1", 0, 3),
            ("f1", 3, 4),
        ]
        assert saved.nodes["e2"].parked and (saved.nodes["e2"].start, saved.nodes["e2"].end) == (
            0,
            1,
        )
        # a later plan takes the parked node back; an unchanged range is not loaded again
        stages.calls.clear()
        done = await load_ranges(tb, {"e1": (0, 3), "e2": (0, 3), "f1": (3, 4)})
        assert stages.calls == [("e2", 0, 3)] and done.parked == ()
        assert not load_running(tb.run_id).nodes["e2"].parked


async def test_a_refusal_or_an_unknown_node_fails_the_reload():
    async with FakeStages(refuse={"f1"}) as stages:
        tb = _tb(stages.url)
        with pytest.raises(ConfigError, match="runs no stage server on c1"):
            await load_ranges(tb, {"e1": (0, 2), "c1": (2, 4)})
        assert stages.calls == []
        with pytest.raises(
            RuntimeBackendError, match=r"f1: loading blocks 2:4 failed \(HTTP 409\)"
        ):
            await load_ranges(tb, {"e1": (0, 2), "e2": (0, 2), "f1": (2, 4)})
        saved = load_running(tb.run_id)  # what did load is recorded; nothing parked
        assert (saved.nodes["e1"].end, saved.nodes["f1"].start) == (2, 1)
        assert not any(n.parked for n in saved.nodes.values())


def test_plan_matches_ignores_parked_nodes():
    from types import SimpleNamespace

    tb = _tb("http://127.0.0.1:1")
    stages = [
        SimpleNamespace(start=0, end=1, nodes=("e1",)),
        SimpleNamespace(start=1, end=4, nodes=("f1",)),
    ]
    plan: Any = SimpleNamespace(active_stages=lambda: stages)  # all plan_matches reads
    assert not plan_matches(tb, plan)  # e2 serves blocks the plan does not give it
    tb.nodes["e2"].parked = True
    assert plan_matches(tb, plan)


def test_compare_reloads_only_onto_running_nodes_without_restarts():
    from types import SimpleNamespace

    from testbed.experiment.lifecycle import reload_refusal

    tb = _tb("http://127.0.0.1:1")

    def prep(nodes: tuple[str, ...], topology: str = "t", timeline: Any = None) -> Any:
        stages = [SimpleNamespace(start=0, end=4, nodes=nodes)]
        return SimpleNamespace(
            topology=SimpleNamespace(name=topology),
            plan=SimpleNamespace(active_stages=lambda: stages),
            loaded=SimpleNamespace(spec=SimpleNamespace(timeline=timeline)),
        )

    assert reload_refusal(tb, prep(("e1", "f1"))) is None  # e2 would be parked
    assert reload_refusal(tb, prep(("e1", "c1"))) == "it runs no node c1"
    assert "topology 't'" in (reload_refusal(tb, prep(("e1",), topology="other")) or "")
    restart = [SimpleNamespace(kind="down"), SimpleNamespace(kind="up")]
    assert "restarts nodes" in (reload_refusal(tb, prep(("e1",), timeline=restart)) or "")
    assert reload_refusal(tb, prep(("e1",), timeline=restart[:1])) is None


def test_compare_reloads_a_forwarding_testbed_only_onto_its_link_networks():
    """Docker forwarding joins consecutive stages of the first plan by link networks: a plan
    with its stages in other tiers, or on a node that was not a stage then, is brought up
    anew (hidden states would go where no link network goes)."""
    from types import SimpleNamespace

    from testbed.experiment.lifecycle import link_net_refusal

    tb = _tb("http://127.0.0.1:1")
    tb.nodes["e2"].parked = True  # the first plan served edge from e1 only
    tb.nodes["f1"].peer_url = "http://10.0.9.2:8000"  # on the edge -> fog link network

    def plan(*stages: tuple[str, tuple[str, ...]]) -> Any:
        st = [SimpleNamespace(tier=t, nodes=n) for t, n in stages]
        return SimpleNamespace(active_stages=lambda: st)

    assert link_net_refusal(tb, plan(("edge", ("e1",)), ("fog", ("f1",)))) is None
    why = link_net_refusal(tb, plan(("fog", ("f1",))))
    assert why == "its link networks join tiers edge -> fog, this plan's stages are in fog"
    why = link_net_refusal(tb, plan(("edge", ("e1", "e2")), ("fog", ("f1",))))
    assert why == "e2 joined no link network when it came up"
    tb.nodes["f1"].peer_url = None  # relay only (local, swarm): nothing to keep
    assert link_net_refusal(tb, plan(("fog", ("f1",)))) is None
