"""Offline partitioners (pure policies): cut a model's blocks into one contiguous range per tier.

Each partitioner is one file registered by name in ``PARTITIONERS``; they all work on the plain
arrays of a :class:`PartitionProblem` and return a :class:`Split`. Turning a split into a
:class:`testbed.spec.plan.Plan` (nodes, memory, predicted times) is the planner's job
(``testbed.cost.planner``), shared by all of them.
"""

from testbed.partition.base import PARTITIONERS, Partitioner, PartitionProblem, Split, split_cost

__all__ = ["PARTITIONERS", "PartitionProblem", "Partitioner", "Split", "split_cost"]
