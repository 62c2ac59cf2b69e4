"""The speculative loop: draft -> verify -> accept -> commit, for a batch of rows.

Rows of one batch share each pass (one batched drafter step, one batched
verify) but keep their own positions, so they accept different numbers of
tokens and leave the batch when they finish. Plain decoding is the k = 0 case
of the same round: verify the last token alone, no drafting.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import mlx.core as mx

from . import distributed
from .cache import Cache, Step
from .errors import InputError
from .loading import SpecModel
from .models.assistant import Draft, TargetKV
from .policy import K_MAX, Decision, fixed_decision
from .sampling import SamplingParams, greedy_accept, is_integer, make_key, probabilities, sample, speculative_accept

@dataclass
class Stats:
    """What one row's generation did, and where its time went."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # of the prompt, taken from a kept cache rather than prefilled
    generated_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_seconds: float = 0.0  # timed in the rounds that time the drafter apart, else its measured cost
    verify_seconds: float = 0.0
    k_histogram: dict[int, int] = field(default_factory=dict)
    # Per draft position i: rounds that reached it (drafts 1..i-1 all accepted), and accepted it.
    reached_by_position: list[int] = field(default_factory=lambda: [0] * K_MAX)
    accepted_by_position: list[int] = field(default_factory=lambda: [0] * K_MAX)
    off_reason: str | None = None  # why the policy last chose not to draft
    policy_kept: bool | None = None  # "auto" only: whether its policy was read back from disk

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
        keys = ("prompt_tokens", "reused_tokens", "generated_tokens", "rounds", "drafted", "accepted",
                "prefill_seconds", "decode_seconds", "draft_seconds", "verify_seconds", "off_reason", "policy_kept")
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
        if not is_integer(self.max_tokens) or self.max_tokens < 1:
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


ROUND_KEYS = K_MAX + 2
"""Keys a sampled row splits its key into each round: one per draft step, one for the
acceptance (or the pick after a prefill), and the next round's key."""


