"""A hostile corpus (issue 10): every malformed file or flag, run through `testbed check` /
`testbed plan` in-process, exits 2 with one line naming the file and the field, within seconds.

Each case writes a valid topology, scenario and model config, breaks one thing, and runs the
real entry point. The wall-clock bound is a guard against hangs (a billion-laughs file took
minutes before), with a wide margin for a loaded CI machine.
"""

from __future__ import annotations

import copy
import json
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cli.main import main
from testbed.spec.model_profile import PRESETS
from tests.factories import topology_dict

WALL_S = 5.0  # generous: every case takes well under a second here
RSS_GROWTH_BYTES = 500 * 2**20


def _topo() -> dict[str, Any]:
    d = topology_dict(device={"base": "cpu-core", "mem": "1GiB"})
    d["links"][0].update(jitter="1ms", loss="0.1%")
    return d


def _scenario() -> dict[str, Any]:
    return {
        "name": "s",
        "topology": "topo.yaml",
        "model": "tiny",
        "partitioner": "bsdp",
        "scheduler": {"name": "arts", "params": {"alpha": 0.3}},
        "planning": {"prompt_tokens": 64, "output_tokens": 8, "concurrency": 2},
        "workload": {
            "kind": "synthetic",
            "rate_rps": 2,
            "num_requests": 5,
            "prompt_tokens": 32,
            "output_tokens": 4,
        },
        "seed": 0,
        "slo": {"ttft": "2s"},
    }


