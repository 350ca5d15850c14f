"""Scenario request classes: parsing, errors, seeded assignment by share or trace column."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.spec.classes import RequestClass, assign_classes
from testbed.spec.scenario import load_scenario
from tests.factories import scenario_dict, topology_dict, write_yaml

CLASSES = [
    {"name": "chat", "share": 0.7, "slo": {"ttft": "1s", "tpot": "100ms"}, "priority": 1},
    {"name": "batch", "share": 0.3, "slo": {"e2e": "60s"}},
]


def test_classes_parse_with_units(tmp_path):
    write_yaml(tmp_path / "topo.yaml", topology_dict())
    scn = load_scenario(write_yaml(tmp_path / "s.yaml", scenario_dict(classes=CLASSES)))
    chat, batch = scn.spec.classes
    assert (chat.name, chat.priority, chat.slo.ttft_s, chat.slo.tpot_s) == ("chat", 1, 1.0, 0.1)
    assert (batch.slo.e2e_s, batch.slo.ttft_s, batch.priority) == (60.0, None, 0)


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        ([{**CLASSES[0], "share": 0.5}, CLASSES[1]], "sum to 0.8"),
        ([CLASSES[0], {**CLASSES[1], "name": "chat"}], "unique"),
        ([{**CLASSES[0], "slo": {"ttft": "soon"}}, CLASSES[1]], "ttft"),
        ([{**CLASSES[0], "colour": "red"}, CLASSES[1]], "colour"),
    ],
)
def test_bad_classes_are_explained(tmp_path, classes, words):
    write_yaml(tmp_path / "topo.yaml", topology_dict())
    with pytest.raises(ConfigError, match=words):
        load_scenario(write_yaml(tmp_path / "s.yaml", scenario_dict(classes=classes)))


def test_assignment_is_seeded_by_share_and_a_column_wins():
    classes = [RequestClass.model_validate(c) for c in CLASSES]
    a = assign_classes(2000, classes, seed=1)
    assert a == assign_classes(2000, classes, seed=1) != assign_classes(2000, classes, seed=2)
    assert 0.66 < a.count("chat") / 2000 < 0.74
    col = ["batch", None, "chat"]
    b = assign_classes(3, classes, seed=1, column=col)
    assert b[0] == "batch" and b[2] == "chat" and b[1] == a[1]
    with pytest.raises(ValueError, match="not one of"):
        assign_classes(1, classes, seed=1, column=["vip"])
    assert assign_classes(2, [], seed=1) == [None, None]
