"""Model profiles: what each decoder block of a model costs, from a Hugging Face config.json.

From the architecture alone (no weights) we derive, per block: parameter count and weight bytes
per dtype, FLOPs per token for prefill and decode (matmuls 2 x params, plus attention that
grows with the context), KV-cache bytes per token and the activation bytes per token that cross
a cut. Embedding and head are separate. A :class:`MeasuredProfile` (``testbed profile``) can
replace the estimate with times measured on real hardware.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from testbed.errors import ConfigError, brief
from testbed.spec.loading import read_mapping, validate
from testbed.spec.quantities import StrictBool, StrictInt

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8": 1}
Dtype = Literal["float32", "float16", "bfloat16", "int8", "float8"]

SUPPORTED_ARCHS = ("phi3", "llama", "qwen2", "mistral")


class ModelArch(BaseModel):
    """The architecture numbers that determine cost (read from a HF config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model_type: str
    num_blocks: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2 has biases on q, k, v
    max_position_embeddings: int = 2048

    # -- per block ---------------------------------------------------------------------------
    @property
    def block_params(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size  # gated MLP: gate, up, down
        norms = 2 * h
        return attn + mlp + norms

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        # final norm + LM head; a tied head still needs its own copy on the last stage
        return self.hidden_size + self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        head = self.hidden_size if self.tie_word_embeddings else self.head_params
        return self.embed_params + self.num_blocks * self.block_params + head

    def kv_elems_per_token(self) -> int:
        """K and V elements one block stores per token."""
        return 2 * self.num_kv_heads * self.head_dim


class ModelProfile(BaseModel):
    """Costs of a model at one dtype. All methods are pure arithmetic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: ModelArch
    dtype: Dtype = "float16"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def num_blocks(self) -> int:
        return self.arch.num_blocks

    # memory
    def block_weight_bytes(self) -> int:
        return self.arch.block_params * self.dtype_bytes

    def embed_weight_bytes(self) -> int:
        return self.arch.embed_params * self.dtype_bytes

    def head_weight_bytes(self) -> int:
        return self.arch.head_params * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """Per block."""
        return self.arch.kv_elems_per_token() * self.dtype_bytes

    def activation_bytes_per_token(self) -> int:
        """Hidden state of one token crossing a cut."""
        return self.arch.hidden_size * self.dtype_bytes

    # compute (FLOPs) - matmul = 2 FLOPs per multiply-add
    def block_prefill_flops(self, prompt_tokens: int) -> float:
        """One block over a whole prompt: linear layers + causal attention (QK^T and AV)."""
        p = prompt_tokens
        q = self.arch.num_heads * self.arch.head_dim
        linear = 2.0 * self.arch.block_params * p
        attention = 2.0 * q * p * (p + 1)  # sum over t of 4*q*t
        return linear + attention

    def block_decode_flops(self, context_tokens: int) -> float:
        """One block, one new token attending to ``context_tokens`` cached tokens (+ itself)."""
        q = self.arch.num_heads * self.arch.head_dim
        return 2.0 * self.arch.block_params + 4.0 * q * (context_tokens + 1)

    def block_prefill_bytes(self, prompt_tokens: int) -> float:
        """Bytes through memory: weights once, KV written, activations in/out."""
        return (
            self.block_weight_bytes()
            + prompt_tokens * self.kv_bytes_per_token()
            + 2 * prompt_tokens * self.activation_bytes_per_token()
        )

    def block_decode_bytes(self, context_tokens: int) -> float:
        """Weights once, the whole KV cache read, one KV entry written."""
        return (
            self.block_weight_bytes()
            + (context_tokens + 1) * self.kv_bytes_per_token()
            + 2 * self.activation_bytes_per_token()
        )

    def head_flops(self, tokens: int = 1) -> float:
        """LM head on ``tokens`` positions (generation needs only the last one)."""
        return 2.0 * self.arch.vocab_size * self.arch.hidden_size * tokens

    def head_bytes(self, tokens: int = 1) -> float:
        return self.head_weight_bytes() + tokens * self.arch.vocab_size * self.dtype_bytes

    def embed_bytes(self, tokens: int) -> float:
        """An embedding lookup touches only the rows it needs."""
        return tokens * self.activation_bytes_per_token() * 2


# Upper limits on a config.json's numbers, well above any published model (a 405B model has
# 126 blocks, hidden 16384, vocabularies reach ~256k): a larger number is a typo or an attack.
MAX_BLOCKS = 1024
MAX_HIDDEN = 65_536
MAX_HEADS = 1024
MAX_VOCAB = 2**22
MAX_CONTEXT = 2**24


class HFConfig(BaseModel):
    """The cost-relevant fields of a Hugging Face ``config.json`` (the others are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_type: str
    num_hidden_layers: StrictInt = Field(ge=1, le=MAX_BLOCKS)
    hidden_size: StrictInt = Field(ge=1, le=MAX_HIDDEN)
    intermediate_size: StrictInt = Field(ge=1, le=16 * MAX_HIDDEN)
    num_attention_heads: StrictInt = Field(ge=1, le=MAX_HEADS)
    num_key_value_heads: StrictInt | None = Field(default=None, ge=1, le=MAX_HEADS)
    head_dim: StrictInt | None = Field(default=None, ge=1, le=MAX_HIDDEN)
    vocab_size: StrictInt = Field(ge=1, le=MAX_VOCAB)
    tie_word_embeddings: StrictBool | None = False
    attention_bias: StrictBool | None = False
    max_position_embeddings: StrictInt = Field(default=2048, ge=1, le=MAX_CONTEXT)

    @model_validator(mode="after")
    def _heads(self) -> HFConfig:
        h, n = self.hidden_size, self.num_attention_heads
        if self.head_dim is None:
            if n > h:
                raise ValueError(
                    f"num_attention_heads ({n}) is larger than hidden_size ({h}); "
                    "each head needs hidden_size / num_attention_heads >= 1 dimensions"
                )
            if h % n:
                raise ValueError(
                    f"hidden_size ({h}) is not divisible by num_attention_heads ({n}); "
                    "fix one of them or give head_dim"
                )
        kv = self.num_key_value_heads
        if kv is not None and (kv > n or n % kv):
            raise ValueError(
                f"num_key_value_heads ({kv}) must divide num_attention_heads ({n}); "
                "grouped-query attention shares each KV head among a whole number of heads"
            )
        return self


def arch_from_hf_config(cfg: Any, name: str, source: str = "config.json") -> ModelArch:
    """Read the fields that matter from a HF config dict; errors name the field and the fix."""
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"a model config must be a JSON object, got {type(cfg).__name__}", source=source
        )
    model_type = cfg.get("model_type", "")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"model_type {brief(model_type)} is not supported; supported decoder-only "
            f"architectures: {', '.join(SUPPORTED_ARCHS)}",
            source=source,
            field="model_type",
        )
    c = validate(HFConfig, cfg, source)
    heads = c.num_attention_heads
    return ModelArch(
        name=name,
        model_type=model_type,
        num_blocks=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=heads,
        num_kv_heads=c.num_key_value_heads or heads,
        head_dim=c.head_dim or c.hidden_size // heads,
        vocab_size=c.vocab_size,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        qkv_bias=model_type == "qwen2" or bool(c.attention_bias),
        max_position_embeddings=c.max_position_embeddings,
    )


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """A model's ``config.json`` as a dict: bounded, UTF-8, a JSON object (errors exit 2)."""
    return read_mapping(path, "model config")


def check_fits_context(
    prompt_tokens: int, output_tokens: int, context_tokens: int, *, source: str | None, field: str
) -> None:
    """A request of P prompt and O output tokens occupies P + O - 1 positions of the model's
    context (the last token generated is never fed back); refuse one that cannot fit."""
    need = prompt_tokens + output_tokens - 1
    if need > context_tokens:
        raise ConfigError(
            f"{prompt_tokens} prompt + {output_tokens} output tokens need {need} positions but the "
            f"model's context window is {context_tokens} tokens; lower them so that "
            f"prompt + output - 1 <= {context_tokens}",
            source=source,
            field=field,
        )


# Presets: the published configs' cost-relevant numbers (no weights needed to plan).
PRESETS: dict[str, dict[str, Any]] = {
    "phi-3-mini": {
        "model_type": "phi3",
        "num_hidden_layers": 32,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
    },
    "phi-3-medium": {
        "model_type": "phi3",
        "num_hidden_layers": 40,
        "hidden_size": 5120,
        "intermediate_size": 17920,
        "num_attention_heads": 40,
        "num_key_value_heads": 10,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
    },
    "llama-3-8b": {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
    },
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "num_hidden_layers": 24,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
    },
    # The CI model: what `testbed model make-tiny` writes by default (Phi-3 architecture).
    "tiny": {
        "model_type": "phi3",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
    },
}


