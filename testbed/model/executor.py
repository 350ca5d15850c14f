"""Run a contiguous range of decoder blocks of a Hugging Face causal LM, with per-request KV caches.

`LayerRangeExecutor(model_dir, start, end)` holds blocks `[start, end)`: it builds the model's
module tree on the meta device (no memory), keeps only its own blocks (plus the embedding on
the first stage, and the final norm and LM head on the last), and reads just those tensors from
the safetensors files. It mirrors the architecture's own `forward` (mask creation, rotary
embedding, layer loop, final norm, last-position LM head) so a chain of executors gives the
whole model's numbers bit for bit under greedy decoding.

Not thread-safe: call it from one thread (the stage server's worker thread).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from testbed.errors import ConfigError, TestbedError
from testbed.model.info import SUPPORTED_MODEL_TYPES, ModelInfo, read_model_info

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

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ExecutorInputError(TestbedError, ValueError):
    """A step's input does not fit this executor or the request's cache (a client error)."""

    exit_code = 2


class UnknownRequestError(ExecutorInputError, KeyError):
    """A decode or release names a request id this executor holds no cache for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CacheStateError(ExecutorInputError):
    """A step does not fit the request's cache: wrong position, prefill over a live cache, or
    past the model's context (HTTP 409)."""


class CacheFullError(TestbedError, RuntimeError):
    """The executor already holds its maximum number of request caches."""


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when present, else CPU."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"not a torch device: {device!r} (use cpu or cuda[:N])") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """`auto`: the checkpoint's dtype on CUDA, float32 on CPU (fast and exact there)."""
    if dtype in (None, "auto"):
        if device.type == "cuda" and checkpoint_dtype in _DTYPES:
            return _DTYPES[checkpoint_dtype]
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class _SafetensorsIndex:
    """Which file holds which tensor, for single-file and sharded checkpoints."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "model.safetensors.index.json"
        single = root / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of: dict[str, Path] = {k: root / v for k, v in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            raise ConfigError(
                "no model.safetensors or model.safetensors.index.json; only safetensors "
                "checkpoints are read (never pickled .bin files)",
                source=str(root),
            )

    def load(self, names: Iterable[str], device: torch.device, dtype: torch.dtype) -> dict:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.file_of:
                raise ConfigError(f"checkpoint has no tensor {name!r}", source=str(self.root))
            by_file.setdefault(self.file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    src = t
                    if t.is_floating_point():
                        t = t.to(dtype)
                    t = t.to(device)
                    if t is src:  # still the file's memory map: page cache pressure would
                        t = t.clone()  # evict it and turn every step into disk reads
                    out[key] = t
        return out


@dataclass
class _RequestState:
    cache: Any  # transformers DynamicCache
    length: int = 0  # tokens seen
    last_used_s: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class StepOutput:
    """What one prefill/decode step produced on this executor."""

    hidden: torch.Tensor | None  # [1, q, hidden] when this is not the last stage
    logits: torch.Tensor | None  # [1, vocab] float32, last position, on the last stage
    token_id: int | None  # greedy next token on the last stage
    length: int  # tokens in the request's cache after this step
    compute_s: float


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
        self.embed: nn.Module | None = base.embed_tokens if self.is_first else None
        self.norm: nn.Module | None = base.norm if self.is_last else None
        self.lm_head: nn.Module | None = skeleton.lm_head if self.is_last else None
        del skeleton, base

        self._load_weights(Path(model_dir))
        with torch.device(self.device):
            rotary_cls = _rotary_class(self.config)
            self.rotary = rotary_cls(config=self.config)
        self.rotary.to(self.device)

        types = _layer_types(self.config)
        self._layer_types = [types[i] for i in range(start, end)]
        self._sliding_window: int | None = getattr(self.config, "sliding_window", None)
        self._requests: dict[str, _RequestState] = {}

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

    def _load_weights(self, root: Path) -> None:
        index = _SafetensorsIndex(root)
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        for prefix, module in self._modules_by_prefix():
            wanted = {prefix + k: k for k in module.state_dict()}
            source = dict(wanted)
            if prefix == "lm_head." and "lm_head.weight" not in index.file_of and tied:
                source = {"model.embed_tokens.weight": "weight"}
            tensors = index.load(source, self.device, self.dtype)
            state = {source[k]: v for k, v in tensors.items()}
            module.load_state_dict(state, strict=True, assign=True)
            for name, p in [*module.named_parameters(), *module.named_buffers()]:
                if p.is_meta:
                    raise ConfigError(f"{prefix}{name} was not loaded", source=str(root))
            module.eval()

    # ---------------------------------------------------------------- accounting
    @property
    def param_bytes(self) -> int:
        total = 0
        for _, module in self._modules_by_prefix():
            total += sum(p.numel() * p.element_size() for p in module.parameters())
        return total

    def kv_bytes(self) -> int:
        total = 0
        for state in self._requests.values():
            for i in range(self.start, self.end):
                layer = state.cache.layers[i]
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def idle_requests(self, idle_s: float) -> list[str]:
        """Ids of request caches not used for more than `idle_s` seconds."""
        now = time.monotonic()
        return [rid for rid, st in list(self._requests.items()) if now - st.last_used_s > idle_s]

    def request_length(self, request_id: str) -> int | None:
        state = self._requests.get(request_id)
        return None if state is None else state.length

    # ---------------------------------------------------------------- requests
    def release(self, request_id: str) -> bool:
        """Free the request's cache; False when it held none."""
        return self._requests.pop(request_id, None) is not None

    def check_input(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        """Raise ExecutorInputError when the step does not fit (without changing anything)."""
        if kind not in ("prefill", "decode"):
            raise ExecutorInputError(f"step kind {kind!r} is not prefill or decode")
        if self.is_first:
            if x.dtype not in (torch.int64, torch.int32) or x.dim() != 2 or x.shape[0] != 1:
                raise ExecutorInputError(
                    f"the first stage takes token ids int64[1, q], got {_desc(x)}"
                )
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.info.vocab_size):
                raise ExecutorInputError(
                    f"token ids must be in [0, {self.info.vocab_size}), got "
                    f"{int(x.min())}..{int(x.max())}"
                )
        else:
            h = self.info.hidden_size
            if not x.is_floating_point() or x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != h:
                raise ExecutorInputError(
                    f"stage {self.start}:{self.end} takes hidden states float[1, q, {h}], "
                    f"got {_desc(x)}"
                )
        q = x.shape[1]
        if q < 1:
            raise ExecutorInputError("a step needs at least one token")
        state = self._requests.get(request_id)
        if kind == "prefill":
            if state is not None:
                raise CacheStateError(
                    f"request {request_id!r} already has a cache of {state.length} tokens; "
                    "release it before a new prefill"
                )
            if start_pos != 0:
                raise CacheStateError(f"prefill starts at position 0, got {start_pos}")
        else:
            if state is None:
                raise UnknownRequestError(
                    f"unknown request id {request_id!r}: no prefill on this stage "
                    "(or it was released)"
                )
            if q != 1:
                raise ExecutorInputError(f"a decode step carries exactly 1 token, got {q}")
            if start_pos != state.length:
                raise CacheStateError(
                    f"request {request_id!r}: decode at position {start_pos} but the cache "
                    f"holds {state.length} tokens (expected position {state.length})"
                )
        if start_pos + q > self.max_context:
            raise CacheStateError(
                f"request {request_id!r}: {start_pos + q} tokens exceed the model's "
                f"context of {self.max_context}"
            )
        if kind == "prefill" and len(self._requests) >= self.max_requests:
            raise CacheFullError(
                f"stage holds {len(self._requests)} request caches (max {self.max_requests}); "
                "release finished requests"
            )

    @torch.inference_mode()
    def step(self, request_id: str, kind: str, x: torch.Tensor, start_pos: int) -> StepOutput:
        """Run one prefill (whole prompt) or decode (one token) step for a request."""
        from transformers import DynamicCache

        self.check_input(kind, x, start_pos, request_id)
        t0 = time.perf_counter()
        state = self._requests.get(request_id)
        if state is None:
            state = _RequestState(cache=DynamicCache())
        q = x.shape[1]
        x = x.to(self.device)
        if self.is_first:
            assert self.embed is not None
            hidden = self.embed(x.to(torch.long))
        else:
            hidden = x.to(self.dtype)
        hidden = self._run_layers(hidden, state.cache, start_pos, q)
        state.length = start_pos + q
        state.last_used_s = time.monotonic()
        self._requests[request_id] = state

        logits = token = None
        out_hidden: torch.Tensor | None = hidden
        if self.is_last:
            assert self.norm is not None and self.lm_head is not None
            normed = self.norm(hidden)
            logits = self.lm_head(normed[:, -1:, :])[:, -1, :].to(dtype=torch.float32)
            token = int(torch.argmax(logits, dim=-1)[0])
            out_hidden = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepOutput(
            hidden=out_hidden,
            logits=logits,
            token_id=token,
            length=state.length,
            compute_s=time.perf_counter() - t0,
        )

    def _mask(self, layer_type: str, start_pos: int, q: int) -> torch.Tensor:
        return causal_mask(
            start_pos,
            q,
            window=self._sliding_window if layer_type == "sliding_attention" else None,
            additive=self.config._attn_implementation == "eager",
            dtype=self.dtype,
            device=self.device,
        )

    def _run_layers(self, hidden: torch.Tensor, cache: Any, start_pos: int, q: int):
        position_ids = torch.arange(start_pos, start_pos + q, device=self.device).unsqueeze(0)
        masks = {t: self._mask(t, start_pos, q) for t in set(self._layer_types)}
        position_embeddings = self.rotary(hidden, position_ids)
        for layer, layer_type in zip(self.layers, self._layer_types, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[layer_type],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        return hidden

    # ---------------------------------------------------------------- profiling helpers
    @torch.inference_mode()
    def time_parts(
        self, prompt_tokens: int, context_tokens: int, repeats: int = 3
    ) -> dict[str, dict[str, float]]:
        """Median seconds for embed, each block and head: a P-token prefill, a decode at context C.

        Keys: "embed" (first stage), "block<i>", "head" (last stage); values {"prefill_s",
        "decode_s"}. Runs on throwaway caches with random inputs; used by `testbed profile`.
        """
        import statistics

        from transformers import DynamicCache

        gen = torch.Generator().manual_seed(0)
        samples: dict[str, dict[str, list[float]]] = {}
        h = self.info.hidden_size
        for kind, q, past in (("prefill", prompt_tokens, 0), ("decode", 1, context_tokens)):
            ids = torch.randint(0, self.info.vocab_size, (1, q), generator=gen).to(self.device)
            hidden = (torch.randn(1, q, h, generator=gen) * 0.1).to(self.device, self.dtype)
            cache = DynamicCache()
            if past:
                pre = (torch.randn(1, past, h, generator=gen) * 0.1).to(self.device, self.dtype)
                self._run_layers(pre, cache, 0, past)
            for _ in range(repeats + 1):  # the first round warms up and is dropped
                times: dict[str, float] = {}
                if self.embed is not None:
                    times["embed"] = self._timed(self.embed, ids)
                for k, layer in enumerate(self.layers):
                    one = _OneLayer(self, layer, self.start + k)
                    times[f"block{self.start + k}"] = self._timed(one, hidden, cache, past, q)
                if self.norm is not None and self.lm_head is not None:
                    times["head"] = self._timed(_Head(self.norm, self.lm_head), hidden)
                if _ == 0:
                    continue
                for part, sec in times.items():
                    samples.setdefault(part, {}).setdefault(f"{kind}_s", []).append(sec)
        return {
            part: {key: statistics.median(vals) for key, vals in kinds.items()}
            for part, kinds in samples.items()
        }

    def _timed(self, fn: Any, *args: Any) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


class _Head:
    """Final norm + LM head on the last position (for profiling)."""

    def __init__(self, norm: nn.Module, head: nn.Module):
        self.norm, self.head = norm, head

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden)[:, -1:, :])


