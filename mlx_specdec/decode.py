"""The speculative loop: draft -> verify -> accept -> commit, for a batch of rows.

Rows of one batch share each pass (one batched drafter step, one batched
verify) but keep their own positions, so they accept different numbers of
tokens and leave the batch when they finish. Plain decoding is the k = 0 case
of the same round: verify the last token alone, no drafting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

from .cache import Cache, Step
from .errors import InputError
from .loading import SpecModel
from .models.assistant import Draft, TargetKV
from .policy import K_MAX, Decision, DraftPolicy, fixed_decision
from .sampling import SamplingParams, greedy_accept, make_key, probabilities, sample, speculative_accept

# Calibration times each verify length twice and keeps the second: the first
# pass at a new shape pays one-off allocation (and kernel compilation on Metal).
CALIBRATION_PASSES = 2


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
    # Per draft position i: rounds that reached it (drafts 1..i-1 all accepted), and accepted it.
    reached_by_position: list[int] = field(default_factory=lambda: [0] * K_MAX)
    accepted_by_position: list[int] = field(default_factory=lambda: [0] * K_MAX)
    off_reason: str | None = None  # why the policy last chose not to draft

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """a_i: acceptance of draft position i given all before it were accepted."""
        return [a / r for a, r in zip(self.accepted_by_position, self.reached_by_position) if r]

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
                "decode_seconds", "draft_seconds", "verify_seconds", "off_reason")
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
        if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= K_MAX):
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


def _calibrate(spec: SpecModel, lengths, cache: Cache, pos: list[int], last: mx.array, hidden: mx.array) -> None:
    """Time verify passes of the given lengths, and a drafter step, at this batch size.

    They run on the live cache: what they write lies past each row's position,
    exactly like rejected drafts, so generation is unaffected.
    """
    target, policy, B = spec.target, spec.policy, len(pos)
    for length in lengths:
        tokens = mx.repeat(last[:, None], length, axis=1)
        for _ in range(CALIBRATION_PASSES):
            start = time.perf_counter()
            mx.eval(mx.argmax(target.logits(target(tokens, Step(tuple(pos), length), cache)), axis=-1))
            seconds = time.perf_counter() - start
        policy.record_verify_time(B, length, seconds)
    if spec.drafter is not None:
        kv, position = target_kv(spec, cache), mx.array(pos, dtype=mx.int32)
        for _ in range(CALIBRATION_PASSES):
            start = time.perf_counter()
            mx.eval(spec.drafter(last, hidden, position, kv).greedy_tokens())
            seconds = time.perf_counter() - start
        policy.record_draft_time(B, seconds)


def decode(spec: SpecModel, prompts: list[list[int]], options: Options) -> Iterator[Update]:
    """Generate for every prompt; yields after the prefill and after each round."""
    target, drafter, params, policy = spec.target, spec.drafter, options.sampling, spec.policy
    eos, vocab = spec.eos_token_ids, target.config.vocab_size
    key = make_key(params.seed)
    stats = [Stats(prompt_tokens=len(p)) for p in prompts]

    def pick(logits):  # one token per row from (B, V) logits
        nonlocal key
        if params.greedy:
            return mx.argmax(logits, axis=-1)
        key, sub = mx.random.split(key)
        return sample(probabilities(logits, params), sub)

    def decide(batch: int) -> Decision:
        if drafter is None:
            return Decision(0, "k=0: the model has no drafter")
        if options.draft_tokens != "auto":
            return fixed_decision(options.draft_tokens)
        decision = policy.decide(batch)
        # Calibrate the batch size a request starts with; as rows finish, the
        # smaller batches are estimated from it and refined by their own rounds.
        if decision.calibrate and not calibrated:
            _calibrate(spec, decision.calibrate, cache, pos, last, hidden)
            calibrated.append(batch)
            decision = policy.decide(batch)
        return decision

    calibrated: list[int] = []
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
        decision = decide(len(rows))
        remaining = max(options.max_tokens - emitted[r] for r in rows)
        k = min(decision.k, remaining - 1)
        drafts, qs, tok, h = [], [], last, hidden
        draft_start = time.perf_counter()
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
            for i in range(min(k, n_host[b] + 1)):
                s.reached_by_position[i] += 1
                s.accepted_by_position[i] += int(i < n_host[b])
            if k == 0 and decision.k == 0:
                s.off_reason = decision.reason
            s.draft_seconds += verify_start - draft_start
            s.verify_seconds += verify_end - verify_start
            s.decode_seconds += time.perf_counter() - round_start
        policy.record(len(rows), k, n_host, verify_start - draft_start, verify_end - verify_start,
                      time.perf_counter() - verify_end)


def check_prompt(prompt: list[int], vocab: int) -> list[int]:
    if len(prompt) == 0:
        raise InputError("prompt is empty")
    bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise InputError(f"prompt has token ids outside the vocabulary 0..{vocab - 1}: {bad[:5]}")
    return list(prompt)
