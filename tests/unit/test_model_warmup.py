"""The warm-up after loading runs real steps on every kind of stage and leaves no cache behind;
tokens afterwards are those of a stage that never warmed up."""

from __future__ import annotations

import pytest
import torch

from testbed.model.executor import LayerRangeExecutor, read_model_info
from testbed.model.warmup import warm_up

pytestmark = pytest.mark.model

PROMPT = [5, 17, 99, 200, 31, 7]


def _tokens(stages: list[LayerRangeExecutor], n: int) -> list[int]:
    out: list[int] = []
    x: torch.Tensor = torch.tensor([PROMPT])
    kind, pos = "prefill", 0
    for _ in range(n):
        for ex in stages:
            step = ex.step("r", kind, x, pos)
            x = step.hidden if step.hidden is not None else x
        assert step.token_id is not None
        out.append(step.token_id)
        pos += x.shape[1] if kind == "decode" else len(PROMPT)
        kind, x = "decode", torch.tensor([[step.token_id]])
    for ex in stages:
        ex.release("r")
    return out


def test_warm_up_runs_steps_releases_and_keeps_tokens(tiny_model) -> None:
    path = tiny_model("phi3")
    n = read_model_info(path).num_blocks
    cold = [LayerRangeExecutor(path, 0, 1), LayerRangeExecutor(path, 1, n)]
    want = _tokens(cold, 4)
    warm = [LayerRangeExecutor(path, 0, 1), LayerRangeExecutor(path, 1, n)]
    for ex in warm:
        done = warm_up(ex, batch=2)
        assert done.steps == 4  # two prefills, one decode, one batched decode
        assert done.seconds > 0
        assert ex.request_ids == [] and ex.kv_bytes() == 0
    assert _tokens(warm, 4) == want


def test_warm_up_fits_a_one_request_cache(tiny_model) -> None:
    path = tiny_model("phi3")
    ex = LayerRangeExecutor(path, 0, read_model_info(path).num_blocks, max_requests=1)
    done = warm_up(ex, batch=2)
    assert done.steps == 2  # the second prefill found the cache full: prefill + decode
    assert ex.request_ids == []


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_steps_use_no_deprecated_transformers_call_path(tiny_model, arch) -> None:
    """The installed transformers' own deprecation warnings (not filtered here) stay silent:
    the cache goes under the name the decoder layer's signature gives."""
    import warnings

    path = tiny_model(arch)
    ex = LayerRangeExecutor(path, 0, read_model_info(path).num_blocks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warm_up(ex, batch=2)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