def load_model_profile(
    model: str | Path, dtype: str = "float16", base_dir: Path | None = None
) -> ModelProfile:
    """A preset name, or a local model folder / config.json path (relative to ``base_dir``)."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(
            f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}", field="dtype"
        )
    text = str(model)
    if text in PRESETS:
        return ModelProfile(
            arch=arch_from_hf_config(PRESETS[text], text, f"preset {text}"),
            dtype=dtype,  # type: ignore[arg-type]
        )
    path = Path(text)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        import difflib

        close = difflib.get_close_matches(text, PRESETS, n=1)
        hint = f" (did you mean preset {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"model {text!r} is neither a preset{hint} nor a model folder with config.json; "
            f"presets: {', '.join(sorted(PRESETS))}",
            field="model",
        )
    cfg = read_hf_config(cfg_path)
    name = cfg_path.parent.name if cfg_path.name == "config.json" else cfg_path.stem
    return ModelProfile(arch=arch_from_hf_config(cfg, name, str(cfg_path)), dtype=dtype)  # type: ignore[arg-type]


# -- measured profiles (written by `testbed profile`) ------------------------------------------
class PhaseTimes(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    prefill_s: float = Field(ge=0, le=86400)  # the whole prompt (prompt_tokens) through this part
    decode_s: float = Field(ge=0, le=86400)  # one token at context_tokens


class MeasuredDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cpu", "gpu"]
    name: str
    threads: StrictInt = Field(ge=1, le=4096)


class MeasuredProfile(BaseModel):
    """Per-block times measured on one device; the cost model scales them to other nodes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["testbed.measured-profile"] = "testbed.measured-profile"
    version: Literal[1] = 1
    model: str
    architecture: str
    num_blocks: StrictInt = Field(gt=0, le=MAX_BLOCKS)
    dtype: str
    device: MeasuredDevice
    prompt_tokens: StrictInt = Field(gt=0, le=MAX_CONTEXT)
    context_tokens: StrictInt = Field(ge=0, le=MAX_CONTEXT)
    blocks: tuple[PhaseTimes, ...] = Field(max_length=MAX_BLOCKS)
    embed: PhaseTimes
    head: PhaseTimes
    host: str = ""
    measured_at: str = ""
    versions: dict[str, str] = {}


def load_measured_profile(path: str | Path) -> MeasuredProfile:
    data = read_mapping(path, "measured profile")
    prof = validate(MeasuredProfile, data, str(path))
    if len(prof.blocks) != prof.num_blocks:
        raise ConfigError(
            f"has {len(prof.blocks)} entries but num_blocks is {prof.num_blocks}; re-run `testbed profile`",
            source=str(path),
            field="blocks",
        )
    return prof
