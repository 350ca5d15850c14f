"""What an (emulated) run adds to its results: the plan's load and the pacing fidelity.

- :func:`offered_load`: the replayed requests' rate, the plan's capacity (for its reference
  shape, :func:`testbed.cost.capacity.plan_capacity`) and the bottleneck's utilisation, so each
  compared plan's stability is printed beside its results.
- :func:`fidelity_line`: one line on the console for the ``"emulation"`` summary block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from testbed.emulation.fidelity import OVERRUN_WARN_FRACTION


def offered_rate_rps(arrivals_s: Sequence[float]) -> float:
    """Requests per second over the arrival span (n - 1 gaps; 0 for fewer than 2)."""
    if len(arrivals_s) < 2:
        return 0.0
    span = max(arrivals_s) - min(arrivals_s)
    return (len(arrivals_s) - 1) / span if span > 0 else 0.0


def offered_load(plan: Any, arrivals_s: Sequence[float], scheduler: str) -> dict[str, Any]:
    from testbed.cost.capacity import plan_capacity

    cap = plan_capacity(plan, even_dispatch=scheduler == "round_robin")
    rate = offered_rate_rps(arrivals_s)
    return {
        **cap.to_dict(),
        "offered_rps": rate,
        "bottleneck_utilisation": cap.utilisation(rate),
        "reference_shape": plan.shape.model_dump(mode="json"),
    }


def load_line(label: str, load: dict[str, Any]) -> str:
    util = load["bottleneck_utilisation"]
    colour = "green" if util < 0.8 else ("yellow" if util < 1 else "red")
    cap = load["capacity_rps"]
    cap_text = "inf" if cap is None else f"{cap:.3g}"
    return (
        f"{label}: offered {load['offered_rps']:.3g} req/s, capacity {cap_text} req/s "
        f"(bottleneck {load['bottleneck']}): utilisation [{colour}]{util:.2f}[/]"
    )


def fidelity_line(em: dict[str, Any]) -> str:
    frac = em["overrun_fraction"]
    p50, p99 = em.get("pacing_error_p50_s"), em.get("pacing_error_p99_s")
    r50 = em.get("pacing_error_rel_p50")
    colour = "green" if frac <= OVERRUN_WARN_FRACTION else "yellow"

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.2f} ms"

    rel = "-" if r50 is None else f"{r50 * 100:.1f} %"
    return (
        f"emulation ({em.get('model')} {em.get('dtype')}, {em.get('cost_source')}): "
        f"{em['steps']} steps, overrun [{colour}]{frac * 100:.2f} %[/], pacing error p50 "
        f"{ms(p50)} ({rel}), p99 {ms(p99)}"
    )


def overrun_warning(em: dict[str, Any]) -> str | None:
    frac = em["overrun_fraction"]
    if frac <= OVERRUN_WARN_FRACTION:
        return None
    return (
        f"{frac * 100:.1f} % of emulated steps overran their window (> "
        f"{OVERRUN_WARN_FRACTION * 100:g} %): the host could not keep up, so those steps took "
        "longer than the emulated device would; use fewer nodes or shorter requests "
        "(--strict fails such a run)"
    )
