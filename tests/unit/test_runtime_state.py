"""Runtime bookkeeping without Docker or root: state files, hooks rebuilt, link verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import RuntimeBackendError
from testbed.net.appshaper import AppShaper, HopShape
from testbed.net.shaping import DirShape
from testbed.runtime.base import LinkCheck, NodeEndpoint, RunningTestbed, list_states, load_running
from testbed.runtime.control import clean_sync, down_sync
from testbed.runtime.measure import Tolerance, judge


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path))
    return tmp_path


def _tb() -> RunningTestbed:
    hop = HopShape(
        DirShape(50e6, 0.005, 0.001, 0.1), DirShape(None, 0.005, 0.001, 0.1), apply_rate=True
    )
    nodes = {
        "e1": NodeEndpoint("e1", "edge", 0, "http://127.0.0.1:1", 0, 2, "cpu", "127.0.0.1", 9101),
        "f1": NodeEndpoint(
            "f1",
            "fog",
            1,
            "http://127.0.0.1:2",
            2,
            4,
            "cpu",
            "127.0.0.1",
            9101,
            link="edge->fog",
            link_rtt_s=0.01,
            link_rate_bps=50e6,
            hop=hop,
        ),
    }
    return RunningTestbed(
        "tb0123abcd",
        "local",
        "app",
        "t.yaml",
        "t",
        "/m",
        nodes,
        seed=3,
        checks=[LinkCheck("f1", "edge->fog", 0.01, 50e6, 0.011, 49e6, True)],
    )


def test_state_round_trip_rebuilds_hooks():
    tb = _tb()
    tb.save()
    assert list_states() == [tb.state_path]
    back = load_running()
    assert back.run_id == tb.run_id and back.nodes["f1"].hop == tb.nodes["f1"].hop
    assert isinstance(back.hook_for("f1"), AppShaper) and back.hook_for("e1") is None
    assert [n.name for n in back.stage_nodes()] == ["e1", "f1"]
    assert back.checks == tb.checks


def test_missing_and_broken_state_are_clear_errors(state_dir):
    with pytest.raises(RuntimeBackendError, match="no testbed is running"):
        load_running()
    with pytest.raises(RuntimeBackendError, match="no testbed run"):
        load_running("tb00000000")
    (state_dir / "tbbadbad00.json").write_text("{not json")
    with pytest.raises(RuntimeBackendError, match="unreadable"):
        load_running("tbbadbad00")


def test_down_of_a_recorded_local_run_removes_its_state_and_repeats(monkeypatch):
    tb = _tb()
    tb.save()
    assert "removed" in down_sync(tb.run_id)
    assert not tb.state_path.exists()
    assert "nothing to do" in down_sync()


def test_clean_all_without_docker_still_removes_states(monkeypatch):
    import testbed.runtime.docker as dockermod

    def no_docker():
        raise RuntimeBackendError("Docker is not reachable")

    monkeypatch.setattr(dockermod, "client", no_docker)
    monkeypatch.setattr("testbed.runtime.control.NETNS_DIR", Path("/nonexistent-netns-dir"))
    _tb().save()
    lines = clean_sync(everything=True)
    assert any("docker skipped" in x for x in lines) and not list_states()


def test_judge_tolerances():
    tol = Tolerance()
    assert judge(0.02, 100e6, 0.021, 95e6, tol) == (True, "")
    ok, note = judge(0.02, 100e6, 0.03, 95e6, tol)
    assert not ok and "RTT" in note
    ok, note = judge(0.02, 100e6, 0.02, 70e6, tol)
    assert not ok and "throughput off by -30%" in note
    assert judge(0.0, None, 0.0025, None, tol)[0]  # small absolute slack for unshaped links
