"""Scenario timelines: events parse with units, are checked against the topology and the run,
and rate_scale warps arrival times."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.spec.scenario import load_scenario
from testbed.spec.timeline import TimelineEvent, scale_arrivals
from testbed.workload.request import TraceRequest
from tests.factories import scenario_dict, topology_dict, write_yaml

EVENTS = [
    {"at": "5s", "node": "edge-0", "speed": 0.5},
    {"at": "10s", "link": "edge->fog", "bandwidth": "10Mbit", "delay": "40ms", "loss": "1%"},
    {"at": "20s", "node": "fog-1", "down": "crash"},
    {"at": "25s", "rate_scale": 2.0},
    {"at": "30s", "node": "fog-1", "up": True},
    {"at": "31s", "node": "fog-0", "down": "partition"},
]


def _load(tmp_path, timeline, **over):
    write_yaml(tmp_path / "topo.yaml", topology_dict())
    p = write_yaml(tmp_path / "s.yaml", scenario_dict(duration="60s", timeline=timeline, **over))
    return load_scenario(p)


def test_every_kind_parses(tmp_path):
    scn = _load(tmp_path, EVENTS)
    kinds = [e.kind for e in scn.spec.timeline]
    assert kinds == ["speed", "link", "down", "rate_scale", "up", "down"]
    link = scn.spec.timeline[1]
    assert link.bandwidth_bps == 10e6 and link.delay_s == pytest.approx(0.04)
    assert link.loss_pct == 1.0 and link.jitter_s is None
    assert "edge->fog" in link.describe() and link.to_dict()["kind"] == "link"


BAD = [
    ({"at": "5s", "node": "fog-9", "down": "crash"}, "timeline[0].node", "unknown node 'fog-9'"),
    ({"at": "5s", "link": "edge->cloud", "delay": "1ms"}, "timeline[0].link", "no link"),
    ({"at": "90s", "rate_scale": 2.0}, "timeline[0].at", "not before the run's end"),
    ({"at": "5s", "node": "fog-1", "up": True}, "timeline[0].up", "is not down"),
    ({"at": "5s", "node": "fog-1", "down": "explode"}, "timeline[0].down", "crash"),
    ({"at": "5s", "node": "fog-1", "speed": 0.5, "up": True}, "timeline[0]", "exactly one"),
    ({"at": "5s", "link": "edge->fog"}, "timeline[0]", "at least one"),
    ({"at": 5, "rate_scale": 2.0}, "timeline[0].at", "no unit"),
    ({"at": "5s", "node": "fog-1", "spead": 0.5}, "timeline[0]", "did you mean 'speed'"),
]


@pytest.mark.parametrize(("event", "field", "text"), BAD)
def test_bad_events_name_the_field(tmp_path, event, field, text):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, [event])
    msg = str(err.value)
    assert "s.yaml" in msg and field in msg and text in msg, msg
    assert err.value.exit_code == 2


def test_down_twice_is_refused(tmp_path):
    ev = {"at": "5s", "node": "fog-1", "down": "crash"}
    with pytest.raises(ConfigError, match=r"timeline\[1\].down: fog-1 is already down"):
        _load(tmp_path, [ev, ev | {"at": "6s"}])


def _req(i: int, t: float) -> TraceRequest:
    return TraceRequest(request_id=i, arrival_s=t, prompt_tokens=4, output_tokens=2, source_row=i)


def test_rate_scale_warps_only_later_arrivals():
    reqs = [_req(i, float(i)) for i in range(10)]  # one per second
    ev = [TimelineEvent.model_validate({"at": 4.0, "rate_scale": 2.0})]
    out = [r.arrival_s for r in scale_arrivals(reqs, ev)]
    assert out[:5] == [0, 1, 2, 3, 4]
    assert out[5:] == pytest.approx([4.5, 5, 5.5, 6, 6.5])  # twice as dense after 4 s
    back = [TimelineEvent.model_validate({"at": 5.0, "rate_scale": 1.0})]
    out2 = [r.arrival_s for r in scale_arrivals(reqs, ev + back)]
    assert out2 == pytest.approx([0, 1, 2, 3, 4, 4.5, 5, 6, 7, 8])  # 5 s run = 6 s trace
    assert scale_arrivals(reqs, []) == reqs