def _setp(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set ``a.b[0].c`` in a copy of ``d``."""
    d = copy.deepcopy(d)
    keys: list[Any] = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        keys.append(int(part) if part.isdigit() else part)
    cur: Any = d
    for k in keys[:-1]:
        cur = cur[k]
    cur[keys[-1]] = value
    return d


def _yaml(d: Any) -> str:
    return yaml.safe_dump(d, sort_keys=False)


# (id, files {name: text or bytes}, argv with {dir}, words the one-line error must contain)
Case = tuple[str, dict[str, str | bytes], list[str], list[str]]

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)
LAUGHS_TOPO = LAUGHS + "name: t\ntiers: *i\n"


def _topo_case(cid: str, path: str, value: Any, words: list[str]) -> Case:
    return (cid, {"topo.yaml": _yaml(_setp(_topo(), path, value))}, ["check", "topo.yaml"], words)


def _scn_case(cid: str, path: str, value: Any, words: list[str]) -> Case:
    files: dict[str, str | bytes] = {
        "topo.yaml": _yaml(_topo()),
        "scn.yaml": _yaml(_setp(_scenario(), path, value)),
    }
    return (cid, files, ["check", "scn.yaml"], words)


def _model_case(cid: str, cfg: Any, words: list[str], raw: bytes | None = None) -> Case:
    files: dict[str, str | bytes] = {
        "topo.yaml": _yaml(_topo()),
        "scn.yaml": _yaml(_setp(_scenario(), "model", "m")),
        "m/config.json": raw if raw is not None else json.dumps(cfg),
    }
    return (cid, files, ["check", "scn.yaml"], ["config.json", *words])


TINY = dict(PRESETS["tiny"])

CASES: list[Case] = [
    # --- hangs -----------------------------------------------------------------------------
    ("billion-laughs", {"topo.yaml": LAUGHS_TOPO}, ["check", "topo.yaml"], ["aliases", "line"]),
    (
        "billion-laughs-scenario",
        {"scn.yaml": LAUGHS + _yaml(_scenario())},
        ["check", "scn.yaml"],
        ["aliases"],
    ),
    _topo_case("count-100000", "tiers[0].nodes[0].count", 100_000, ["count", "10,000"]),
    # --- memory ----------------------------------------------------------------------------
    _topo_case("count-1e8", "tiers[0].nodes[0].count", 100_000_000, ["tiers[0].nodes[0].count"]),
    _scn_case("num-requests-1e8", "workload.num_requests", 100_000_000, ["workload.num_requests"]),
    (
        "synthetic-1e9s-at-1e6rps",
        {
            "topo.yaml": _yaml(_topo()),
            "scn.yaml": _yaml(
                _setp(
                    _setp(_setp(_scenario(), "workload.rate_rps", 1e6), "workload.duration_s", 1e7),
                    "workload.num_requests",
                    None,
                )
            ),
        },
        ["check", "scn.yaml"],
        ["workload", "1,000,000"],
    ),
    _scn_case("synthetic-1e9s", "workload.duration_s", 1e9, ["workload.duration_s", "1e+08s"]),
    _model_case("config-1e8-layers", {**TINY, "num_hidden_layers": 10**8}, ["num_hidden_layers"]),
    (
        "huge-file",
        {"topo.yaml": "name: t\n" + "# padding\n" * 500_000},
        ["check", "topo.yaml"],
        ["larger than"],
    ),
    # --- tracebacks ------------------------------------------------------------------------
    (
        "deep-nesting-flow",
        {"topo.yaml": "name: t\ntiers: " + "[" * 50_000 + "]" * 50_000 + "\n"},
        ["check", "topo.yaml"],
        ["nest"],
    ),
    (
        "deep-nesting-block",
        {"topo.yaml": "name: t\ntiers:\n" + "".join("  " * i + "- \n" for i in range(1, 200))},
        ["check", "topo.yaml"],
        ["nested deeper"],
    ),
    ("non-utf8-topology", {"topo.yaml": b"name: t\xff\xfe\n"}, ["check", "topo.yaml"], ["UTF-8"]),
    _model_case("config-non-utf8", None, ["UTF-8"], raw=b'{"model_type": "phi3\xff"}'),
    _model_case("config-is-a-list", [TINY], ["mapping"]),
    _model_case("config-deep", None, ["nested"], raw=b"[" * 100_000 + b"]" * 100_000),
    _model_case("config-int-as-string", {**TINY, "hidden_size": "64"}, ["hidden_size"]),
    _model_case(
        "config-heads-over-hidden", {**TINY, "num_attention_heads": 128}, ["num_attention_heads"]
    ),
    _model_case(
        "config-hidden-not-divisible", {**TINY, "num_attention_heads": 3}, ["not divisible"]
    ),
    _model_case("config-kv-heads", {**TINY, "num_key_value_heads": 3}, ["num_key_value_heads"]),
    _model_case(
        "config-nan", None, ["NaN"], raw=json.dumps({**TINY, "x": 1}).replace("1}", "NaN}").encode()
    ),
    _model_case("config-bool-as-string", {**TINY, "tie_word_embeddings": "false"}, ["tie_word"]),
    _topo_case(
        "step-overhead-inf",
        "tiers[0].nodes[0].device",
        {"base": "cpu-core", "step_overhead": float("inf")},
        ["tiers[0].nodes[0].device.step_overhead"],
    ),
    _topo_case(
        "cpus-nan",
        "tiers[0].nodes[0].device",
        {"base": "cpu-core", "cpus": float("nan")},
        ["tiers[0].nodes[0].device.cpus"],
    ),
    _topo_case("device-base-list", "tiers[0].nodes[0].device", {"base": [1]}, ["base"]),
    # --- silently accepted before ----------------------------------------------------------
    _scn_case("prompt-tokens-negative", "planning.prompt_tokens", -5, ["planning.prompt_tokens"]),
    _scn_case("concurrency-zero", "planning.concurrency", 0, ["planning.concurrency"]),
    _scn_case("output-tokens-zero", "planning.output_tokens", 0, ["planning.output_tokens"]),
    _scn_case("synthetic-prompt-negative", "workload.prompt_tokens", -5, ["workload"]),
    _scn_case("time-scale-1e308", "workload.time_scale", 1e308, ["workload.time_scale"]),
    _scn_case(
        "length-mean-inf",
        "workload.prompt_tokens",
        {"dist": "normal", "mean": float("inf"), "std": 1},
        ["workload.prompt_tokens.mean"],
    ),
    _scn_case(
        "prompt-cap-over-context", "workload.max_prompt_tokens", 4096, ["context window", "2048"]
    ),
    _scn_case("fixed-prompt-over-context", "workload.prompt_tokens", 5000, ["context window"]),
    _scn_case("planning-over-context", "planning.prompt_tokens", 4000, ["planning", "context"]),
    _scn_case(
        "include-transfer-maybe",
        "partitioner",
        {"name": "bsdp", "params": {"include_transfer": "maybe"}},
        ["partitioner", "include_transfer", "true or false"],
    ),
    _scn_case("seed-x", "seed", "x", ["seed"]),
    _scn_case("seed-string-number", "seed", "5", ["seed"]),
    _scn_case("seed-negative", "seed", -1, ["seed"]),
    _scn_case("workload-seed-x", "workload.seed", "x", ["workload.seed"]),
    _scn_case(
        "scheduler-seed-x",
        "scheduler",
        {"name": "random", "params": {"seed": "x"}},
        ["scheduler", "seed"],
    ),
    _scn_case("requests-string", "requests", "10", ["requests"]),
    (
        "duplicate-key",
        {"topo.yaml": "name: t\nname: u\ntiers: []\n"},
        ["check", "topo.yaml"],
        ["topo.yaml:2", "'name' appears twice", "line 1"],
    ),
    _topo_case("bandwidth-1e-300bit", "links[0].bandwidth", "1e-300bit", ["links[0].bandwidth"]),
    _topo_case("bandwidth-too-high", "links[0].bandwidth", "1e30bit", ["links[0].bandwidth"]),
    _topo_case("delay-bare-number", "links[0].delay", 20, ["links[0].delay", "no unit"]),
    _topo_case("bandwidth-bare-number", "links[0].bandwidth", 100e6, ["links[0].bandwidth"]),
    _topo_case("loss-bare-number", "links[0].loss", 0.5, ["links[0].loss", "no unit"]),
    _topo_case(
        "mem-bare-number",
        "tiers[0].nodes[0].device",
        {"base": "cpu-core", "mem": 2**30},
        ["device.mem", "no unit"],
    ),
    _topo_case(
        "mem-in-bits",
        "tiers[0].nodes[0].device",
        {"base": "cpu-core", "mem": "512Mb"},
        ["device.mem", "bits"],
    ),
    _topo_case("delay-too-long", "links[0].delay", "2h", ["links[0].delay", "60"]),
    _topo_case("delay-sub-microsecond", "links[0].delay", "1e-300s", ["links[0].delay"]),
    _topo_case("huge-bad-value", "links[0].bandwidth", "9" * 1_000_000, ["links[0].bandwidth"]),
    _scn_case("duration-bare-number", "duration", 20, ["duration", "no unit"]),
    _scn_case("slo-bare-number", "slo.ttft", 2, ["slo.ttft", "no unit"]),
    _scn_case("workload-rate-inf", "workload.rate_rps", float("inf"), ["workload.rate_rps"]),
    (
        "trace-non-utf8",
        {
            "topo.yaml": _yaml(_topo()),
            "scn.yaml": _yaml(_setp(_scenario(), "workload", {"kind": "azure", "path": "t.csv"})),
            "t.csv": b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,5\xff,3\n",
        },
        ["check", "scn.yaml"],
        ["t.csv", "UTF-8"],
    ),
    (
        "too-many-tiers",
        {"topo.yaml": _yaml(topology_dict(tiers=70, nodes_per_tier=1))},
        ["check", "topo.yaml"],
        ["tiers", "at most 64"],
    ),
    # --- plan: flags and the same files ----------------------------------------------------
    (
        "plan-step-overhead-inf",
        {
            "topo.yaml": _yaml(
                _setp(
                    _topo(),
                    "tiers[0].nodes[0].device",
                    {"base": "cpu-core", "step_overhead": float("inf")},
                )
            )
        },
        ["plan", "topo.yaml", "--model", "tiny"],
        ["step_overhead"],
    ),
    (
        "plan-config-1e8-layers",
        {
            "topo.yaml": _yaml(_topo()),
            "m/config.json": json.dumps({**TINY, "num_hidden_layers": 10**8}),
        },
        ["plan", "topo.yaml", "--model", "m"],
        ["num_hidden_layers"],
    ),
    (
        "plan-prompt-over-context",
        {"topo.yaml": _yaml(_topo())},
        ["plan", "topo.yaml", "--model", "tiny", "--prompt-tokens", "100000"],
        ["--prompt-tokens", "context"],
    ),
    (
        "plan-prompt-tokens-huge",
        {"topo.yaml": _yaml(_topo())},
        ["plan", "topo.yaml", "--model", "tiny", "--prompt-tokens", "99999999999"],
        ["--prompt-tokens"],
    ),
    (
        "plan-include-transfer-maybe",
        {"topo.yaml": _yaml(_topo())},
        ["plan", "topo.yaml", "--model", "tiny", "-p", "include_transfer=maybe"],
        ["include_transfer"],
    ),
]


def _write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


def _run(capsys: Any, argv: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    wall = time.perf_counter() - t0
    return code, capsys.readouterr().err, wall


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize(("cid", "files", "argv", "words"), CASES, ids=[c[0] for c in CASES])
def test_hostile_file_exits_2_with_one_line(
    tmp_path: Path,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
    cid: str,
    files: dict[str, str | bytes],
    argv: list[str],
    words: list[str],
) -> None:
    _write(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    rss0 = _peak_rss_bytes()
    code, err, wall = _run(capsys, argv)
    assert code == 2, f"{cid}: exit {code}, stderr {err[-2000:]!r}"
    line = err.strip()
    assert line.startswith("error: "), line[:500]
    assert "\n" not in line, f"{cid}: more than one line: {line[:1000]!r}"
    assert len(line) < 1000, f"{cid}: {len(line)} characters"
    assert "Traceback" not in err
    if argv[0] == "check" or cid.startswith("plan-step") or cid.startswith("plan-config"):
        assert any(name in line for name in files), f"{cid}: no file named in {line!r}"
    for w in words:
        assert w in line, f"{cid}: {w!r} not in {line!r}"
    assert wall < WALL_S, f"{cid}: took {wall:.1f}s"
    assert _peak_rss_bytes() - rss0 < RSS_GROWTH_BYTES, f"{cid}: memory grew"


def test_valid_corpus_base_files_pass(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch):
    """The unbroken files the corpus starts from are accepted (so each case tests one thing)."""
    _write(tmp_path, {"topo.yaml": _yaml(_topo()), "scn.yaml": _yaml(_scenario())})
    _write(tmp_path, {"m/config.json": json.dumps(TINY)})
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["check", "topo.yaml"],
        ["check", "scn.yaml"],
        ["plan", "topo.yaml", "--model", "m"],
    ):
        code, err, _ = _run(capsys, argv)
        assert code == 0, (argv, err)
    code, err, _ = _run(capsys, ["check", "scn.yaml"])
    assert code == 0
    # 10MBps is megabytes: 80 Mbit/s; and a 0 without a unit is fine
    fast = _setp(_setp(_topo(), "links[0].bandwidth", "10MBps"), "links[0].jitter", 0)
    _write(tmp_path, {"fast.yaml": _yaml(fast)})
    assert _run(capsys, ["check", "fast.yaml"])[0] == 0


def test_trace_prompts_over_the_context_are_clipped_with_a_warning(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A Mooncake trace whose prompts exceed the model's window used to fail every request
    with HTTP 409 at replay time; `check` now says how many are clipped, and they fit."""
    rows = [
        {"timestamp": i * 100, "input_length": n, "output_length": 8, "hash_ids": []}
        for i, n in enumerate([100, 5000, 30000, 200])
    ]
    trace = "".join(json.dumps(r) + "\n" for r in rows)
    scn = _setp(_scenario(), "workload", {"kind": "mooncake", "path": "t.jsonl"})
    _write(tmp_path, {"topo.yaml": _yaml(_topo()), "scn.yaml": _yaml(scn), "t.jsonl": trace})
    monkeypatch.chdir(tmp_path)
    code, err, _ = _run(capsys, ["check", "scn.yaml"])
    assert code == 0, err
    assert "2 of 4 requests clipped to the model's context window of 2048 tokens" in caplog.text
