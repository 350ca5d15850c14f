"""Each node's ``max_batch`` (continuous batching: most requests one step runs together).

Three places may set it; the first that does wins for a node:

1. an override: ``testbed simulate --max-batch N`` (every node of that run);
2. the node's own ``max_batch`` in the topology file;
3. the scenario's ``max_batch`` (the default for nodes that do not set one);

else each component keeps its own default: the stage server batches up to 16 requests
(``stage serve --max-batch``), the simulator one step at a time (1). The runtimes pass a
node's value to its stage server as ``--max-batch``; an emulated node paces the batches its
server forms, so it follows the same value; the simulator batches each node up to its value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from testbed.errors import brief

if TYPE_CHECKING:
    from testbed.spec.topology import Topology

MAX_BATCH = 4096  # the most requests one step may batch (as `stage serve --max-batch`)


def check_max_batch(v: Any) -> Any:
    """A whole number 1..MAX_BATCH (None: not set); the message names the fix."""
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_BATCH:
        raise ValueError(
            f"max_batch: {brief(v)} is not a whole number from 1 to {MAX_BATCH}; write e.g. "
            "max_batch: 8 (requests batched per step; 1 = one at a time) or leave it out"
        )
    return v


def node_max_batch(
    topology: Topology, default: int | None = None, override: int | None = None
) -> dict[str, int | None]:
    """Node name -> its max_batch by the precedence above (None: the component's default)."""
    return {
        n.name: override
        if override is not None
        else (n.max_batch if n.max_batch is not None else default)
        for _, n in topology.nodes()
    }


def with_max_batch(
    topology: Topology, default: int | None = None, override: int | None = None
) -> Topology:
    """The topology with every node's resolved max_batch written on it (what a runtime reads)."""
    values = node_max_batch(topology, default, override)
    tiers = tuple(
        t.model_copy(
            update={
                "nodes": tuple(n.model_copy(update={"max_batch": values[n.name]}) for n in t.nodes)
            }
        )
        for t in topology.tiers
    )
    return topology.model_copy(update={"tiers": tiers})
