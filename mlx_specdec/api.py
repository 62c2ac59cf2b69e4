"""The Python API: ``load``, ``generate``, ``stream_generate``, ``generate_batch``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Sequence, Union

import numpy as np

from .decode import Options, Stats, check_prompt, decode
from .errors import InputError
from .loading import SpecModel, check_kv_memory, load
from .prompt import Messages, TextStream, answer_text, check_messages, encode_messages, encode_text, is_messages
from .sampling import SamplingParams


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str | None  # None when the model has no tokenizer
    stats: Stats
    finish_reason: str | None  # "stop" (EOS) or "length" (max_tokens)


@dataclass
class GenerationChunk:
    """One streamed piece: the tokens new since the last chunk and their text."""

    tokens: list[int]
    text: str | None
    stats: Stats
    finish_reason: str | None


Prompt = Union[str, Sequence[int], Messages]


@dataclass
class Settings:
    """The generation options, spelled once: the API's keyword arguments, chat's /temp, /max,
    /draft and the commands' flags all set these fields."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    # "auto": the measured policy picks k each round (0 = plain decoding when drafting does not
    # pay, see policy.py); an int k >= 1 drafts k tokens per round; 0 is plain decoding.
    draft_tokens: int | str = "auto"

    @classmethod
    def of(cls, options: dict) -> "Settings":
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"unknown option {', '.join(unknown)}; the options are "
                             + ", ".join(f.name for f in fields(cls)))
        return cls(**options)

    def options(self) -> Options:
        sampling = SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  min_p=self.min_p, seed=self.seed)
        return Options(max_tokens=self.max_tokens, sampling=sampling, draft_tokens=self.draft_tokens)


def encode(model: SpecModel, prompt: Prompt, chat_template_config: dict | None = None) -> list[int]:
    """Token ids of a prompt: chat messages through the model's chat template, a str as raw
    text to continue, token ids as they are."""
    if is_messages(prompt):
        ids = encode_messages(model.tokenizer, prompt, chat_template_config)
    elif isinstance(prompt, str):
        ids = encode_text(model.tokenizer, prompt)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
    elif isinstance(prompt, np.ndarray) and prompt.ndim == 1:
        ids = prompt.tolist()
    else:
        raise InputError(f"prompt must be a str, a list of token ids or a list of chat messages, "
                         f"got {type(prompt).__name__}")
    return check_prompt(ids, model.target.config.vocab_size, model.target.config.max_position_embeddings)


def _prompt(prompt: Prompt | None, messages: Messages | None) -> Prompt:
    if (prompt is None) == (messages is None):
        raise InputError("give the prompt or messages=, one of them")
    return check_messages(messages) if messages is not None else prompt


def stream_generate(
    model: SpecModel,
    prompt: Prompt | None = None,
    *,
    messages: Messages | None = None,
    chat_template_config: dict | None = None,
    **options,
) -> Iterator[GenerationChunk]:
    """Yield the generation as it goes, one chunk per speculative round.

    ``prompt``: chat messages (``[{"role": "user", "content": "..."}]``, or pass them as
    ``messages=``) are answered through the model's chat template, with
    ``chat_template_config`` as extra template variables (e.g. ``{"enable_thinking": True}``);
    a str is raw text the model continues (as in mlx-lm); token ids are used as they are.
    ``options`` are the fields of `Settings`: ``max_tokens``, ``temperature`` (0 is greedy,
    token-identical to plain greedy; otherwise speculative sampling keeps the target's
    distribution exactly), ``top_p``, ``top_k``, ``min_p``, ``seed`` and ``draft_tokens``
    ("auto", an int k, or 0 for plain decoding).
    """
    run = Settings.of(options).options()
    ids = encode(model, _prompt(prompt, messages), chat_template_config)
    check_kv_memory(model, [len(ids)], run.max_tokens)
    stream = TextStream(model.tokenizer) if model.tokenizer is not None else None
    try:
        for update in decode(model, [ids], run):
            new = update.tokens.get(0, [])
            finish = update.finished.get(0)
            text = stream.add(new, bool(finish)) if stream is not None else None
            if new or finish:
                yield GenerationChunk(new, text, update.stats[0], finish)
    finally:
        model.save_policy()


def generate(model: SpecModel, prompt: Prompt | None = None, **kwargs) -> GenerationResult:
    """Generate a whole answer; same arguments as `stream_generate`."""
    tokens, finish, stats = [], None, None
    for chunk in stream_generate(model, prompt, **kwargs):
        tokens += chunk.tokens
        finish, stats = chunk.finish_reason, chunk.stats
    text = answer_text(model.tokenizer, tokens) if model.tokenizer is not None else None
    return GenerationResult(tokens, text, stats, finish)


def generate_batch(
    model: SpecModel,
    prompts: Sequence[Prompt],
    *,
    chat_template_config: dict | None = None,
    **options,
) -> list[GenerationResult]:
    """Decode several prompts together: one batched draft and verify pass per round.

    Each prompt is what `stream_generate` takes: a conversation (a list of messages), a str
    or token ids. ``options`` are the fields of `Settings`."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if not prompts:
        raise InputError("prompts is empty")
    if is_messages(prompts):
        raise InputError("prompts is one conversation: pass a list of conversations, [messages, ...]")
    run = Settings.of(options).options()
    ids = [encode(model, p, chat_template_config) for p in prompts]
    check_kv_memory(model, [len(i) for i in ids], run.max_tokens)
    tokens = [[] for _ in ids]
    finish = [None] * len(ids)
    stats = None
    try:
        for update in decode(model, ids, run):
            for row, new in update.tokens.items():
                tokens[row] += new
            for row, why in update.finished.items():
                finish[row] = why
            stats = update.stats
    finally:
        model.save_policy()
    tok = model.tokenizer
    return [GenerationResult(t, answer_text(tok, t) if tok is not None else None, s, f) for t, s, f in zip(tokens, stats, finish)]


__all__ = ["GenerationChunk", "GenerationResult", "Settings", "generate", "generate_batch", "load", "stream_generate"]
