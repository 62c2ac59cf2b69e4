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

from . import distributed
from .cache import Cache, Step
from .errors import InputError
from .loading import SpecModel
from .models.assistant import Draft, TargetKV
from .policy import K_MAX, Decision, fixed_decision
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

    def record_round(self, k: int, accepted: int, decision: Decision, draft_s: float, verify_s: float,
                     total_s: float) -> None:
        self.rounds += 1
        self.drafted += k
        self.accepted += accepted
        self.k_histogram[k] = self.k_histogram.get(k, 0) + 1
        for i in range(min(k, accepted + 1)):
            self.reached_by_position[i] += 1
            self.accepted_by_position[i] += int(i < accepted)
        if decision.k == 0:
            self.off_reason = decision.reason
        self.draft_seconds += draft_s
        self.verify_seconds += verify_s
        self.decode_seconds += total_s

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
    """One round's output: new tokens per row (by the caller's row index), the
    rows that finished, with why ("stop": EOS, "length": max_tokens), and each
    row of the round's position: its cache now holds prompt + output up to there."""

    tokens: dict[int, list[int]]
    finished: dict[int, str]
    stats: list[Stats]
    positions: dict[int, int] = field(default_factory=dict)


def target_kv(spec: SpecModel, cache: Cache) -> dict[str, TargetKV]:
    """The K/V the drafter reads, straight from the cache the verify pass filled."""
    out = {}
    for kind, layer in spec.target.drafter_sources().items():
        table = cache.tables[kind]
        keys, values = cache.layers[layer].state()
        out[kind] = TargetKV(keys[:, :, : table.used], values[:, :, : table.used], table.positions[:, : table.used])
    return out