class _OneLayer:
    """Run one block of an executor on a cache (for profiling)."""

    def __init__(self, ex: LayerRangeExecutor, layer: nn.Module, idx: int):
        self.ex, self.layer, self.idx = ex, layer, idx

    def __call__(self, hidden: torch.Tensor, cache: Any, start_pos: int, q: int) -> torch.Tensor:
        ex = self.ex
        layer_type = _layer_types(ex.config)[self.idx]
        position_ids = torch.arange(start_pos, start_pos + q, device=ex.device).unsqueeze(0)
        pos = ex.rotary(hidden, position_ids)
        out = self.layer(
            hidden,
            attention_mask=ex._mask(layer_type, start_pos, q),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=pos,
        )
        cache.layers[self.idx].crop(-q)  # every block and repeat is timed at the same context
        return out


def causal_mask(
    start_pos: int,
    q: int,
    *,
    window: int | None,
    additive: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The [1, 1, q, start_pos + q] attention mask of q new tokens over a full KV cache.

    Query i (absolute position start_pos + i) sees keys 0..start_pos + i, and with a sliding
    window only the last ``window`` of them (HF's convention: kv > q - window). Boolean (True =
    attend) for SDPA, additive (0 / dtype min) for eager attention. Built here rather than with
    transformers' internal mask helpers, whose signatures change between releases; the caches
    are full (not sliding) layers, so the window lives in the mask alone.
    """
    q_pos = torch.arange(start_pos, start_pos + q, device=device)[:, None]
    kv_pos = torch.arange(start_pos + q, device=device)[None, :]
    allowed = kv_pos <= q_pos
    if window is not None:
        allowed &= kv_pos > q_pos - window
    allowed = allowed[None, None]
    if not additive:
        return allowed
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def _desc(x: torch.Tensor) -> str:
    return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"


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
