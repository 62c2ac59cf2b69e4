"""The speculative loop: draft -> verify -> accept -> commit, for a batch of rows.

Rows of one batch share each pass (one batched drafter step, one batched
verify) but keep their own positions, so they accept different numbers of
tokens and leave the batch when they finish. Plain decoding is the k = 0 case
of the same round: verify the last token alone, no drafting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx

from .cache import Cache, Step
from .errors import InputError
from .loading import SpecModel
from .models.assistant import Draft, TargetKV
from .sampling import SamplingParams, greedy_accept, make_key, probabilities, sample, speculative_accept

# Longest draft any round may use; bounds the cache's per-step slack.
K_MAX = 8
# Draft length of draft_tokens="auto" until the measured policy decides.
DEFAULT_K = 4


@dataclass
class Stats:
    """What one row's generation did, and where its time went."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    k_histogram: dict[int, int] = field(default_factory=dict)
    drafted_by_position: list[int] = field(default_factory=lambda: [0] * K_MAX)
    accepted_by_position: list[int] = field(default_factory=lambda: [0] * K_MAX)
    policy_reason: str | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_by_position, self.drafted_by_position) if d]

    @property
    def mean_accepted_per_round(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed; like mlx-lm it leaves out the first token, which the prefill produced."""
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def overhead_seconds(self) -> float:
        return max(0.0, self.decode_seconds - self.draft_seconds - self.verify_seconds)

    def as_dict(self) -> dict:
        keys = ("prompt_tokens", "generated_tokens", "rounds", "drafted", "accepted", "prefill_seconds",
                "decode_seconds", "draft_seconds", "verify_seconds", "policy_reason")
        out = {k: getattr(self, k) for k in keys}
        out.update(
            acceptance_rate=self.acceptance_rate,
            acceptance_by_position=self.acceptance_by_position,
            mean_accepted_per_round=self.mean_accepted_per_round,
            tokens_per_second=self.tokens_per_second,
            overhead_seconds=self.overhead_seconds,
            k_histogram=dict(sorted(self.k_histogram.items())),
        )
        return out


@dataclass(frozen=True)
class Options:
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    draft_tokens: int | str = "auto"

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        k = self.draft_tokens
        if k != "auto" and not (isinstance(k, int) and 0 <= k <= K_MAX):
            raise InputError(f"draft_tokens must be 'auto' or an integer in 0..{K_MAX}, got {k!r}")


@dataclass
class Update:
    """One round's output: new tokens per row (by the caller's row index) and
    the rows that finished, with why ("stop": EOS, "length": max_tokens)."""

    tokens: dict[int, list[int]]
    finished: dict[int, str]
    stats: list[Stats]


def target_kv(spec: SpecModel, cache: Cache) -> dict[str, TargetKV]:
    """The K/V the drafter reads, straight from the cache the verify pass filled."""
    out = {}
    for kind, layer in spec.target.drafter_sources().items():
        table = cache.tables[kind]
        keys, values = cache.layers[layer].state()
        out[kind] = TargetKV(keys[:, :, : table.used], values[:, :, : table.used], table.positions[:, : table.used])
    return out


def _draft_distribution(draft: Draft, params: SamplingParams, vocab: int) -> mx.array:
    """The drafter's processed distribution q over the whole vocabulary."""
    q = probabilities(draft.logits, params)
    if draft.candidates is None:
        return q
    return mx.put_along_axis(mx.zeros((q.shape[0], vocab), dtype=q.dtype), draft.candidates, q, axis=-1)


def _prefill(spec: SpecModel, prompts: list[list[int]], max_step: int) -> tuple[Cache, mx.array]:
    """Prompts of one length share a pass; the batched cache keeps the callers' row order."""
    window = spec.drafter.config.sliding_window if spec.drafter else 0
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)
    caches, hiddens, order = [], [], []
    for length, rows in by_length.items():
        cache = spec.target.make_cache(len(rows), max_step=max_step, drafter_window=window)
        tokens = mx.array([prompts[r] for r in rows])
        hidden = spec.target(tokens, Step((0,) * len(rows), length), cache)[:, -1:]
        mx.eval(hidden, *cache.arrays())
        caches.append(cache)
        hiddens.append(hidden)
        order += rows
    cache, hidden = Cache.stack(caches), mx.concatenate(hiddens, axis=0)
    if order != sorted(order):
        where = sorted(range(len(order)), key=order.__getitem__)
        cache, hidden = cache.select(where), hidden[mx.array(where)]
    return cache, hidden


