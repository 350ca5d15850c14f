"""Layer-range executors chained in-process give the whole model's tokens bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch

from testbed.errors import ConfigError
from testbed.model.executor import (
    CacheFullError,
    CacheStateError,
    ExecutorInputError,
    LayerRangeExecutor,
    UnknownRequestError,
    read_model_info,
)
from tests.factories import reference_generate

pytestmark = pytest.mark.model

PROMPT = [5, 17, 99, 200, 31, 7, 250, 3, 44]


def chain_generate(executors, prompt, new_tokens, eos=(), rid="r"):
    tokens = list(prompt)
    x = torch.tensor([prompt])
    kind, pos = "prefill", 0
    for _ in range(new_tokens):
        h = x
        for ex in executors:
            out = ex.step(rid, kind, h, pos)
            h = out.hidden
        pos += x.shape[1]
        tokens.append(out.token_id)
        if out.token_id in eos:
            break
        x, kind = torch.tensor([[out.token_id]]), "decode"
    return tokens


def executors_for(path, cuts):
    n = read_model_info(path).num_blocks
    bounds = [0, *cuts, n]
    return [LayerRangeExecutor(path, a, b) for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("arch", ["phi3", "llama", "qwen2"])
@pytest.mark.parametrize("cuts", [[], [1, 2, 3], [3]], ids=["whole", "one-per-stage", "uneven"])
def test_chained_executors_match_generate(tiny_model, arch, cuts):
    path = tiny_model(arch)
    eos = read_model_info(path).eos_token_ids
    want = reference_generate(path, PROMPT, 12)
    got = chain_generate(executors_for(path, cuts), PROMPT, 12, eos=eos)
    assert got == want


def test_interleaved_requests_keep_separate_caches(tiny_model):
    path = tiny_model("phi3")
    exs = executors_for(path, [2])
    other = [9, 8, 7, 6]
    want_a, want_b = reference_generate(path, PROMPT, 6), reference_generate(path, other, 6)
    # run a and b step by step, interleaved
    state = {
        "a": (list(PROMPT), torch.tensor([PROMPT]), "prefill", 0),
        "b": (list(other), torch.tensor([other]), "prefill", 0),
    }
    for _ in range(6):
        for rid in ("a", "b"):
            toks, x, kind, pos = state[rid]
            h = x
            for ex in exs:
                out = ex.step(rid, kind, h, pos)
                h = out.hidden
            toks.append(out.token_id)
            state[rid] = (toks, torch.tensor([[out.token_id]]), "decode", pos + x.shape[1])
    assert state["a"][0] == want_a and state["b"][0] == want_b


def test_memory_scales_with_the_slice(tiny_model):
    path = tiny_model("phi3")
    whole = LayerRangeExecutor(path, 0, 4)
    middle = LayerRangeExecutor(path, 1, 2)
    first = LayerRangeExecutor(path, 0, 1)
    assert middle.embed is None and middle.lm_head is None and len(middle.layers) == 1
    assert first.embed is not None and first.lm_head is None
    # one block without embedding/head is a small part of the whole
    assert middle.param_bytes * 4 < whole.param_bytes
    for ex in (whole, middle, first):
        for p in ex.layers.parameters():
            assert not p.is_meta


def test_bad_steps_are_refused_without_touching_the_cache(tiny_model):
    path = tiny_model("phi3")
    first, rest = LayerRangeExecutor(path, 0, 2, max_requests=1), LayerRangeExecutor(path, 2, 4)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(UnknownRequestError, match="unknown request id"):
        first.step("nope", "decode", torch.tensor([[1]]), 3)
    with pytest.raises(ExecutorInputError, match="token ids"):
        first.step("r", "prefill", torch.randn(1, 3, 64), 0)
    with pytest.raises(ExecutorInputError, match=r"must be in \[0, 512\)"):
        first.step("r", "prefill", torch.tensor([[1, 999]]), 0)
    with pytest.raises(ExecutorInputError, match="hidden states"):
        rest.step("r", "prefill", torch.randn(1, 3, 32), 0)
    with pytest.raises(CacheStateError, match="prefill starts at position 0"):
        first.step("r", "prefill", ids, 2)
    first.step("r", "prefill", ids, 0)
    assert first.request_length("r") == 3
    with pytest.raises(CacheStateError, match="expected position 3"):
        first.step("r", "decode", torch.tensor([[4]]), 5)
    with pytest.raises(ExecutorInputError, match="exactly 1 token"):
        first.step("r", "decode", torch.tensor([[4, 5]]), 3)
    with pytest.raises(CacheStateError, match="already has a cache"):
        first.step("r", "prefill", ids, 0)
    with pytest.raises(CacheFullError):
        first.step("r2", "prefill", ids, 0)
    assert first.request_length("r") == 3  # nothing above changed it
    first.step("r", "decode", torch.tensor([[4]]), 3)
    assert first.request_length("r") == 4 and first.kv_bytes() > 0
    assert first.release("r") and not first.release("r")
    assert first.kv_bytes() == 0


def test_context_limit_is_enforced(tiny_model, tmp_path):
    import json
    import shutil

    path = tmp_path / "short"
    shutil.copytree(tiny_model("llama"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    ex = LayerRangeExecutor(path, 0, 4)
    with pytest.raises(CacheStateError, match="exceed the model's context of 8"):
        ex.step("r", "prefill", torch.tensor([list(range(1, 10))]), 0)
    ex.step("r", "prefill", torch.tensor([list(range(1, 8))]), 0)
    ex.step("r", "decode", torch.tensor([[1]]), 7)
    with pytest.raises(CacheStateError, match="exceed"):
        ex.step("r", "decode", torch.tensor([[1]]), 8)


def test_bad_ranges_and_folders(tiny_model, tmp_path):
    path = tiny_model("phi3")
    with pytest.raises(ConfigError, match="block range"):
        LayerRangeExecutor(path, 2, 2)
    with pytest.raises(ConfigError, match="block range"):
        LayerRangeExecutor(path, 0, 5)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        LayerRangeExecutor(tmp_path, 0, 1)


def test_time_parts_covers_every_part(tiny_model):
    path = tiny_model("phi3")
    parts = LayerRangeExecutor(path, 0, 4).time_parts(8, 16, repeats=1)
    assert set(parts) == {"embed", "block0", "block1", "block2", "block3", "head"}
    for times in parts.values():
        assert times["prefill_s"] > 0 and times["decode_s"] > 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window_and_eager_masks_match_generate(tiny_model, tmp_path, attn):
    """Our own attention mask (not transformers' internal helpers) keeps tokens exact, also
    with a sliding window far shorter than the context and with eager attention."""
    import json
    import shutil

    path = tmp_path / "mistral-window"
    shutil.copytree(tiny_model("mistral"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    eos = read_model_info(path).eos_token_ids
    want = reference_generate(path, PROMPT, 12)
    n = read_model_info(path).num_blocks
    executors = [
        LayerRangeExecutor(path, a, b, attn_implementation=attn)
        for a, b in itertools.pairwise([0, 2, n])
    ]
    assert chain_generate(executors, PROMPT, 12, eos=eos) == want


def test_the_loop_may_read_while_worker_threads_step(tiny_model):
    """The threading contract: steps on several worker threads while another thread reads
    kv_bytes / request_ids / idle_requests; no read fails and the cache-slot cap holds."""
    import threading
    import time

    ex = LayerRangeExecutor(tiny_model("phi3"), 0, 4, max_requests=2)
    stop = threading.Event()
    failures: list[BaseException] = []
    steps = [0]

    def worker(w: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                rid = f"{w}-{i}"
                i += 1
                try:
                    ex.step(rid, "prefill", torch.tensor([[1, 2, 3]]), 0)
                except CacheFullError:
                    continue
                ex.step(rid, "decode", torch.tensor([[4]]), 3)
                steps[0] += 1
                ex.release(rid)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    held = []
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            ex.kv_bytes()
            ex.idle_requests(0.0)
            held.append(len(ex.request_ids))
    except BaseException as exc:
        failures.append(exc)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures
    assert steps[0] > 0 and max(held) <= 2