class Sampler:
    """Turns logits into tokens for the rows of a batch, each with its own params and PRNG key.

    A row's random numbers come from its own key alone, split the same way every round
    whatever the round's k and whichever rows share it: a seeded request draws the same tokens
    alone or in any batch, given the same draft lengths. Rows whose params agree (seed aside)
    share each call. The keys advance once per round (`accept`) or prefill (`pick`).

    Over a group of processes, rank 0's keys (its seeds, or its draws of them) are every rank's,
    and so are the tokens it picks, drafts and accepts (see distributed.py).
    """

    def __init__(self, params: list[SamplingParams], vocab: int, keys: mx.array | None = None,
                 group: mx.distributed.Group | None = None):
        self.params, self.vocab, self.group = params, vocab, group
        if keys is None:
            keys = distributed.from_rank0(group, mx.stack([make_key(p.seed) for p in params]))
        self.keys = keys  # (B, 2)
        by_params: dict[SamplingParams, list[int]] = {}
        for row, p in enumerate(params):
            by_params.setdefault(replace(p, seed=None), []).append(row)
        # (params, rows, index): index is None when the group is the whole batch in order.
        self.groups = [(p, rows, None if len(rows) == len(params) else mx.array(rows))
                       for p, rows in by_params.items()]
        self._round: mx.array | None = None  # (B, ROUND_KEYS, 2) this round's keys
        self._drafts = 0

    def select(self, keep: list[int]) -> "Sampler":
        return Sampler([self.params[i] for i in keep], self.vocab, self.keys[mx.array(keep)], self.group)

    @staticmethod
    def stack(parts: list["Sampler"]) -> "Sampler":
        if len(parts) == 1:
            return parts[0]
        return Sampler([p for s in parts for p in s.params], parts[0].vocab,
                       mx.concatenate([s.keys for s in parts]), parts[0].group)

    def agreed(self, tokens: mx.array) -> mx.array:
        """Rank 0's tokens on every rank."""
        return distributed.from_rank0(self.group, tokens)

    def _round_keys(self, which: int, index: mx.array | None) -> mx.array:
        if self._round is None:
            self._round = mx.vmap(lambda key: mx.random.split(key, ROUND_KEYS))(self.keys)
        keys = self._round[:, which]
        return keys if index is None else keys[index]

    def _end_round(self) -> None:
        if self._round is not None:
            self.keys = self._round[:, ROUND_KEYS - 1]
        self._round, self._drafts = None, 0

    def _merge(self, parts: list[mx.array]) -> mx.array:
        """Per-group results, (rows of the group, ...) each, back into batch order."""
        if len(parts) == 1:
            return parts[0]
        order = [row for _, rows, _ in self.groups for row in rows]
        return mx.concatenate(parts)[mx.array(sorted(range(len(order)), key=order.__getitem__))]

    def pick(self, logits: mx.array) -> mx.array:
        """One token per row from (B, V) logits."""
        parts = []
        for params, _, index in self.groups:
            x = logits if index is None else logits[index]
            parts.append(mx.argmax(x, axis=-1) if params.greedy else
                         sample(probabilities(x, params), self._round_keys(K_MAX, index)))
        self._end_round()
        return self.agreed(self._merge(parts))

    def draft(self, draft: Draft) -> tuple[mx.array, tuple | None]:
        """The drafter's token per row, and (when some row samples) the distributions q they came
        from: one per group of rows, None for greedy groups."""
        tokens, qs = [], []
        for params, rows, index in self.groups:
            if params.greedy:
                greedy = draft.greedy_tokens()
                tokens.append(greedy if index is None else greedy[index])
                qs.append(None)
                continue
            logits = draft.logits if index is None else draft.logits[index]
            q = probabilities(logits, params)
            if draft.candidates is not None:  # centroid head: q is zero off the scored tokens
                candidates = draft.candidates if index is None else draft.candidates[index]
                q = mx.put_along_axis(mx.zeros((len(rows), self.vocab), q.dtype), candidates, q, axis=-1)
            tokens.append(sample(q, self._round_keys(self._drafts, index)))
            qs.append(q)
        self._drafts += 1
        return self._merge(tokens), (None if all(q is None for q in qs) else tuple(qs))

    def accept(self, logits: mx.array, drafted: mx.array, qs: list[tuple],
               limits: list[int] | None = None) -> tuple[mx.array, mx.array]:
        """(accepted drafts per row, next token per row): the longest agreeing prefix (greedy) or
        rejection sampling against the drafter's q; row r counts only its first limits[r] drafts."""
        k = drafted.shape[1]
        limit = None if limits is None else mx.array(limits)
        ns, nexts = [], []
        for g, (params, rows, index) in enumerate(self.groups):
            x, d = (logits, drafted) if index is None else (logits[index], drafted[index])
            lim = limit if limit is None or index is None else limit[index]
            if params.greedy:
                n, nxt = greedy_accept(mx.argmax(x, axis=-1), d, lim)
            else:
                q = mx.stack([step[g] for step in qs], axis=1) if k else mx.zeros((len(rows), 0, self.vocab))
                n, nxt = speculative_accept(probabilities(x, params), q, d, self._round_keys(K_MAX, index), lim)
            ns.append(n)
            nexts.append(nxt)
        self._end_round()
        n, nxt = self._merge(ns), self._merge(nexts)
        if self.group is None:
            return n, nxt
        both = self.agreed(mx.stack([n.astype(mx.int32), nxt.astype(mx.int32)]))
        return both[0], both[1].astype(nxt.dtype)


@dataclass
class Rows:
    """The active rows between rounds: what a round reads and replaces."""

    ids: list[int]  # the caller's index of each row
    pos: list[int]  # position of each row's last token
    last: mx.array  # (B,) each row's last token, not yet in the cache
    hidden: mx.array  # (B, 1, H) the target hidden state that predicted it
    cache: Cache

    def select(self, keep: list[int]) -> "Rows":
        if keep == list(range(len(self.ids))):
            return self
        idx = mx.array(keep)
        return Rows([self.ids[i] for i in keep], [self.pos[i] for i in keep], self.last[idx],
                    self.hidden[idx], self.cache.select(keep))

    @staticmethod
    def stack(parts: list["Rows"]) -> "Rows":
        """One batch from several (rows joining a live batch)."""
        if len(parts) == 1:
            return parts[0]
        return Rows([i for p in parts for i in p.ids], [x for p in parts for x in p.pos],
                    mx.concatenate([p.last for p in parts]), mx.concatenate([p.hidden for p in parts]),
                    Cache.stack([p.cache for p in parts]))