class Sampler:
    """Turns logits into tokens for one generation, holding its PRNG key explicitly.

    Over a group of processes, rank 0's key (its seed, or its draw of one) is every rank's, and
    the tokens it picks and accepts are every rank's (see distributed.py)."""

    def __init__(self, params: SamplingParams, vocab: int, group: mx.distributed.Group | None = None):
        self.params, self.vocab, self.group = params, vocab, group
        self.key = distributed.from_rank0(group, make_key(params.seed))

    def agreed(self, tokens: mx.array) -> mx.array:
        """Rank 0's tokens on every rank."""
        return distributed.from_rank0(self.group, tokens)

    def _split(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def pick(self, logits: mx.array) -> mx.array:
        """One token per row from (B, V) logits."""
        if self.params.greedy:
            return self.agreed(mx.argmax(logits, axis=-1))
        return self.agreed(sample(probabilities(logits, self.params), self._split()))

    def draft(self, draft: Draft) -> tuple[mx.array, mx.array | None]:
        """The drafter's token per row, and (when sampling) the distribution q it came from."""
        if self.params.greedy:
            return draft.greedy_tokens(), None
        q = probabilities(draft.logits, self.params)
        if draft.candidates is not None:  # centroid head: q is zero off the scored tokens
            q = mx.put_along_axis(mx.zeros((q.shape[0], self.vocab), q.dtype), draft.candidates, q, axis=-1)
        return sample(q, self._split()), q

    def accept(self, logits: mx.array, drafted: mx.array, qs: list[mx.array]) -> tuple[mx.array, mx.array]:
        """(accepted drafts per row, next token per row): the longest agreeing
        prefix (greedy) or rejection sampling against the drafter's q."""
        if self.params.greedy:
            n, last = greedy_accept(mx.argmax(logits, axis=-1), drafted)
        else:
            q = mx.stack(qs, axis=1) if qs else mx.zeros((drafted.shape[0], 0, self.vocab))
            n, last = speculative_accept(probabilities(logits, self.params), q, drafted, self._split())
        if self.group is None:
            return n, last
        both = self.agreed(mx.stack([n.astype(mx.int32), last.astype(mx.int32)]))
        return both[0], both[1].astype(last.dtype)


@dataclass
class Rows:
    """The active rows between rounds: what a round reads and replaces."""

    ids: list[int]  # the caller's index of each row
    pos: list[int]  # position of each row's last token
    last: mx.array  # (B,) each row's last token, not yet in the cache
    hidden: mx.array  # (B, 1, H) the target hidden state that predicted it
    cache: Cache

    def select(self, keep: list[int]) -> "Rows":
        idx = mx.array(keep)
        return Rows([self.ids[i] for i in keep], [self.pos[i] for i in keep], self.last[idx],
                    self.hidden[idx], self.cache.select(keep))


@dataclass
class Round:
    drafted: list[list[int]]  # (B, k) drafts per row
    accepted: list[int]  # per row
    next: list[int]  # per row: the target's correction or bonus token
    draft_seconds: float
    verify_seconds: float


def speculative_round(spec: SpecModel, rows: Rows, k: int, sampler: Sampler) -> tuple[Rows, Round]:
    """Draft k tokens, verify k + 1 in one target pass, accept: the rows after it, and what happened."""
    start = time.perf_counter()
    drafts, qs = [], []
    if k:
        kv, position = target_kv(spec, rows.cache), mx.array(rows.pos, dtype=mx.int32)
        token, hidden = rows.last, rows.hidden
        for _ in range(k):  # autoregressive, at the fixed position of each row's last token
            draft = spec.drafter(token, hidden, position, kv)
            token, q = sampler.draft(draft)
            drafts.append(token)
            qs += [q] if q is not None else []
            hidden = draft.hidden
        mx.eval(drafts)
    drafted = sampler.agreed(mx.stack(drafts, axis=1)) if k else mx.zeros((len(rows.pos), 0), dtype=mx.int32)
    verify_start = time.perf_counter()

    tokens = mx.concatenate([rows.last[:, None], drafted.astype(rows.last.dtype)], axis=1)
    hiddens = spec.target(tokens, Step(tuple(rows.pos), k + 1), rows.cache)
    n, last = sampler.accept(spec.target.logits(hiddens), drafted, qs)
    # The next draft starts from the hidden state of the last accepted token. The
    # cache needs no edit: rejected entries lie past each row's new position and
    # stay masked until overwritten.
    hidden = mx.take_along_axis(hiddens, n[:, None, None], axis=1)
    mx.eval(n, last, hidden)
    accepted = n.tolist()
    after = Rows(rows.ids, [p + a + 1 for p, a in zip(rows.pos, accepted)], last, hidden, rows.cache)
    return after, Round(drafted.tolist(), accepted, last.tolist(), verify_start - start,
                        time.perf_counter() - verify_start)


def new_cache(spec: SpecModel, batch_size: int) -> Cache:
    """An empty cache the loop can decode in: steps of up to K_MAX + 1 tokens, and sliding
    rings wide enough for the drafter's window too."""
    window = spec.drafter.config.sliding_window if spec.drafter else 0
    return spec.target.make_cache(batch_size, max_step=K_MAX + 1, drafter_window=window)


def _prefill(spec: SpecModel, prompts: list[list[int]]) -> tuple[Cache, mx.array]:
    """Prompts of one length share a pass; the batched cache keeps the callers' row order."""
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)
    caches, hiddens, order = [], [], []
    for length, rows in by_length.items():
        cache = new_cache(spec, len(rows))
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


def _extend(spec: SpecModel, cache: Cache, prompt: list[int], cached: int) -> mx.array:
    """Prefill one prompt into a cache that already holds its first ``cached`` tokens."""
    tokens = mx.array([prompt[cached:]])
    hidden = spec.target(tokens, Step((cached,), len(prompt) - cached), cache)[:, -1:]
    mx.eval(hidden, *cache.arrays())
    return hidden


def _calibrate(spec: SpecModel, lengths, rows: "Rows") -> None:
    """Time verify passes of the given lengths, and a drafter step, at this batch size.

    They run on the live cache: what they write lies past each row's position,
    exactly like rejected drafts, so generation is unaffected.
    """
    target, policy, B = spec.target, spec.policy, len(rows.pos)
    cache, pos, last, hidden = rows.cache, rows.pos, rows.last, rows.hidden
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


