"""Continuous batching: batched decodes and chunked prefills keep generate's greedy tokens."""

from __future__ import annotations

import itertools

import pytest
import torch

from testbed.model.batch import BatchStep, batch_mask
from testbed.model.executor import CacheStateError, LayerRangeExecutor, read_model_info
from tests.factories import reference_generate

pytestmark = pytest.mark.model

PROMPTS = [[5, 17, 99, 200, 31, 7, 250, 3, 44], [9, 8], list(range(100, 114)), [7]]
NEW = 8


def batched_generate(executors, prompts, new_tokens, chunk=4, join_every=2):
    """Request i joins at iteration join_every * i; prompts prefill in chunks of ``chunk``
    alongside the others' decodes; every iteration is one step_batch per stage."""
    toks = [list(p) for p in prompts]
    pos = [0] * len(prompts)
    sizes = []
    for it in itertools.count():
        steps = []
        for i, p in enumerate(prompts):
            if it < join_every * i or len(toks[i]) - len(p) >= new_tokens:
                continue
            if pos[i] < len(p):
                c = toks[i][pos[i] : pos[i] + chunk]
                last = pos[i] + len(c) == len(p)
                steps.append(BatchStep(f"r{i}", "prefill", torch.tensor([c]), pos[i], last))
            else:
                steps.append(BatchStep(f"r{i}", "decode", torch.tensor([[toks[i][-1]]]), pos[i]))
        if not steps:
            if it > join_every * len(prompts):
                return toks, sizes
            continue
        sizes.append(len(steps))
        rows = steps
        for ex in executors:
            outs = ex.step_batch(rows)
            assert not any(isinstance(o, Exception) for o in outs), outs
            rows = [
                BatchStep(s.request_id, s.kind, o.hidden, s.start_pos, s.last_chunk)
                if o.hidden is not None
                else s
                for s, o in zip(rows, outs, strict=True)
            ]
        for s, o in zip(steps, outs, strict=True):
            i = int(s.request_id[1:])
            pos[i] += s.x.shape[1]
            if s.last_chunk:
                toks[i].append(o.token_id)


@pytest.mark.parametrize("arch", ["phi3", "llama", "qwen2"])
def test_batched_decodes_and_chunked_prefills_match_generate(tiny_model, arch):
    path = tiny_model(arch)
    n = read_model_info(path).num_blocks
    executors = [LayerRangeExecutor(path, a, b) for a, b in itertools.pairwise([0, 1, n])]
    got, sizes = batched_generate(executors, PROMPTS, NEW)
    assert got == [reference_generate(path, p, NEW) for p in PROMPTS]
    assert max(sizes) == len(PROMPTS)  # all four were in one batch at some point
    assert all(sorted(ex.request_ids) == [f"r{i}" for i in range(4)] for ex in executors)


def test_sliding_window_batch_matches_generate(tiny_model, tmp_path):
    import json
    import shutil

    path = tmp_path / "mistral-window"
    shutil.copytree(tiny_model("mistral"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    got, _ = batched_generate([LayerRangeExecutor(path, 0, 4)], PROMPTS, NEW)
    assert got == [reference_generate(path, p, NEW) for p in PROMPTS]


def test_a_bad_row_is_refused_alone(tiny_model):
    ex = LayerRangeExecutor(tiny_model("phi3"), 0, 4)
    ex.step("a", "prefill", torch.tensor([[1, 2, 3]]), 0)
    outs = ex.step_batch(
        [
            BatchStep("a", "decode", torch.tensor([[4]]), 3),
            BatchStep("b", "decode", torch.tensor([[4]]), 0),  # unknown
            BatchStep("c", "prefill", torch.tensor([[4, 5]]), 2),  # no prefill to continue
        ]
    )
    assert outs[0].length == 4 and isinstance(outs[0].token_id, int)
    assert isinstance(outs[1], KeyError) and isinstance(outs[2], CacheStateError)
    # a chunked prefill holds its slot until released, and a release frees it
    ex.step_batch([BatchStep("d", "prefill", torch.tensor([[1, 2]]), 0, last_chunk=False)])
    assert not ex.has_request("d") and ex.release("d") and not ex.release("d")


def test_batch_mask_hides_padding_and_applies_the_window():
    m = batch_mask([3, 1, 5], window=None, additive=False, dtype=torch.float32, device="cpu")
    assert m.shape == (3, 1, 1, 5)
    assert m[:, 0, 0].tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True] * 5,
    ]
    w = batch_mask([5], window=2, additive=True, dtype=torch.float32, device="cpu")
    assert (w[0, 0, 0] == 0).tolist() == [False, False, False, True, True]