class Round:
    """What one round did: drafts (B, k), accepted drafts and the next token per row.

    The lists are read from the device on first use, the round's one host sync
    after the verify pass (``read``); ``verify_seconds`` runs from ``started`` (the
    verify pass's launch; the round's, when its drafts were not timed apart and
    ``draft_seconds`` is None), or from ``since`` (the previous round's read, when
    the loop launched this round before reading that one), to that read."""

    def __init__(self, drafted: mx.array, accepted: mx.array, next: mx.array, draft_seconds: float | None,
                 started: float):
        self._arrays = (drafted, accepted, next)
        self.draft_seconds = draft_seconds
        self._started = started
        self._lists: tuple[list, list, list] | None = None
        self._verify_seconds = 0.0

    def read(self, since: float = 0.0) -> "Round":
        if self._lists is None:
            drafted, accepted, next = self._arrays
            mx.eval(drafted, accepted, next)  # one wait, not one per array
            self._lists = (drafted.tolist(), accepted.tolist(), next.tolist())
            self._verify_seconds = time.perf_counter() - max(self._started, since)
        return self

    @property
    def drafted(self) -> list[list[int]]:
        return self.read()._lists[0]

    @property
    def accepted(self) -> list[int]:
        return self.read()._lists[1]

    @property
    def next(self) -> list[int]:
        return self.read()._lists[2]

    @property
    def verify_seconds(self) -> float:
        return self.read()._verify_seconds


def speculative_round(spec: SpecModel, rows: Rows, k: int, sampler: Sampler,
                      limits: list[int] | None = None, time_drafts: bool = False) -> tuple[Rows, Round]:
    """Draft k tokens, verify k + 1 in one target pass, accept: the rows after it, and what happened.
    Row r counts only its first limits[r] drafts (its own draft length; None: all k).

    k must be at most ``rows.cache.max_step - 1`` (the loop clamps it). One host sync, to read
    how many drafts each row accepted: the verify pass is built while the drafts compute. With
    ``time_drafts`` the drafts are waited for first, to time the drafter apart for the policy
    (``Round.draft_seconds``; else None), at the cost of that overlap: the device idles while
    the verify pass is built. A plain round (k = 0) is
    returned unread, its arrays computing in the background (``mx.async_eval``): each
    row's position just advances by one, so a loop can pipeline plain decoding as
    mlx-lm's ``generate_step`` does: launch the next round on the returned rows, then
    read this one (``result.read(since=...)``), and drop rows that finished from the
    rows of the round already launched. Its K/V writes for those rows lie past their
    end, as harmless as rejected drafts.
    """
    start = time.perf_counter()
    drafts, qs = [], []
    if k:
        kv, position = target_kv(spec, rows.cache), mx.array(rows.pos, dtype=mx.int32)
        masks = spec.drafter.masks(position, kv)  # the drafts share position and K/V: one mask
        token, hidden = rows.last, rows.hidden
        for _ in range(k):  # autoregressive, at the fixed position of each row's last token
            draft = spec.drafter(token, hidden, position, kv, masks)
            token, q = sampler.draft(draft)
            drafts.append(token)
            qs += [q] if q is not None else []
            hidden = draft.hidden
        if time_drafts:
            mx.eval(drafts)
        else:
            mx.async_eval(drafts)  # the device drafts while the verify pass is built
    drafted = sampler.agreed(mx.stack(drafts, axis=1)) if k else mx.zeros((len(rows.pos), 0), dtype=mx.int32)
    verify_start = time.perf_counter()

    tokens = mx.concatenate([rows.last[:, None], drafted.astype(rows.last.dtype)], axis=1) if k else rows.last[:, None]
    hiddens = spec.target(tokens, Step(tuple(rows.pos), k + 1), rows.cache)
    n, last = sampler.accept(spec.target.logits(hiddens), drafted, qs, limits)
    # The next draft starts from the hidden state of the last accepted token. The
    # cache needs no edit: rejected entries lie past each row's new position and
    # stay masked until overwritten.
    hidden = mx.take_along_axis(hiddens, n[:, None, None], axis=1) if k else hiddens
    # Everything `read` waits for goes in now: an array left out would be computed only when
    # read, behind the next round launched meanwhile, so reading a pipelined plain round would
    # wait for the whole next one and leave the device idle while its successor is built.
    mx.async_eval(drafted, n, last, hidden)
    result = (Round(drafted, n, last, verify_start - start, verify_start) if time_drafts or not k
              else Round(drafted, n, last, None, start))
    accepted = result.accepted if k else [0] * len(rows.pos)
    return Rows(rows.ids, [p + a + 1 for p, a in zip(rows.pos, accepted)], last, hidden, rows.cache), result


