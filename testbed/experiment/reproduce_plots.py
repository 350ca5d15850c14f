"""The figures of `testbed reproduce hyperion`; each says the load it was measured at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.experiment.reproduce import GPIPE, HYPERION, NAMES, Point


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def rate_plot(path: Path, points: Sequence[Point]) -> Path:
    """E2E mean vs rate per pair (hollow markers: the plan is past capacity) and each plan's
    predicted bottleneck utilisation vs rate."""
    pts = [p for p in points if p.experiment == "rate"]
    fig = _figure(13, 5)
    ax, ux = fig.subplots(1, 2)
    for k, pair in enumerate(dict.fromkeys(p.pair for p in pts)):
        mine = sorted((p for p in pts if p.pair == pair), key=lambda p: p.rate_rps)
        color = f"C{k}"
        label = f"{NAMES.get(pair, pair)} ({pair}), capacity {mine[0].capacity_rps:.3g} req/s"
        xs = [p.rate_rps for p in mine if p.e2e_mean_s is not None]
        ys = [p.e2e_mean_s for p in mine if p.e2e_mean_s is not None]
        ax.plot(xs, ys, color=color, alpha=0.35, lw=1)
        st = [(p.rate_rps, p.e2e_mean_s) for p in mine if p.stable and p.e2e_mean_s is not None]
        un = [(p.rate_rps, p.e2e_mean_s) for p in mine if not p.stable and p.e2e_mean_s]
        if st:
            ax.plot(*zip(*st, strict=True), "o-", color=color, label=label)
        if un:
            ax.plot(*zip(*un, strict=True), "o", mfc="none", color=color)
        ux.plot([p.rate_rps for p in mine], [100 * p.utilisation for p in mine], "o-",
                color=color, label=pair)  # fmt: skip
    ux.axhline(100, color="k", lw=0.8, ls="--")
    model = pts[0].model if pts else ""
    mean_p = pts[0].prompt_tokens_mean if pts else 0
    mean_o = pts[0].output_tokens_mean if pts else 0
    ax.set_title(
        f"{model}: E2E mean vs load (hollow: past capacity, unstable)\n"
        f"Poisson arrivals, mean {mean_p:.0f} prompt / {mean_o:.0f} output tokens",
        fontsize="medium",
    )
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("E2E mean (s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
    ux.set_title("predicted bottleneck utilisation (rate / capacity)", fontsize="medium")
    ux.set_xlabel("request rate (req/s)")
    ux.set_ylabel("utilisation (%)")
    ux.set_xscale("log")
    ux.set_yscale("log")
    ux.grid(alpha=0.3, which="both")
    return _save(fig, path)


def long_plot(path: Path, points: Sequence[Point]) -> Path:
    """E2E mean vs output length, Hyperion vs GPipe, one panel per load level (the k-th lowest
    rate of each length: the same fraction of the weaker plan's capacity at that length)."""
    pts = [p for p in points if p.experiment == "long"]
    lengths = sorted({p.output_tokens_mean for p in pts})
    levels = {n: sorted({p.rate_rps for p in pts if p.output_tokens_mean == n}) for n in lengths}
    n_levels = max((len(v) for v in levels.values()), default=1)
    fig = _figure(4.8 * n_levels, 4.4)
    axes = fig.subplots(1, n_levels, squeeze=False)[0]
    for k, ax in enumerate(axes):
        here = [
            p for p in pts if len(levels[p.output_tokens_mean]) > k
            and p.rate_rps == levels[p.output_tokens_mean][k]
        ]  # fmt: skip
        for pair, color in ((HYPERION, "C0"), (GPIPE, "C1")):
            mine = sorted((p for p in here if p.pair == pair), key=lambda p: p.output_tokens_mean)
            xs = [p.output_tokens_mean for p in mine if p.e2e_mean_s is not None]
            ys = [p.e2e_mean_s for p in mine if p.e2e_mean_s is not None]
            utils = ", ".join(f"{100 * p.utilisation:.0f}%" for p in mine)
            ax.plot(xs, ys, "o-", color=color, label=f"{NAMES[pair]} (util {utils})")
        busiest = max((p.utilisation for p in here), default=0.0)
        rates = ", ".join(f"{p.rate_rps:.3g}" for p in sorted(here, key=lambda p: p.output_tokens_mean)
                          if p.pair == HYPERION)  # fmt: skip
        ax.set_title(
            f"load {k + 1}: weaker plan {100 * busiest:.0f} % busy\n(req/s per length: {rates})",
            fontsize="small",
        )
        ax.set_xlabel("output tokens")
        ax.set_ylabel("E2E mean (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    prompt = pts[0].prompt_tokens_mean if pts else 0
    fig.suptitle(
        f"{pts[0].model if pts else ''}: long-sequence generation, {prompt:.0f}-token prompts",
        fontsize="medium",
    )
    return _save(fig, path)


def util_plot(path: Path, points: Sequence[Point], rates: Sequence[float]) -> Path:
    """Measured utilisation per tier for every pair, at each of ``rates``."""
    pts = [p for p in points if p.experiment == "rate"]
    fig = _figure(6.5 * max(len(rates), 1), 4.5)
    axes = fig.subplots(1, max(len(rates), 1), squeeze=False)[0]
    for ax, rate in zip(axes, rates, strict=False):
        here = [p for p in pts if p.rate_rps == rate]
        tiers = list(here[0].tier_util) if here else []
        width = 0.8 / max(len(here), 1)
        for k, p in enumerate(here):
            xs = [i + (k - (len(here) - 1) / 2) * width for i in range(len(tiers))]
            tag = "" if p.stable else ", unstable"
            ax.bar(xs, [100 * p.tier_util[t] for t in tiers], width, color=f"C{k}",
                   label=f"{p.pair} (plan {100 * p.utilisation:.0f}%{tag})")  # fmt: skip
        ax.set_xticks(range(len(tiers)), tiers)
        ax.set_ylabel("measured utilisation, mean over the tier's nodes (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{here[0].model if here else ''} at {rate:.3g} req/s", fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="x-small")
    return _save(fig, path)
