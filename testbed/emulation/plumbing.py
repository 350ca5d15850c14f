"""Which `stage serve` flags make each node of a plan an emulated device (pure)."""

from __future__ import annotations

from testbed.emulation.timing import EmulationSpec, StageTiming
from testbed.spec.model_profile import MeasuredProfile, ModelProfile
from testbed.spec.plan import Plan
from testbed.spec.topology import Topology

# In emulation a node's speed comes from the timing: one torch thread per stage keeps ten
# containers from fighting over a small host's cores.
EMULATED_THREADS = 1

EMULATION_NOTE = (
    "emulated devices: each node's speed comes from its device profile's timing (the studied "
    "model's blocks), not from CPU quotas; the stand-in computes the outputs"
)


def emulation_specs(
    topology: Topology,
    plan: Plan,
    profile: ModelProfile,
    measured: MeasuredProfile | None = None,
    dilation: float = 1.0,
) -> dict[str, EmulationSpec]:
    """Node name -> its emulation spec, for every node that holds blocks in ``plan``.

    Checks each node's KV capacity (ConfigError when its blocks' weights do not fit)."""
    out: dict[str, EmulationSpec] = {}
    for tier in topology.tiers:
        for node in tier.nodes:
            stage = plan.stage_of_node(node.name)
            if stage is None:
                continue
            spec = EmulationSpec(
                node=node.name,
                profile=profile,
                device=node.device,
                measured=measured,
                dilation=dilation,
            )
            StageTiming(spec, stage.start, stage.end).kv_capacity_tokens()
            out[node.name] = spec
    return out


def serve_args(specs: dict[str, EmulationSpec]) -> dict[str, list[str]]:
    """Node name -> extra `testbed stage serve` arguments."""
    return {
        name: ["--emulate", spec.to_json(), "--threads", str(EMULATED_THREADS)]
        for name, spec in specs.items()
    }