def new_cache(spec: SpecModel, batch_size: int, max_step: int = K_MAX + 1) -> Cache:
    """An empty cache the loop can decode in: steps of up to ``max_step`` tokens (a round's
    k + 1), and sliding rings wide enough for the drafter's window too."""
    window = spec.drafter.sliding_window if spec.drafter else 0
    return spec.target.make_cache(batch_size, max_step=max_step, drafter_window=window)


def row_seed(seed: int | None, row: int) -> int | None:
    """The seed of row ``row`` of a batch given one ``seed``: row 0 keeps it (so a batch's first
    row is what the prompt gives alone), the others get their own, so rows do not repeat."""
    if seed is None or row == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest(), "little")


def decode(spec: SpecModel, prompts: list[list[int]], options: Options,
           cache: Cache | None = None, cached: int = 0) -> Iterator[Update]:
    """Generate for every prompt, on an engine of their own; yields after each engine step.

    With ``cache`` (one prompt, a cache from ``new_cache(spec, 1)``) generation continues a
    cache that already holds the prompt's first ``cached`` tokens and prefills only the rest,
    writing into it in place: how chat keeps one cache across turns.
    """
    from .engine import Engine

    if cache is not None and not (len(prompts) == 1 and 0 <= cached < len(prompts[0])):
        raise ValueError("a kept cache continues exactly one prompt, which must extend past what it holds")
    engine = Engine(spec, max_batch=len(prompts), prefix_cache_tokens=0)
    row_of = {}
    for row, prompt in enumerate(prompts):
        sampling = replace(options.sampling, seed=row_seed(options.sampling.seed, row))
        row_options = replace(options, sampling=sampling)
        row_of[engine.submit(prompt, row_options, cache=cache, cached=cached)] = row
    stats = [Stats(prompt_tokens=len(p)) for p in prompts]
    while engine.has_work:
        update = Update({}, {}, stats)
        for event in engine.step():
            if event.error is not None:
                raise event.error
            row = row_of[event.request_id]
            stats[row] = event.stats
            update.positions[row] = event.position
            if event.tokens:
                update.tokens[row] = event.tokens
            if event.finish_reason:
                update.finished[row] = event.finish_reason
        yield update


def check_prompt(prompt: list[int], vocab: int, positions: int | None = None) -> list[int]:
    """The prompt as a list of ints: each a token id, leaving room in ``positions`` (the
    model's position limit) for at least one new token."""
    if len(prompt) == 0:
        raise InputError("prompt is empty")
    bad = [t for t in prompt if not is_integer(t)]
    if bad:
        raise InputError(f"token ids must be integers, got {', '.join(repr(t) for t in bad[:5])}")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise InputError(f"prompt has token ids outside the vocabulary 0..{vocab - 1}: {bad[:5]}")
    if positions is not None and len(prompt) >= positions:
        raise InputError(f"the prompt is {len(prompt)} tokens, and the model reads at most {positions} positions "
                         "(max_position_embeddings): no room is left for an answer")
    return [int(t) for t in prompt]
