"""A link change while running is made in place when the same qdiscs serve both shapes."""

from __future__ import annotations

from testbed.net.shaping import DirShape, Iface, change_ops, egress_ops

IF = Iface(7, "veth0")


def test_a_rate_and_delay_change_replaces_in_place_without_clearing_the_root() -> None:
    old = DirShape(100e6, 0.010, 0.002, 0.1)
    new = DirShape(10e6, 0.040, 0.002, 1.0)
    ops = change_ops(IF, old, new, "kernel")
    # no "del", and no replace of the existing htb root (EINVAL: htb has no change op)
    assert [(o.command, o.kind) for o in ops] == [("replace-class", "htb"), ("replace", "netem")]
    assert ops == egress_ops(IF, new, "kernel")[2:]
    assert dict(ops[0].params)["rate"] == "10000000bit"
    assert dict(ops[1].params)["delay"] == 40_000 and dict(ops[1].params)["loss"] == 1.0
    rate_only = change_ops(IF, DirShape(100e6), DirShape(10e6), "kernel-rate+app-delay")
    assert [(o.command, o.kind) for o in rate_only] == [("replace-class", "htb")]


def test_a_change_of_layout_rebuilds_the_root() -> None:
    old = DirShape(100e6, 0.010)
    new = DirShape(100e6, 0.0)  # netem no longer needed under the htb class
    ops = change_ops(IF, old, new, "kernel")
    assert ops[0].command == "del" and ops == egress_ops(IF, new, "kernel")


def test_a_partition_is_all_loss() -> None:
    from testbed.runtime.control import CUT

    ops = egress_ops(IF, CUT, "kernel")
    assert dict(ops[-1].params)["loss"] == 100.0 and ops[-1].kind == "netem"
