"""Cost model (pure policy): predicted device times from a model profile and device profiles."""

from testbed.cost.model import CostModel

__all__ = ["CostModel"]
