"""`testbed reproduce hyperion`: loads, stability rule, and the quick run end to end."""

from __future__ import annotations

import csv
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from testbed.cli.main import main
from testbed.experiment import reproduce as rp
from testbed.experiment import reproduce_emulate as rpe


def test_rate_grid_covers_idle_each_baseline_and_the_best_plan() -> None:
    cfg = rp.ReproConfig.full()
    caps = {"a": 1.0, "b": 0.2, "c": 0.05, "d": 1.0}
    rates = rp.rate_grid(caps, cfg)
    assert rates == sorted(rates)
    assert rates[0] == pytest.approx(cfg.idle_fraction * 0.05)  # the weakest plan near idle
    assert rates[-1] == pytest.approx(0.9)  # the best plan 90 % busy
    for c in (0.2, 0.05):  # every weaker plan measured at half and 90 % of its capacity
        for f in cfg.baseline_fractions:
            assert any(r == pytest.approx(f * c) for r in rates)
    assert all(b > a * 1.03 for a, b in itertools.pairwise(rates))


def test_rate_grid_needs_a_finite_capacity() -> None:
    with pytest.raises(rp.ConfigError):
        rp.rate_grid({"a": float("inf")}, rp.ReproConfig.quick())


def _ratio(util_pair: float, util_base: float) -> rp.Ratio:
    return rp.Ratio("m", rp.COMPARISONS[0], 0.1, 128, util_pair, util_base, 10.0, 20.0)


def test_a_ratio_against_an_unstable_plan_is_not_reported() -> None:
    assert _ratio(0.5, 0.99).value == pytest.approx(0.5)
    assert _ratio(0.5, 1.0).value is None  # baseline at capacity: its queue grows
    assert _ratio(1.2, 0.5).value is None
    assert not _ratio(0.5, 3.0).stable


def test_both_flags_and_a_missing_emulation_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "hyperion", "--simulate", "--emulate", "-o", str(tmp_path)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "hyperion", "--runtime", "local", "-o", str(tmp_path)])
    assert exc.value.code == 2
    assert "--runtime" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "hyperion", "--models", "gpt-9", "-o", str(tmp_path)])
    assert exc.value.code == 2
    assert "--models" in capsys.readouterr().err
    monkeypatch.setattr(rpe, "emulation_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "hyperion", "--emulate", "-o", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--emulate" in err and "execution: emulated" in err
    assert not (tmp_path / "reproduction.md").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_writes_the_report_and_hyperion_beats_gpipe_where_both_are_stable(
    tmp_path: Path,
) -> None:
    out = tmp_path / "repro"
    main(["reproduce", "hyperion", "--quick", "-o", str(out)])
    report = (out / "reproduction.md").read_text(encoding="utf-8")
    for paper in ("0.479", "0.688", "0.555"):
        assert paper in report
    for model in rp.MODELS:
        assert f"(a) E2E latency vs request rate: {model}" in report
        assert f"(b) Long-sequence generation: {model}" in report
        assert f"(c) Utilisation per tier: {model}" in report
        for png in ("latency_vs_rate", "long_sequence", "utilisation"):
            assert (out / f"{png}_{model}.png").stat().st_size > 10_000
    assert "Assumptions the paper does not publish" in report
    assert len(list((out / "scenarios").glob("*.yaml"))) >= 2 * len(rp.MODELS)

    with (out / "points.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by: dict[tuple[str, str, str, str], dict[str, dict[str, str]]] = defaultdict(dict)
    for r in rows:
        by[(r["experiment"], r["model"], r["rate_rps"], r["output_tokens_mean"])][r["pair"]] = r
    compared = 0
    for key, pairs in by.items():
        h, g = pairs.get(rp.HYPERION), pairs.get(rp.GPIPE)
        if h is None or g is None or h["stable"] != "True" or g["stable"] != "True":
            continue
        compared += 1
        assert float(h["e2e_mean_s"]) <= float(g["e2e_mean_s"]), key
        assert int(h["completed"]) == int(h["requests"]) > 0
    assert compared >= 2 * len(rp.MODELS)  # (a) and (b) of both models have stable loads
    with (out / "ratios.csv").open(encoding="utf-8") as f:
        ratios = list(csv.DictReader(f))
    for r in ratios:  # never a ratio where either plan is past capacity
        unstable = float(r["util_pair"]) >= 1 or float(r["util_baseline"]) >= 1
        assert (r["ratio"] == "") == unstable or r["e2e_pair_s"] == ""


def test_emulate_pairs_each_emulated_run_with_its_simulation_and_prints_the_agreement(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--emulate without a testbed: `compare` is replaced by runs whose summaries are the
    simulator's for the same pair, scenario and requests, with a known overrun fraction. Every
    agreement row must then read 1.000 (an emulated run matched with another pair's or another
    load's simulation would not) and carry the overrun; the report and the CLI show them."""
    from types import SimpleNamespace

    from testbed.experiment import compare
    from testbed.experiment.reproduce_sim import simulate_at
    from testbed.sim.run import prepare_sim

    calls: list[tuple[str, tuple[str, ...], str | None]] = []

    async def fake_compare(loaded: Any, pairs: Any, opts: Any, console: Any) -> Any:
        assert loaded.spec.execution == "emulated"
        calls.append((loaded.spec.name, tuple(pairs), opts.runtime))
        runs = []
        for label in pairs:
            summary, _ = simulate_at(prepare_sim(loaded, label), None)
            runs.append(
                SimpleNamespace(label=label, summary=summary, emulation={"overrun_fraction": 0.25})
            )
        return SimpleNamespace(runs=runs)

    monkeypatch.setattr(compare, "compare_scenario", fake_compare)
    out = tmp_path / "emu"
    main(["reproduce", "hyperion", "--emulate", "--quick", "--runtime", "local",
          "--models", "llama-3-8b", "-o", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    cfg = rp.ReproConfig.quick()
    assert len(calls) == len(cfg.emu_fractions)
    assert all(p == cfg.pairs and rt == "local" for _, p, rt in calls)
    report = (out / "reproduction.md").read_text(encoding="utf-8")
    assert "## Emulated vs simulated" in report
    rows = [ln for ln in report.splitlines() if ln.startswith("| llama-3-8b |")]
    agreement = [ln for ln in rows if ln.endswith("| 25.00 % |")]
    assert len(agreement) == len(cfg.pairs) * len(cfg.emu_fractions), rows
    for ln in agreement:
        assert ln.split("|")[6].strip() == "1.000", ln
        assert ln in printed  # the CLI prints the agreement too
