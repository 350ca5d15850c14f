"""The ``workload:`` section of a scenario file, and :func:`load_workload`.

Examples (YAML)::

    workload: {kind: azure, path: ../traces/AzureLLMInferenceTrace_conv.csv,
               window: {start_s: 0, duration_s: 10min}, rate_scale: 0.5, max_requests: 200}
    workload: {kind: burstgpt, path: BurstGPT_1.csv, models: [ChatGPT], max_output_tokens: 256}
    workload: {kind: mooncake, path: conversation_trace.jsonl, time_scale: 4}
    workload: {kind: synthetic, rate_rps: 2, burstiness: 0.5, num_requests: 100, seed: 1,
               prompt_tokens: {dist: lognormal, mean: 300, sigma: 0.8, high: 2048},
               output_tokens: 64}

Relative paths resolve against the scenario file's folder (``base_dir``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator

from testbed.errors import ConfigError, WorkloadError
from testbed.spec.loading import validate
from testbed.spec.quantities import MAX_TOKENS, FiniteFloat, StrictInt, TraceSeconds
from testbed.workload.knobs import MAX_REQUESTS, Knobs, apply_knobs
from testbed.workload.readers import read_azure, read_burstgpt, read_mooncake
from testbed.workload.request import TraceRow, Workload
from testbed.workload.synthetic import gamma_arrivals, synthetic_rows

log = logging.getLogger(__name__)

Duration = TraceSeconds  # seconds; a bare number is seconds (the field names end in _s), "10min"
# token counts and lengths: whole numbers 1 .. MAX_TOKENS, no "5" for 5
TokenCount = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)]
TokenMean = Annotated[FiniteFloat, Field(gt=0, le=MAX_TOKENS)]
Spread = Annotated[FiniteFloat, Field(ge=0, le=MAX_TOKENS)]
Scale = Annotated[FiniteFloat, Field(ge=1e-3, le=1e3)]  # time_scale / rate_scale
MAX_RATE_RPS = 1e6


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Window(_Model):
    start_s: Duration = 0.0  # trace seconds from the file's first row
    duration_s: Duration | None = None  # None = to the end of the trace

    @model_validator(mode="after")
    def _positive(self) -> Window:
        if self.duration_s == 0:
            raise ValueError("duration_s must be > 0 (or left out for the whole trace)")
        return self


class _Knobs(_Model):
    time_scale: Scale = 1.0  # multiplies inter-arrival times (1e-3 .. 1e3)
    rate_scale: Scale = 1.0  # divides inter-arrival times (2 = twice the request rate)
    window: Window | None = None
    max_prompt_tokens: TokenCount | None = None  # longer prompts are clipped
    max_output_tokens: TokenCount | None = None  # longer outputs are clipped
    max_requests: Annotated[StrictInt, Field(ge=1, le=MAX_REQUESTS)] | None = None  # first N
    # the model's context window, set by the scenario (not by the file): a longer request is
    # clipped to fit it, and the clipping is counted and reported
    _context_tokens: int | None = None

    def with_context(self, context_tokens: int) -> Any:
        """A copy that clips requests to ``context_tokens`` positions (prompt + output - 1)."""
        copy = self.model_copy()
        copy._context_tokens = context_tokens
        return copy

    def knobs(self) -> Knobs:
        w = self.window or Window()
        return Knobs(
            time_scale=self.time_scale,
            rate_scale=self.rate_scale,
            start_s=w.start_s,
            duration_s=w.duration_s,
            max_prompt_tokens=self.max_prompt_tokens,
            max_output_tokens=self.max_output_tokens,
            max_requests=self.max_requests,
            context_tokens=self._context_tokens,
        )


class AzureSpec(_Knobs):
    """Azure LLM inference trace, 2023 or 2024 (TIMESTAMP,ContextTokens,GeneratedTokens)."""

    kind: Literal["azure"]
    path: Path


class BurstGPTSpec(_Knobs):
    """BurstGPT CSV; failed rows (Response tokens == 0) are dropped and counted."""

    kind: Literal["burstgpt"]
    path: Path
    models: tuple[str, ...] | None = None  # keep only these 'Model' values, e.g. [ChatGPT, GPT-4]
    log_types: tuple[str, ...] | None = None  # e.g. ['Conversation log'] or ['API log']


class MooncakeSpec(_Knobs):
    """Mooncake JSONL (timestamp ms, input_length, output_length, hash_ids)."""

    kind: Literal["mooncake"]
    path: Path


# --- synthetic lengths -------------------------------------------------------------------


class FixedLength(_Model):
    dist: Literal["fixed"]
    value: TokenCount

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


class UniformLength(_Model):
    """Whole numbers from low to high, both included."""

    dist: Literal["uniform"]
    low: TokenCount
    high: TokenCount

    @model_validator(mode="after")
    def _order(self) -> UniformLength:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high, size=n, endpoint=True, dtype=np.int64)


class _Clipped(_Model):
    low: TokenCount = 1  # draws are rounded and clipped to [low, high] (high: MAX_TOKENS)
    high: TokenCount | None = None

    @model_validator(mode="after")
    def _order(self) -> _Clipped:
        if self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        return self

    def _clip(self, x: np.ndarray) -> np.ndarray:
        high = self.high if self.high is not None else MAX_TOKENS
        return np.clip(np.rint(x), self.low, high).astype(np.int64)


class NormalLength(_Clipped):
    dist: Literal["normal"]
    mean: TokenMean
    std: Spread

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self._clip(rng.normal(self.mean, self.std, size=n))


class LogNormalLength(_Clipped):
    """Log-normal with the given mean (tokens) and shape sigma (of the underlying normal)."""

    dist: Literal["lognormal"]
    mean: TokenMean
    sigma: Annotated[FiniteFloat, Field(ge=0, le=10)]  # of the underlying normal

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = float(np.log(self.mean)) - self.sigma**2 / 2
        return self._clip(rng.lognormal(mu, self.sigma, size=n))


TraceFormat = Literal["azure", "burstgpt", "mooncake"]


class EmpiricalLength(_Model):
    """Draw (with replacement) from one column of a trace file's lengths."""

    dist: Literal["empirical"]
    path: Path
    format: TraceFormat


