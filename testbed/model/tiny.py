"""Generate small real Hugging Face causal-LM folders (random weights from a fixed seed).

The folders hold `config.json`, `model.safetensors`, `generation_config.json` and a byte-level
BPE tokenizer trained offline on built-in text, so `AutoModelForCausalLM.from_pretrained(dir)`
and `AutoTokenizer.from_pretrained(dir)` load them with no network. They exist so tests, CI
and benchmarks run real layers: `tiny` (about 1 MB) for tests, `small` (about 30 MB), and
`medium` (about 450 MB, compute dominates loopback HTTP on a CPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError

ARCHITECTURES = ("phi3", "llama", "qwen2", "mistral")

SPECIAL_TOKENS = ("<|endoftext|>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class TinySize:
    """Shape of a generated model."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 4096


SIZES: dict[str, TinySize] = {
    "tiny": TinySize(hidden_size=64, layers=4, heads=4, kv_heads=2, intermediate_size=128,
                     vocab_size=512),
    "small": TinySize(hidden_size=256, layers=8, heads=8, kv_heads=4, intermediate_size=768,
                      vocab_size=2048),
    "medium": TinySize(hidden_size=1024, layers=8, heads=16, kv_heads=8, intermediate_size=2816,
                       vocab_size=8192),
}  # fmt: skip

# Built-in training text for the tokenizer (written for this project; no external data).
_CORPUS = """\
The testbed runs a language model split into stages across edge, fog and cloud tiers.
Each stage holds a contiguous range of decoder blocks and keeps a key value cache for every
request that passes through it. The first stage embeds the prompt tokens, the middle stages
transform hidden states, and the last stage applies the final norm and the language model head
to choose the next token. Links between tiers have a bandwidth, a one way delay, some jitter
and a loss rate; a broker places each request on a route of nodes and measures how long the
prefill and every decode step take. Time to first token, time per output token and end to end
latency are reported with their percentiles, together with throughput and goodput.
A small model is enough to check that the pipeline gives the same tokens as the whole model:
the numbers are random, but the arithmetic is real. Larger models make compute dominate the
cost of moving activations over the loopback interface, which is what a benchmark needs.
Once upon a time a river ran past a quiet town. In the morning the baker opened the shop, the
children walked to school, and the old clock in the square struck eight. People talked about
the weather, the harvest, the price of bread and the news from the city across the hills.
At night the lamps were lit one by one and the stars came out over the dark water.
Numbers: zero one two three four five six seven eight nine ten hundred thousand million.
Punctuation, digits 0 1 2 3 4 5 6 7 8 9, and symbols ( ) [ ] { } < > = + - * / % ! ? : ; .
"""


def _resolve_size(size: str, overrides: dict[str, int | None]) -> TinySize:
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; use one of {', '.join(SIZES)}", field="size")
    shape = replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})
    for name in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings"):  # fmt: skip
        if getattr(shape, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(shape, name)}", field=name)
    if shape.hidden_size % shape.heads:
        raise ConfigError(
            f"hidden size {shape.hidden_size} is not a multiple of heads {shape.heads}",
            field="heads",
        )
    if shape.heads % shape.kv_heads:
        raise ConfigError(
            f"heads {shape.heads} is not a multiple of kv heads {shape.kv_heads}", field="kv_heads"
        )
    if (shape.hidden_size // shape.heads) % 2:
        raise ConfigError(
            f"head dim {shape.hidden_size // shape.heads} must be even for rotary embeddings",
            field="heads",
        )
    if shape.vocab_size < 300:
        raise ConfigError(
            f"vocab size {shape.vocab_size} is too small; the byte-level tokenizer needs >= 300",
            field="vocab_size",
        )
    return shape


def _build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE trained on the built-in text, padded with unused tokens to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fill = vocab_size - tok.get_vocab_size()
    if fill > 0:
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(f"<|unused_{i}|>", special=True) for i in range(fill)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        unk_token=SPECIAL_TOKENS[UNK_ID],
    )
    return fast


def _build_config(arch: str, shape: TinySize) -> Any:
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    if arch == "phi3":
        return transformers.Phi3Config(
            **common,
            original_max_position_embeddings=shape.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=None,
        )
    if arch == "llama":
        return transformers.LlamaConfig(
            **common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            use_sliding_window=False,
        )
    if arch == "mistral":
        return transformers.MistralConfig(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=None,
        )
    raise ConfigError(
        f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}", field="arch"
    )


def make_tiny_model(
    directory: str | Path,
    arch: str = "phi3",
    *,
    size: str = "tiny",
    hidden_size: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a real HF model folder with random weights from `seed`; return its path.

    `size` picks a preset (tiny, small, medium); the other keyword arguments override it.
    The same arguments (and library versions) always give the same weights.
    """
    arch = arch.lower()
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}", field="arch"
        )
    shape = _resolve_size(
        size,
        dict(
            hidden_size=hidden_size,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            intermediate_size=intermediate_size,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
        ),
    )
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no bars on stderr from a library call

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = _build_config(arch, shape)
    tokenizer = _build_tokenizer(shape.vocab_size)
    if len(tokenizer) != shape.vocab_size:  # pragma: no cover - guarded by _build_tokenizer
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, expected {shape.vocab_size}")

    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(rng_state)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "generator": "testbed.model.tiny",
        "arch": arch,
        "size": size,
        "seed": seed,
        "shape": shape.__dict__,
    }
    (out / "testbed-model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
