"""The Python API: ``load``, ``generate``, ``stream_generate``, ``generate_batch``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .decode import Options, Stats, check_prompt, decode
from .errors import InputError
from .loading import SpecModel, load
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


def encode(model: SpecModel, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt: text through the tokenizer, or ids (ints, NumPy integers) as given."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InputError("this model has no tokenizer files: pass the prompt as a list of token ids")
        if not prompt:
            raise InputError("prompt is empty")
        check_text(prompt)
        prompt = model.tokenizer.encode(prompt)
    elif isinstance(prompt, np.ndarray) and prompt.ndim == 1:
        prompt = prompt.tolist()
    elif not isinstance(prompt, (list, tuple)):
        raise InputError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    return check_prompt(list(prompt), model.target.config.vocab_size, model.target.config.max_position_embeddings)


def check_text(text: str) -> str:
    """Refuse text that is not Unicode through and through (lone surrogates: undecodable bytes
    that Python smuggled in from stdin or argv), which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the text is not valid UTF-8 (undecodable bytes at character {e.start})") from None
    return text


def _options(max_tokens, temperature, top_p, top_k, min_p, seed, draft_tokens) -> Options:
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    return Options(max_tokens=max_tokens, sampling=sampling, draft_tokens=draft_tokens)


def stream_generate(
    model: SpecModel,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    draft_tokens: int | str = "auto",
) -> Iterator[GenerationChunk]:
    """Yield the generation as it goes, one chunk per speculative round.

    ``draft_tokens``: "auto" lets the measured policy pick k each round (0 =
    plain decoding when drafting does not pay, see policy.py), an int k >= 1
    drafts k tokens per round, 0 is plain decoding. ``temperature`` 0 is
    greedy, token-identical to plain greedy; otherwise speculative sampling
    keeps the target's distribution exactly.
    """
    options = _options(max_tokens, temperature, top_p, top_k, min_p, seed, draft_tokens)
    ids = encode(model, prompt)
    detok = model.tokenizer.detokenizer if model.tokenizer is not None else None
    if detok is not None:
        detok.reset()
    try:
        for update in decode(model, [ids], options):
            new = update.tokens.get(0, [])
            finish = update.finished.get(0)
            text = None
            if detok is not None:
                for t in new:
                    detok.add_token(t)
                if finish:
                    detok.finalize()
                text = detok.last_segment
            if new or finish:
                yield GenerationChunk(new, text, update.stats[0], finish)
    finally:
        model.save_policy()


def generate(model: SpecModel, prompt: str | list[int], **kwargs) -> GenerationResult:
    """Generate a whole answer; same options as `stream_generate`."""
    tokens, finish, stats = [], None, None
    for chunk in stream_generate(model, prompt, **kwargs):
        tokens += chunk.tokens
        finish, stats = chunk.finish_reason, chunk.stats
    text = model.tokenizer.decode(tokens) if model.tokenizer is not None else None
    return GenerationResult(tokens, text, stats, finish)


def generate_batch(
    model: SpecModel,
    prompts: list[str | list[int]],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    draft_tokens: int | str = "auto",
) -> list[GenerationResult]:
    """Decode several prompts together: one batched draft and verify pass per round."""
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a list of prompts (each a str or a list of token ids), "
                         f"got {type(prompts).__name__}")
    if not prompts:
        raise InputError("prompts is empty")
    options = _options(max_tokens, temperature, top_p, top_k, min_p, seed, draft_tokens)
    ids = [encode(model, p) for p in prompts]
    tokens = [[] for _ in ids]
    finish = [None] * len(ids)
    stats = None
    try:
        for update in decode(model, ids, options):
            for row, new in update.tokens.items():
                tokens[row] += new
            for row, why in update.finished.items():
                finish[row] = why
            stats = update.stats
    finally:
        model.save_policy()
    decode_text = model.tokenizer.decode if model.tokenizer is not None else (lambda t: None)
    return [GenerationResult(t, decode_text(t), s, f) for t, s, f in zip(tokens, stats, finish)]


__all__ = ["GenerationChunk", "GenerationResult", "generate", "generate_batch", "load", "stream_generate"]