def decode(spec: SpecModel, prompts: list[list[int]], options: Options,
           cache: Cache | None = None, cached: int = 0) -> Iterator[Update]:
    """Generate for every prompt; yields after the prefill and after each round.

    With ``cache`` (one prompt, a cache from ``new_cache(spec, 1)``)
    generation continues a cache that already holds the prompt's first ``cached`` tokens and
    prefills only the rest: how chat keeps one cache across turns.
    """
    if cache is not None and not (len(prompts) == 1 and 0 <= cached < len(prompts[0])):
        raise ValueError("a kept cache continues exactly one prompt, which must extend past what it holds")
    sampler = Sampler(options.sampling, spec.target.config.vocab_size, spec.group)
    stats = [Stats(prompt_tokens=len(p)) for p in prompts]
    emitted = [0] * len(prompts)

    def decide(rows: Rows, first: bool) -> Decision:
        if spec.drafter is None:
            return Decision(0, "k=0: the model has no drafter")
        if options.draft_tokens != "auto":
            return fixed_decision(options.draft_tokens)
        # Over a group, rank 0's policy decides for all (the others' measured times differ).
        decision = distributed.agree(spec.group, spec.policy.decide(len(rows.ids)))
        # Only the batch size a request starts with is calibrated, in its first round; as rows
        # finish, the smaller batches are estimated from it and refined by their own rounds.
        if decision.calibrate and first:
            _calibrate(spec, decision.calibrate, rows)
            decision = distributed.agree(spec.group, spec.policy.decide(len(rows.ids)))
        return decision

    def emit(update: Update, row: int, tokens: list[int]) -> None:
        for t in tokens:
            if t in spec.eos_token_ids:
                update.finished[row] = "stop"
                return
            update.tokens.setdefault(row, []).append(t)
            emitted[row] += 1
            stats[row].generated_tokens += 1
            if emitted[row] == options.max_tokens:
                update.finished[row] = "length"
                return

    start = time.perf_counter()
    if cache is None:
        cache, hidden = _prefill(spec, prompts)
    else:
        hidden = _extend(spec, cache, prompts[0], cached)
    last = sampler.pick(spec.target.logits(hidden[:, 0]))
    mx.eval(last)
    rows = Rows(list(range(len(prompts))), [len(p) for p in prompts], last, hidden, cache)
    update = Update({}, {}, stats, dict(zip(rows.ids, rows.pos)))
    first = True
    for row, token in zip(rows.ids, last.tolist()):
        stats[row].prefill_seconds = time.perf_counter() - start
        emit(update, row, [token])

    while True:
        yield update
        keep = [i for i, row in enumerate(rows.ids) if row not in update.finished]
        if not keep:
            return
        if len(keep) < len(rows.ids):
            rows = rows.select(keep)
        update = Update({}, {}, stats)
        round_start = time.perf_counter()
        decision = decide(rows, first=first)
        first = False
        # Drafts past max_tokens would be thrown away.
        k = min(decision.k, max(options.max_tokens - emitted[row] for row in rows.ids) - 1)
        batch = len(rows.ids)
        rows, result = speculative_round(spec, rows, k, sampler)
        update.positions = dict(zip(rows.ids, rows.pos))
        for b, row in enumerate(rows.ids):
            n = result.accepted[b]
            emit(update, row, result.drafted[b][:n] + [result.next[b]])
            stats[row].record_round(k, n, decision, result.draft_seconds, result.verify_seconds,
                                    time.perf_counter() - round_start)
        spec.policy.record(batch, k, result.accepted, result.draft_seconds, result.verify_seconds,
                           time.perf_counter() - round_start - result.draft_seconds - result.verify_seconds)


def check_prompt(prompt: list[int], vocab: int) -> list[int]:
    if len(prompt) == 0:
        raise InputError("prompt is empty")
    bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise InputError(f"prompt has token ids outside the vocabulary 0..{vocab - 1}: {bad[:5]}")
    return list(prompt)
