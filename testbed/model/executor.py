"""Run a contiguous range of decoder blocks of a Hugging Face causal LM, with per-request KV caches.

`LayerRangeExecutor(model_dir, start, end)` holds blocks `[start, end)`: it builds the model's
module tree on the meta device (no memory), keeps only its own blocks (plus the embedding on
the first stage, and the final norm and LM head on the last), and reads just those tensors from
the safetensors files (:mod:`testbed.model.weights`). It mirrors the architecture's own
`forward` (mask creation, rotary embedding, layer loop, final norm, last-position LM head) so a
chain of executors gives the whole model's numbers bit for bit under greedy decoding.

It implements :class:`testbed.model.contract.StageExecutor`, threading contract included: steps
run on worker threads (several at once for different requests), everything else may be called
from the event loop meanwhile; the request table is guarded by a lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from testbed.errors import ConfigError
from testbed.model.batch import BatchStep, cache_kwarg, causal_mask
from testbed.model.batched import decode_batch
from testbed.model.contract import (
    CacheFullError,
    CacheStateError,
    ExecutorInputError,
    StepOutput,
    UnknownRequestError,
    check_step,
)
from testbed.model.info import SUPPORTED_MODEL_TYPES, ModelInfo, read_model_info
from testbed.model.weights import load_modules, pick_device, pick_dtype

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CacheFullError",
    "CacheStateError",
    "ExecutorInputError",
    "LayerRangeExecutor",
    "ModelInfo",
    "StepOutput",
    "UnknownRequestError",
    "pick_device",
    "pick_dtype",
    "read_model_info",
]


@dataclass
class _RequestState:
    cache: Any  # transformers DynamicCache
    length: int = 0  # tokens seen
    last_used_s: float = field(default_factory=time.monotonic)


class LayerRangeExecutor:
    """Blocks [start, end) of a model folder, with one KV cache per request id."""

    def __init__(
        self,
        model_dir: str | Path,
        start: int,
        end: int,
        *,
        device: str | None = None,
        dtype: str | None = None,
        attn_implementation: str = "sdpa",
        max_requests: int = 256,
    ):
        import transformers

        self.info = read_model_info(model_dir)
        n = self.info.num_blocks
        if not (0 <= start < end <= n):
            raise ConfigError(
                f"block range {start}:{end} is not inside 0:{n} with start < end",
                field="blocks",
            )
        self.start, self.end = start, end
        self.is_first = start == 0
        self.is_last = end == n
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device, self.info.checkpoint_dtype)
        self.max_requests = max_requests
        self.max_context = self.info.max_position_embeddings

        config = transformers.AutoConfig.from_pretrained(model_dir)
        config._attn_implementation = attn_implementation
        self.config = config
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=attn_implementation, dtype=self.dtype
            )
        base = skeleton.model
        self.config = skeleton.config  # the one the layers hold
        self.layers = nn.ModuleList([base.layers[i] for i in range(start, end)])
        # the decoder layer's name for the KV cache argument, as its public signature says
        self.cache_kw = cache_kwarg(base.layers[0])
        self.embed: nn.Module | None = base.embed_tokens if self.is_first else None
        self.norm: nn.Module | None = base.norm if self.is_last else None
        self.lm_head: nn.Module | None = skeleton.lm_head if self.is_last else None
        del skeleton, base

        load_modules(
            Path(model_dir), self._modules_by_prefix(), self.config, self.device, self.dtype
        )
        with torch.device(self.device):
            rotary_cls = _rotary_class(self.config)
            self.rotary = rotary_cls(config=self.config)
        self.rotary.to(self.device)

        types = _layer_types(self.config)
        self.layer_types = [types[i] for i in range(start, end)]
        self._sliding_window: int | None = getattr(self.config, "sliding_window", None)
        self._lock = threading.Lock()  # guards _requests and _opening (see the contract)
        self._requests: dict[str, _RequestState] = {}
        self._opening: set[str] = set()  # prefills running: their cache slots are taken
        self._partial: dict[str, _RequestState] = {}  # chunked prefills under way (slots taken)

    # ---------------------------------------------------------------- loading
    def _modules_by_prefix(self) -> list[tuple[str, nn.Module]]:
        mods: list[tuple[str, nn.Module]] = [
            (f"model.layers.{self.start + k}.", layer) for k, layer in enumerate(self.layers)
        ]
        if self.embed is not None:
            mods.append(("model.embed_tokens.", self.embed))
        if self.norm is not None:
            mods.append(("model.norm.", self.norm))
        if self.lm_head is not None:
            mods.append(("lm_head.", self.lm_head))
        return mods

    # ---------------------------------------------------------------- accounting
    @property
    def param_bytes(self) -> int:
        total = 0
        for _, module in self._modules_by_prefix():
            total += sum(p.numel() * p.element_size() for p in module.parameters())
        return total

    def _states(self) -> list[_RequestState]:
        with self._lock:
            return list(self._requests.values())

    def kv_bytes(self) -> int:
        """Bytes held by the request caches (a snapshot of the table; safe while steps run)."""
        total = 0
        for state in self._states():
            layers = state.cache.layers
            for i in range(self.start, min(self.end, len(layers))):
                layer = layers[i]
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    @property
    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._requests)

    def has_request(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._requests

    def idle_requests(self, idle_s: float) -> list[str]:
        """Ids of request caches not used for more than `idle_s` seconds."""
        now = time.monotonic()
        with self._lock:
            return [rid for rid, st in self._requests.items() if now - st.last_used_s > idle_s]

    def request_length(self, request_id: str) -> int | None:
        with self._lock:
            state = self._requests.get(request_id)
        return None if state is None else state.length

    # ---------------------------------------------------------------- requests
    def release(self, request_id: str) -> bool:
        """Free the request's cache; False when it held none."""
        with self._lock:
            partial = self._partial.pop(request_id, None) is not None
            return self._requests.pop(request_id, None) is not None or partial

    def check_input(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        """Raise ExecutorInputError when the step does not fit (without changing anything)."""
        with self._lock:
            self._check_locked(kind, x, start_pos, request_id)

    def _check_locked(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        state = self._requests.get(request_id)
        check_step(
            kind,
            x,
            start_pos,
            request_id,
            start=self.start,
            end=self.end,
            is_first=self.is_first,
            vocab_size=self.info.vocab_size,
            hidden_size=self.info.hidden_size,
            max_context=self.max_context,
            cached_length=None if state is None else state.length,
            held=len(self._requests) + len(self._opening) + len(self._partial),
            max_requests=self.max_requests,
        )

    @torch.inference_mode()
    def step(self, request_id: str, kind: str, x: torch.Tensor, start_pos: int) -> StepOutput:
        """Run one prefill (whole prompt) or decode (one token) step for a request."""
        from transformers import DynamicCache

        with self._lock:  # check and take the cache slot at once (steps run concurrently)
            self._check_locked(kind, x, start_pos, request_id)
            if request_id in self._opening or request_id in self._partial:
                raise CacheStateError(f"request {request_id!r} is already being prefilled")
            state = self._requests.get(request_id)
            opening = state is None
            if state is None:
                state = _RequestState(cache=DynamicCache())
                self._opening.add(request_id)
        try:
            return self._compute(request_id, state, x, start_pos, opening)
        finally:
            with self._lock:
                self._opening.discard(request_id)

    def _compute(
        self,
        request_id: str,
        state: _RequestState,
        x: torch.Tensor,
        start_pos: int,
        opening: bool,
    ) -> StepOutput:
        t0 = time.perf_counter()
        q = x.shape[1]
        x = x.to(self.device)
        if self.is_first:
            assert self.embed is not None
            hidden = self.embed(x.to(torch.long))
        else:
            hidden = x.to(self.dtype)
        hidden = self.run_layers(hidden, state.cache, start_pos, q)
        length = start_pos + q

        out_hidden, logits, tokens = self._head(hidden)
        token = None if tokens is None else tokens[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with self._lock:
            state.length = length
            state.last_used_s = time.monotonic()
            if opening or request_id in self._requests:  # not one released meanwhile
                self._requests[request_id] = state
        return StepOutput(
            hidden=out_hidden,
            logits=logits,
            token_id=token,
            length=length,
            compute_s=time.perf_counter() - t0,
        )

    def _head(
        self, hidden: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int] | None]:
        """The step's output from the blocks' [B, q, H]: hidden states for the next stage, or
        on the last stage the float32 logits [B, vocab] at each row's last position and the
        greedy tokens."""
        if not self.is_last:
            return hidden, None, None
        assert self.norm is not None and self.lm_head is not None
        normed = self.norm(hidden)
        logits = self.lm_head(normed[:, -1:, :])[:, -1, :].to(dtype=torch.float32)
        return None, logits, [int(t) for t in torch.argmax(logits, dim=-1)]

    # ---------------------------------------------------------------- batched steps
    @torch.inference_mode()
    def step_batch(self, steps: Sequence[BatchStep]) -> list[StepOutput | Exception]:
        """One iteration of continuous batching: all decode rows as one [B, 1] forward (each
        on its own cache and position), then each prefill chunk on its own cache.

        Answers per row, in order: a :class:`StepOutput` or the exception that row raised (a
        refused row does not stop the others). ``compute_s`` is the whole batch's wall time.
        """
        t0 = time.perf_counter()
        results: list[StepOutput | Exception | None] = [None] * len(steps)
        taken: list[tuple[int, _RequestState]] = []
        with self._lock:  # check and take every row's cache at once (as step())
            seen: set[str] = set()
            for i, s in enumerate(steps):
                try:
                    if s.request_id in seen:
                        raise CacheStateError(f"request {s.request_id!r} twice in one batch")
                    seen.add(s.request_id)
                    taken.append((i, self._take_locked(s)))
                except (ExecutorInputError, CacheFullError) as exc:
                    results[i] = exc
        rows: dict[int, tuple[torch.Tensor | None, torch.Tensor | None, int | None]] = {}
        try:
            decodes = [(i, st) for i, st in taken if steps[i].kind == "decode"]
            if len(decodes) > 1:
                rows.update(self._decode_batch([steps[i] for i, _ in decodes], decodes))
            for i, st in taken:
                if i not in rows:
                    s = steps[i]
                    rows[i] = self._one(st, s.x, s.start_pos)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:  # a model failure fails every row of the batch
            with self._lock:
                for i, _ in taken:
                    if steps[i].kind == "prefill":
                        self._partial.pop(steps[i].request_id, None)
                    results[i] = exc
            return [r if r is not None else exc for r in results]
        compute_s = time.perf_counter() - t0
        now = time.monotonic()
        with self._lock:
            for i, st in taken:
                s = steps[i]
                st.length = s.start_pos + int(s.x.shape[1])
                st.last_used_s = now
                if s.kind == "prefill" and s.last_chunk:
                    if self._partial.pop(s.request_id, None) is not None:  # not released
                        self._requests[s.request_id] = st
                hidden, logits, token = rows[i]
                results[i] = StepOutput(hidden, logits, token, st.length, compute_s)
        return [r for r in results if r is not None]

    def _take_locked(self, s: BatchStep) -> _RequestState:
        """Check a batch row and return the cache it runs on (a prefill opens one)."""
        from transformers import DynamicCache

        rid = s.request_id
        if s.kind == "prefill" and s.start_pos > 0:  # the next chunk of a prompt
            state = self._partial.get(rid)
            if state is None:
                raise CacheStateError(
                    f"request {rid!r}: no prefill under way to continue at {s.start_pos}"
                )
            if state.length != s.start_pos:
                raise CacheStateError(
                    f"request {rid!r}: prefill chunk at {s.start_pos} but the cache holds "
                    f"{state.length} tokens"
                )
            check_step(  # shape and token checks of a prefill (position checked above)
                "prefill", s.x, 0, rid, start=self.start, end=self.end,
                is_first=self.is_first, vocab_size=self.info.vocab_size,
                hidden_size=self.info.hidden_size, max_context=self.max_context - s.start_pos,
                cached_length=None, held=0, max_requests=1,
            )  # fmt: skip
            return state
        self._check_locked(s.kind, s.x, s.start_pos, rid)
        if rid in self._opening or rid in self._partial:
            raise CacheStateError(f"request {rid!r} is already being prefilled")
        if s.kind == "prefill":
            state = _RequestState(cache=DynamicCache())
            self._partial[rid] = state
            return state
        return self._requests[rid]

    def _one(
        self, state: _RequestState, x: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None]:
        """One request's step on its own cache (the unbatched path)."""
        x = x.to(self.device)
        hidden = self.embed(x.to(torch.long)) if self.embed is not None else x.to(self.dtype)
        hidden = self.run_layers(hidden, state.cache, start_pos, int(x.shape[1]))
        out, logits, tokens = self._head(hidden)
        return out, logits, None if tokens is None else tokens[0]

    def _decode_batch(
        self, steps: list[BatchStep], rows: list[tuple[int, _RequestState]]
    ) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None, int | None]]:
        """B decode rows (one token each, own cache and position) as one [B, 1] forward."""
        return decode_batch(self, steps, [i for i, _ in rows], [st.cache for _, st in rows])

    def mask(self, layer_type: str, start_pos: int, q: int) -> torch.Tensor:
        """The attention mask of ``q`` new tokens at ``start_pos`` for one layer type."""
        return causal_mask(
            start_pos,
            q,
            window=self._sliding_window if layer_type == "sliding_attention" else None,
            additive=self.config._attn_implementation == "eager",
            dtype=self.dtype,
            device=self.device,
        )

    def run_layers(self, hidden: torch.Tensor, cache: Any, start_pos: int, q: int) -> Any:
        """The range's blocks over ``hidden`` (positions start_pos..start_pos+q), on ``cache``."""
        position_ids = torch.arange(start_pos, start_pos + q, device=self.device).unsqueeze(0)
        masks = {t: self.mask(t, start_pos, q) for t in set(self.layer_types)}
        position_embeddings = self.rotary(hidden, position_ids)
        for layer, layer_type in zip(self.layers, self.layer_types, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[layer_type],
                position_ids=position_ids,
                use_cache=True,
                **{self.cache_kw: cache},
                position_embeddings=position_embeddings,
            )
        return hidden

    def time_parts(
        self, prompt_tokens: int, context_tokens: int, repeats: int = 3
    ) -> dict[str, dict[str, float]]:
        """Per-part median step times (see :func:`testbed.model.profiling.time_parts`)."""
        from testbed.model.profiling import time_parts

        return time_parts(self, prompt_tokens, context_tokens, repeats)


def _layer_types(config: Any) -> list[str]:
    types = getattr(config, "layer_types", None)
    n = config.num_hidden_layers
    if types:
        bad = {t for t in types if t not in ("full_attention", "sliding_attention")}
        if bad:
            raise ConfigError(f"layer types {sorted(bad)} are not supported", field="layer_types")
        return list(types)
    sliding = getattr(config, "sliding_window", None)
    return ["sliding_attention" if sliding else "full_attention"] * n


def _rotary_class(config: Any) -> type:
    import importlib

    module = importlib.import_module(
        f"transformers.models.{config.model_type}.modeling_{config.model_type}"
    )
    prefix = {"phi3": "Phi3", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[
        config.model_type
    ]
    return getattr(module, f"{prefix}RotaryEmbedding")