def decode(
    spec: SpecModel,
    prompts: list[list[int]],
    options: Options,
    choose_k: Callable[[int], int] | None = None,
) -> Iterator[Update]:
    """Generate for every prompt; yields after the prefill and after each round."""
    target, drafter, params = spec.target, spec.drafter, options.sampling
    eos, vocab = spec.eos_token_ids, target.config.vocab_size
    fixed_k = DEFAULT_K if options.draft_tokens == "auto" else options.draft_tokens
    choose_k = choose_k or (lambda batch: fixed_k)
    key = make_key(params.seed)
    stats = [Stats(prompt_tokens=len(p)) for p in prompts]

    def pick(logits):  # one token per row from (B, V) logits
        nonlocal key
        if params.greedy:
            return mx.argmax(logits, axis=-1)
        key, sub = mx.random.split(key)
        return sample(probabilities(logits, params), sub)

    start = time.perf_counter()
    cache, hidden = _prefill(spec, prompts, K_MAX + 1)
    last = pick(target.logits(hidden[:, 0]))
    mx.eval(last)
    rows = list(range(len(prompts)))  # caller's index of each active row
    pos = [len(p) for p in prompts]  # position of each row's last token
    emitted = [0] * len(prompts)
    now = time.perf_counter()
    for s in stats:
        s.prefill_seconds = now - start
    update = Update({}, {}, stats)

    def emit(row, tokens):
        for t in tokens:
            if t in eos:
                update.finished[row] = "stop"
                return
            update.tokens.setdefault(row, []).append(t)
            emitted[row] += 1
            stats[row].generated_tokens += 1
            if emitted[row] == options.max_tokens:
                update.finished[row] = "length"
                return

    for b, t in enumerate(last.tolist()):
        emit(rows[b], [t])

    while True:
        keep = [i for i, r in enumerate(rows) if r not in update.finished]
        yield update
        if not keep:
            return
        if len(keep) < len(rows):
            idx = mx.array(keep)
            cache, hidden, last = cache.select(keep), hidden[idx], last[idx]
            rows, pos = [rows[i] for i in keep], [pos[i] for i in keep]
        update = Update({}, {}, stats)
        round_start = time.perf_counter()

        # Draft: k tokens at the fixed position of each row's last token.
        remaining = max(options.max_tokens - emitted[r] for r in rows)
        k = min(choose_k(len(rows)), remaining - 1) if drafter else 0
        drafts, qs, tok, h = [], [], last, hidden
        if k:
            kv, position = target_kv(spec, cache), mx.array(pos, dtype=mx.int32)
            for _ in range(k):
                draft = drafter(tok, h, position, kv)
                if params.greedy:
                    tok = draft.greedy_tokens()
                else:
                    qs.append(_draft_distribution(draft, params, vocab))
                    key, sub = mx.random.split(key)
                    tok = sample(qs[-1], sub)
                drafts.append(tok)
                h = draft.hidden
            mx.eval(drafts)
        drafted = mx.stack(drafts, axis=1) if k else mx.zeros((len(rows), 0), dtype=mx.int32)
        verify_start = time.perf_counter()

        # Verify all k + 1 tokens in one pass; accept; keep the hidden state of
        # the last accepted token for the next draft.
        tokens = mx.concatenate([last[:, None], drafted.astype(last.dtype)], axis=1)
        hiddens = target(tokens, Step(tuple(pos), k + 1), cache)
        logits = target.logits(hiddens)
        if params.greedy:
            n, last = greedy_accept(mx.argmax(logits, axis=-1), drafted)
        else:
            key, sub = mx.random.split(key)
            q = mx.stack(qs, axis=1) if k else mx.zeros((len(rows), 0, vocab))
            n, last = speculative_accept(probabilities(logits, params), q, drafted, sub)
        hidden = mx.take_along_axis(hiddens, n[:, None, None], axis=1)
        mx.eval(n, last, hidden)
        verify_end = time.perf_counter()

        # Commit: the cache needs no edit (rejected entries lie past each row's
        # position and are masked until overwritten).
        n_host, last_host, drafted_host = n.tolist(), last.tolist(), drafted.tolist()
        for b, row in enumerate(rows):
            pos[b] += n_host[b] + 1
            emit(row, drafted_host[b][: n_host[b]] + [last_host[b]])
            s = stats[row]
            s.rounds += 1
            s.drafted += k
            s.accepted += n_host[b]
            s.k_histogram[k] = s.k_histogram.get(k, 0) + 1
            for i in range(k):
                s.drafted_by_position[i] += 1
                s.accepted_by_position[i] += int(i < n_host[b])
            s.draft_seconds += verify_start - round_start
            s.verify_seconds += verify_end - verify_start
            s.decode_seconds += time.perf_counter() - round_start


def check_prompt(prompt: list[int], vocab: int) -> list[int]:
    if len(prompt) == 0:
        raise InputError("prompt is empty")
    bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise InputError(f"prompt has token ids outside the vocabulary 0..{vocab - 1}: {bad[:5]}")
    return list(prompt)