def _int_to_fixed(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return {"dist": "fixed", "value": v}
    return v


LengthSpec = Annotated[
    Annotated[
        FixedLength | UniformLength | NormalLength | LogNormalLength | EmpiricalLength,
        Field(discriminator="dist"),
    ],
    BeforeValidator(_int_to_fixed),
]


class TraceLengths(_Model):
    """Draw (prompt, output) pairs jointly from a trace file's rows."""

    path: Path
    format: TraceFormat


class SyntheticSpec(_Knobs):
    """Gamma arrivals (rate_rps, burstiness k; k = 1 is Poisson) with synthetic lengths."""

    kind: Literal["synthetic"]
    rate_rps: Annotated[FiniteFloat, Field(ge=1e-6, le=MAX_RATE_RPS)]
    burstiness: Annotated[FiniteFloat, Field(ge=1e-3, le=1e3)] = 1.0
    num_requests: Annotated[StrictInt, Field(ge=1, le=MAX_REQUESTS)] | None = None
    duration_s: Duration | None = None  # arrivals before this time (synthetic clock)
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None  # None: the scenario's
    prompt_tokens: LengthSpec | None = None  # a number = fixed length
    output_tokens: LengthSpec | None = None
    lengths_from: TraceLengths | None = None  # instead of prompt_tokens/output_tokens

    @model_validator(mode="after")
    def _bounds(self) -> SyntheticSpec:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError(
                "say how many requests: num_requests (e.g. 100) and/or duration_s (e.g. '60s')"
            )
        if self.duration_s == 0:
            raise ValueError("duration_s must be > 0")
        if self.duration_s is not None and self.num_requests is None:
            expected = self.rate_rps * self.duration_s
            if expected > MAX_REQUESTS / 2:
                raise ValueError(
                    f"rate_rps x duration_s = {expected:.3g} requests; the limit is "
                    f"{MAX_REQUESTS:,} requests per workload: set num_requests, a lower rate_rps "
                    "or a shorter duration_s"
                )
        if self.lengths_from is not None:
            if self.prompt_tokens is not None or self.output_tokens is not None:
                raise ValueError(
                    "give either lengths_from or prompt_tokens/output_tokens, not both"
                )
        elif self.prompt_tokens is None or self.output_tokens is None:
            raise ValueError(
                "say how long requests are: prompt_tokens and output_tokens (a number, or e.g. "
                "{dist: uniform, low: 64, high: 512}), or lengths_from: {path: TRACE, format: azure}"
            )
        return self


WorkloadSpec = Annotated[
    AzureSpec | BurstGPTSpec | MooncakeSpec | SyntheticSpec, Field(discriminator="kind")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(WorkloadSpec)


_ROOTS: list[type[BaseModel]] = [AzureSpec, BurstGPTSpec, MooncakeSpec, SyntheticSpec]


def parse_workload_spec(
    data: Any, *, source: str | None = None
) -> AzureSpec | BurstGPTSpec | MooncakeSpec | SyntheticSpec:
    """Validate a ``workload:`` mapping; errors become one :class:`ConfigError` (the shared
    formatter of :mod:`testbed.spec.loading`, paths under ``workload.``)."""
    return validate(_ADAPTER, data, source or "", ("workload",), roots=_ROOTS)


# --- loading ------------------------------------------------------------------------------


def _resolve(path: Path, base_dir: Path, field: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base_dir) / p
    if not p.is_file():
        raise ConfigError(
            f"trace file {str(path)!r} not found (looked at {p}; relative paths are resolved against "
            f"the scenario file's folder {base_dir})",
            field=field,
        )
    return p


def _rows(fmt: str, path: Path, counts: Counter[str], spec: Any = None) -> Iterator[TraceRow]:
    if fmt == "azure":
        return read_azure(path)
    if fmt == "burstgpt":
        models = getattr(spec, "models", None)
        log_types = getattr(spec, "log_types", None)
        return read_burstgpt(path, models=models, log_types=log_types, counts=counts)
    return read_mooncake(path)


def _trace_lengths(fmt: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    p, o = [], []
    for row in _rows(fmt, path, Counter()):
        p.append(row.prompt_tokens)
        o.append(row.output_tokens)
    if not p:
        raise WorkloadError(f"{path}: the trace has no rows to draw lengths from")
    return np.maximum(np.asarray(p, dtype=np.int64), 1), np.maximum(
        np.asarray(o, dtype=np.int64), 1
    )


def _sample(
    spec: Any, rng: np.random.Generator, n: int, base_dir: Path, field: str, column: int
) -> np.ndarray:
    if isinstance(spec, EmpiricalLength):
        arrays = _trace_lengths(spec.format, _resolve(spec.path, base_dir, f"{field}.path"))
        values = arrays[column]
        return values[rng.integers(0, len(values), size=n)]
    return spec.sample(rng, n)


def load_workload(
    spec: AzureSpec | BurstGPTSpec | MooncakeSpec | SyntheticSpec,
    base_dir: Path,
    *,
    default_seed: int = 0,
) -> Workload:
    """Read (or generate) the requests of ``spec`` and apply its knobs."""
    base_dir = Path(base_dir)
    knobs = spec.knobs()
    counts: Counter[str] = Counter()
    desc: dict[str, Any] = {"spec": spec.model_dump(mode="json")}
    if isinstance(spec, SyntheticSpec):
        seed = spec.seed if spec.seed is not None else default_seed
        s_arr, s_p, s_o = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        t = gamma_arrivals(
            s_arr,
            spec.rate_rps,
            spec.burstiness,
            num_requests=spec.num_requests,
            duration_s=spec.duration_s,
        )
        n = len(t)
        if spec.lengths_from is not None:
            src = _resolve(spec.lengths_from.path, base_dir, "workload.lengths_from.path")
            p_all, o_all = _trace_lengths(spec.lengths_from.format, src)
            pick = s_p.integers(0, len(p_all), size=n)
            prompts, outputs = p_all[pick], o_all[pick]
            desc["lengths_from"] = str(src)
        else:
            prompts = _sample(spec.prompt_tokens, s_p, n, base_dir, "workload.prompt_tokens", 0)
            outputs = _sample(spec.output_tokens, s_o, n, base_dir, "workload.output_tokens", 1)
        rows: Iterator[TraceRow] = synthetic_rows(t, prompts, outputs)
        desc["seed"] = seed
    else:
        path = _resolve(spec.path, base_dir, "workload.path")
        rows = _rows(spec.kind, path, counts, spec)
        desc["path"] = str(path)
    requests, stats = apply_knobs(rows, knobs, counts)
    if stats.context_clipped:
        log.warning(
            "workload: %d of %d requests clipped to the model's context window of %d tokens "
            "(prompt + output - 1 <= %d); set max_prompt_tokens/max_output_tokens to choose how",
            stats.context_clipped,
            stats.requests,
            knobs.context_tokens,
            knobs.context_tokens,
        )
    if not requests:
        raise WorkloadError(
            f"the {spec.kind} workload has no request left after the window/filters "
            f"({stats.rows_read} rows read, {stats.before_window} before the window, "
            f"{stats.failed_skipped} failed, {stats.filtered_out} filtered out); widen the window or drop a filter"
        )
    desc["stats"] = stats.to_dict()
    return Workload(requests=requests, stats=stats, description=desc)
