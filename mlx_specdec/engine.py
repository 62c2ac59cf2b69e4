"""The engine: one live batch that requests join and leave between speculative rounds.

Every front end (the Python API, chat, bench, the HTTP server) submits requests here and reads
their tokens back as `Event`s. One `step` is: admit waiting requests, run one round
(`decode.speculative_round`) for the live batch, retire the rows that finished or were
cancelled. Reading order: `Engine.step`, then `_admit`, `_round` (with `_decide`, `_launch`),
`_retire`. Plain rounds pipeline across steps: the next one is launched before the last is read.

Admission. A request's prompt is prefilled into its own cache, in chunks of at most
`prefill_step_size` tokens, and while other rows are live a step stops prefilling once that
many tokens ran: a long prompt stalls the live batch for about one chunk per round, never for
its whole prefill. The prefilled row then joins the batch (`Rows.stack`). Admission stops at `max_batch` rows and
at the K/V memory the live rows could grow to (`kv_memory_bytes`).

Prefix reuse. When a row leaves, its cache goes into a bounded LRU store of single-row caches
(`PrefixStore`), keyed by the tokens it holds. A new prompt that shares a prefix with one of them
(a continued conversation, a shared system prompt) starts from a copy of that cache and prefills
only what is new. Caches are addressed by position (cache.py), so a kept prefix is valid as far
as it goes; sliding-window layers hold a ring of recent positions only, so `reusable` checks the
ring still holds the window the first new token looks back to. A finished row's ring has moved
past the point where the next prompt branches off (a shared system prompt ends well before the
first answer does), so a prompt that shares at least `BRANCH_MIN_TOKENS` more tokens with an
entry than it can reuse splits its prefill there and stores a copy of its cache at that point:
from the next request on, the shared part is reused.

Exactness. A row's tokens do not depend on its batch: greedy rows are token-identical to
generating alone; sampled rows draw from their own PRNG key (`decode.Sampler`), so a seeded
request gives the same tokens alone or batched, given the same draft lengths.

Draft length. `_decide` is the one place a round's k is decided. Rows asking for "auto" share
the policy's k for the live batch size; a row with a fixed draft_tokens drafts exactly its own k
(0 = plain). The round drafts the largest of them and each row counts only its own (a row's
`limit`), so a fixed-k or seeded request behaves exactly as it would alone, at the cost of
verifying the longest row's drafts for all rows.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from . import distributed
from .cache import GROW_STEP, Cache, Step
from .decode import Options, Round, Rows, Sampler, Stats, check_prompt, new_cache, speculative_round
from .errors import InputError
from .loading import SpecModel
from .policy import K_MAX, Decision, finishing_loss, finishing_spread, fixed_decision, token_variance

PREFIX_CACHE_TOKENS = 32_768
"""Positions the prefix store may hold, all entries together (each entry counted by the slots its
tables hold, rings included): a few long conversations or many shared system prompts, at a
memory cost of this many tokens of K/V."""

BRANCH_MIN_TOKENS = 64
"""Shortest shared prefix worth a branch-point entry in the prefix store (see the module
docstring): long enough for a system prompt, far longer than the chat template's few header
tokens that every conversation shares."""

KV_MEMORY_FRACTION = 0.5
"""Share of the memory the loaded weights leave that live rows' K/V may claim by default: the
rest is for activations, the prefix store and everything else in the process."""


@dataclass
class Event:
    """What one step did for one request: tokens new since its last event, and why it ended."""

    request_id: int
    tokens: list[int]
    finish_reason: str | None  # "stop" (EOS), "length" (max_tokens), "cancelled", "error"
    stats: Stats  # a snapshot, safe to read from any thread
    position: int = 0  # the request's cache holds prompt + output up to this position
    error: Exception | None = None  # with finish_reason "error": what the model raised


@dataclass
class _Admission:
    """Requests being prefilled together into one cache (rows in the requests' order)."""

    requests: list["_Request"]
    cache: Cache
    prefilled: int  # prompt tokens the cache holds, every row alike
    rows: Rows | None = None  # once prefilled: the rows that join the batch
    sampler: Sampler | None = None
    branch: int = 0  # a prefill boundary where the first row's cache is kept in the prefix store (0: none)

    def __post_init__(self):
        self.reused = self.prefilled
        self.length = len(self.requests[0].prompt)


@dataclass
class _Launch:
    """A round launched on the device, read in this step or (a plain round) the next."""

    ids: list[int]  # the rows it runs on
    result: Round
    k: int
    limits: list[int]  # each row's own draft length
    decisions: list[Decision]
    start: float
    context: int  # tokens in its longest row when launched: what its passes attend over
    seconds: float | None = None  # from the last read (its launch, after a prefill pass) to its read


@dataclass
class _Static:
    """A static batch being decoded: rows that joined an empty batch together, each with as many
    tokens to go, and that nothing has joined since (DraftPolicy.record_finish)."""

    rows: int
    seconds: float = 0.0  # its rounds' times so far, read to read
    tokens: int = 0  # emitted by those rounds
    first: tuple[float, int] | None = None  # (seconds, tokens) through the round its first row finished in
    full: int = 0  # rounds with every row
    drafting: int = 0  # of those, rounds that drafted
    variance: float = 0.0  # through the first row's finish: the rounds' variances of the tokens each row took


@dataclass
class _Request:
    id: int
    prompt: list[int]
    options: Options
    stats: Stats
    submitted: float
    cache: Cache | None = None  # a cache the caller keeps and this request continues
    prefilled: int = 0  # prompt tokens that cache holds
    seq: list[int] = field(default_factory=list)  # prompt + every token committed; the cache holds all but the last
    emitted: int = 0
    finish: str | None = None

    def budget(self, positions: int) -> int:
        """Tokens it may emit: max_tokens, and prompt and answer never pass the model's positions
        (an answer that reaches them ends there, as at max_tokens: "length")."""
        return min(self.options.max_tokens, positions - len(self.prompt))


def reusable(spec: SpecModel, cache: Cache, held: list[int], prompt: list[int]) -> int:
    """How many leading tokens of ``prompt`` a single-row cache holding ``held`` can keep (0: none).

    The last prompt token always runs (its hidden state predicts the first new token), and
    every sliding-window ring must still hold the positions a query at the first new token
    looks back to: a ring keeps only its latest positions, so a rewind further back than it
    holds cannot continue from it."""
    n = min(_common_prefix(held, prompt), len(prompt) - 1)
    if n <= 0:
        return 0
    window = spec.target.lookback(spec.drafter.sliding_window if spec.drafter is not None else 0)
    needed = np.arange(max(0, n - window), n)
    for table in cache.tables.values():
        if table.ring and not np.isin(needed, np.array(table.positions[0])).all():
            return 0
    return n


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


class PrefixStore:
    """Single-row caches of earlier requests by the tokens they hold; least recently used out first.

    Bounded by `max_tokens` positions over all entries, each counted by the slots its tables
    hold (its sliding rings and its full-attention capacity), so it bounds memory, not only
    prompt length."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[list[int], Cache, int]] = OrderedDict()
        self._ids = itertools.count()
        self.size = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], cache: Cache) -> None:
        size = sum(t.capacity for t in cache.tables.values())
        if not tokens or size > self.max_tokens:
            return
        for key, (held, _, old) in list(self._entries.items()):
            if held == tokens:  # the same tokens again: keep the newer copy only
                del self._entries[key]
                self.size -= old
        self._entries[next(self._ids)] = (tokens, cache, size)
        self.size += size
        while self.size > self.max_tokens:
            _, (_, _, old) = self._entries.popitem(last=False)
            self.size -= old

    def longest(self, spec: SpecModel, prompt: list[int]) -> tuple[int, int | None]:
        """The longest reusable prefix of ``prompt`` over the entries, and its entry (None: none)."""
        best, best_key = 0, None
        for key, (held, cache, _) in self._entries.items():
            n = reusable(spec, cache, held, prompt)
            if n > best:
                best, best_key = n, key
        return best, best_key

    def shared(self, prompt: list[int]) -> int:
        """The longest prefix of ``prompt`` (less its last token) that any entry's tokens share,
        whether or not its cache can still continue from there."""
        return max((min(_common_prefix(held, prompt), len(prompt) - 1) for held, _, _ in self._entries.values()),
                   default=0)

    def take(self, spec: SpecModel, prompt: list[int]) -> tuple[int, Cache | None]:
        """The longest reusable prefix of ``prompt`` and a copy of the cache holding it (0, None: none)."""
        n, key = self.longest(spec, prompt)
        if key is None:
            return 0, None
        self._entries.move_to_end(key)
        self.hits += 1
        self.reused_tokens += n
        # A copy: the entry stays valid for the next request that shares it.
        return n, self._entries[key][1].select([0])


@dataclass(frozen=True)
class _KVSize:
    """K/V bytes per row: per position of full attention, and the fixed sliding rings."""

    per_position: float
    per_row: int

    @classmethod
    def of(cls, cache: Cache) -> "_KVSize":
        rows = cache.batch_size
        per_position, per_row = 0.0, 0
        for layer in cache.layers:
            if layer.keys is None:
                continue
            nbytes = layer.keys.nbytes + layer.values.nbytes
            if layer.table.ring:
                per_row += nbytes // rows
            else:
                per_position += nbytes / rows / max(layer.table.capacity, 1)
        return cls(per_position, per_row)

    @staticmethod
    def reach(prompt_tokens: int, max_tokens: int) -> int:
        """Positions a row could reach: prompt, max_tokens and a last round's drafts."""
        return prompt_tokens + max_tokens + K_MAX + 1

    @staticmethod
    def longest(request: _Request) -> int:
        return _KVSize.reach(len(request.prompt), request.options.max_tokens)

    def rows(self, count: int, longest: int) -> float:
        """What ``count`` rows could grow to when the longest could reach ``longest`` positions:
        rows of one batch share the full-attention capacity."""
        positions = -(-longest // GROW_STEP) * GROW_STEP
        return count * (self.per_row + self.per_position * positions)

    def batch(self, requests: list[_Request]) -> float:
        return self.rows(len(requests), max(map(self.longest, requests))) if requests else 0.0


def device_memory() -> int:
    """Bytes of memory the device has: Metal's recommended working set, else physical RAM."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Engine:
    """One live batch of requests, advanced one speculative round per `step`.

    `submit` and `cancel` may be called from any thread; `step` only from the one thread
    that runs the model (the engine thread)."""

    def __init__(self, spec: SpecModel, *, max_batch: int = 8, prefill_step_size: int = 512,
                 prefix_cache_tokens: int = PREFIX_CACHE_TOKENS, kv_memory_bytes: int | None = None,
                 branch_min_tokens: int = BRANCH_MIN_TOKENS):
        for name, value, least in (("max_batch", max_batch, 1), ("prefill_step_size", prefill_step_size, 1),
                                   ("prefix_cache_tokens", prefix_cache_tokens, 0),
                                   ("branch_min_tokens", branch_min_tokens, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
        self.spec = spec
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self.kv_memory_bytes = (int(KV_MEMORY_FRACTION * max(0, device_memory() - mx.get_active_memory()))
                                if kv_memory_bytes is None else kv_memory_bytes)
        if spec.group is not None:  # admission must be the same on every rank: rank 0's bound, in MiB
            mib = distributed.from_rank0(spec.group, mx.array([self.kv_memory_bytes >> 20], dtype=mx.int32))
            self.kv_memory_bytes = mib.item() << 20
        self.prefixes = PrefixStore(prefix_cache_tokens)
        self.branch_min_tokens = branch_min_tokens
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._cancelled: set[int] = set()
        self._open: set[int] = set()  # submitted, not yet finished
        self._admitting: _Admission | None = None  # a prefill that continues next step
        self._joining: list[_Admission] = []  # prefilled this step, not yet in the batch
        self._ahead: _Launch | None = None  # a plain round launched, to be read next step
        # When the last round was read; 0 after a prefill pass. Rounds are timed from it, so each
        # round is charged with the engine's (and its caller's) work between two rounds.
        self._read_done = 0.0
        self._live: dict[int, _Request] = {}
        self._static: _Static | None = None  # the live rows, while they are a static batch
        self._rows: Rows | None = None
        self._sampler: Sampler | None = None
        self._kv: _KVSize | None = None  # measured from the first prefilled cache
        # Metrics, over the engine's life.
        self._tokens_generated = 0
        self._finished = 0
        self._rounds = 0
        self._row_rounds = 0  # rows summed over rounds: over rounds, the mean batch size
        self._reached = [0] * K_MAX
        self._accepted = [0] * K_MAX
        self._last_k = 0
        self._off_reason: str | None = None
        self._batch_size = 0  # live rows and the K/V they could grow to, as of the last step
        self._kv_reserved = 0

    # -- any thread ---------------------------------------------------------------------------

    def submit(self, prompt: list[int], options: Options, *, cache: Cache | None = None, cached: int = 0) -> int:
        """Queue a request; returns its id. With ``cache`` (single-row, from ``decode.new_cache``)
        it continues that cache, which holds the prompt's first ``cached`` tokens, and writes
        into it in place as long as it is the only live row (how a caller keeps its own cache)."""
        prompt = self.check(prompt, options)
        if cache is not None and not (cache.batch_size == 1 and 0 <= cached < len(prompt)):
            raise ValueError("a kept cache holds one row and must end before the prompt does")
        auto = options.draft_tokens == "auto" and self.spec.drafter is not None
        stats = Stats(prompt_tokens=len(prompt), policy_kept=self.spec.policy.kept if auto else None)
        request = _Request(-1, prompt, options, stats, time.perf_counter(),
                           cache=cache, prefilled=cached if cache is not None else 0, seq=list(prompt))
        with self._lock:
            request.id = next(self._ids)
            self._open.add(request.id)
            self._waiting.append(request)
        return request.id

    def check(self, prompt: list[int], options: Options) -> list[int]:
        """The prompt as `submit` takes it, or the InputError `submit` would raise (a caller that
        submits later, such as the server's engine thread, refuses bad requests up front)."""
        if not isinstance(options, Options):
            raise InputError(f"options must be decode.Options, got {type(options).__name__}")
        positions = self.spec.target.config.max_position_embeddings
        prompt = check_prompt(list(prompt), self.spec.target.config.vocab_size, positions)
        kv, longest = self._kv, _KVSize.reach(len(prompt), options.max_tokens)
        if kv is not None and kv.rows(1, longest) > self.kv_memory_bytes:
            raise InputError(f"this request could need {kv.rows(1, longest) / 2**30:.2f} GiB of K/V "
                             f"(prompt {len(prompt)} + max_tokens {options.max_tokens}), more than the "
                             f"engine's bound of {self.kv_memory_bytes / 2**30:.2f} GiB")
        return prompt

    def cancel(self, request_id: int) -> None:
        """Stop a request: it leaves by the next round with finish_reason "cancelled"."""
        with self._lock:
            if request_id in self._open:
                self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._open)

    def metrics(self) -> dict:
        """Counters for monitoring; safe to call from any thread (step updates them as it goes)."""
        with self._lock:
            waiting = len(self._waiting)
        admitting = self._admitting
        return {
            "batch_size": self._batch_size,
            "max_batch": self.max_batch,
            "queue_depth": waiting + (len(admitting.requests) if admitting is not None else 0),
            "tokens_generated": self._tokens_generated,
            "requests_finished": self._finished,
            "rounds": self._rounds,
            "row_rounds": self._row_rounds,
            "acceptance_by_position": [a / r if r else None for a, r in zip(list(self._accepted), list(self._reached))],
            "draft_k": self._last_k,
            "off_reason": self._off_reason,
            "prefix_cache_entries": len(self.prefixes),
            "prefix_cache_tokens": self.prefixes.size,
            "prefix_cache_hits": self.prefixes.hits,
            "prefix_reused_tokens": self.prefixes.reused_tokens,
            "kv_reserved_bytes": self._kv_reserved,
            "kv_memory_bytes": self.kv_memory_bytes,
        }

    # -- the engine thread --------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit, run one round for the live batch, retire: the events of every request touched."""
        events: dict[int, Event] = {}
        try:
            self._drop_cancelled(events)
            # Read the round in flight first, so the prefill is not timed as part of it; only when a
            # prefill can run: a batch without room (rows or K/V memory) leaves its queue waiting,
            # and reading then would stop plain rounds pipelining for as long as it is full.
            if self._ahead is not None and self._admissible():
                self._read(self._ahead)
            joined = self._admit(events)
            # A batch that only just joined returns its first tokens (the prefill's) at once.
            if self._live and len(joined) < len(self._live):
                self._round(events)
        except Exception as error:  # noqa: BLE001 - the requests it hit end with it; the engine goes on
            self._fail(events, error)
        live = list(self._live.values())
        self._batch_size = len(live)
        self._kv_reserved = int(self._kv.batch(live)) if self._kv is not None else 0
        return list(events.values())

    def _fail(self, events: dict[int, Event], error: Exception) -> None:
        """A pass raised: every request in the batch or being admitted ends with finish_reason
        "error" and the exception on its event (their caches may be half written); the queue
        and the prefix store are untouched, so the engine serves the next requests."""
        failed = list(self._live.values()) + [r for g in self._joining for r in g.requests]
        failed += self._admitting.requests if self._admitting is not None else []
        self._live, self._rows, self._sampler, self._ahead = {}, None, None, None
        self._admitting, self._joining, self._static = None, [], None
        for request in failed:
            if request.finish is None:
                request.finish = "error"
                self._close(events, request)
                events[request.id].error = error

    def _event(self, events: dict[int, Event], request: _Request, tokens: list[int]) -> None:
        s = request.stats
        snapshot = replace(s, k_histogram=dict(s.k_histogram), reached_by_position=list(s.reached_by_position),
                           accepted_by_position=list(s.accepted_by_position))
        # The cache holds all committed tokens but the last; before the prefill, what it was given.
        position = len(request.seq) - 1 if len(request.seq) > len(request.prompt) else request.prefilled
        if request.id in events:
            event = events[request.id]
            event.tokens += tokens
            event.finish_reason, event.stats, event.position = request.finish, snapshot, position
        else:
            events[request.id] = Event(request.id, list(tokens), request.finish, snapshot, position)

    def _emit(self, events: dict[int, Event], request: _Request, tokens: list[int]) -> None:
        """Pass on committed tokens up to EOS (not emitted) or max_tokens."""
        request.seq += tokens
        new = []
        for t in tokens:
            if t in self.spec.eos_token_ids:
                request.finish = "stop"
                break
            new.append(t)
            request.emitted += 1
            if request.emitted == request.budget(self.spec.target.config.max_position_embeddings):
                request.finish = "length"
                break
        request.stats.generated_tokens += len(new)
        self._tokens_generated += len(new)
        self._event(events, request, new)

    def _drop_cancelled(self, events: dict[int, Event]) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            dropped = [r for r in self._waiting if r.id in cancelled]
            self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
        group = self._admitting
        if group is not None and any(r.id in cancelled for r in group.requests):
            # The rest of its prefill group starts again from the queue's head.
            self._admitting = None
            with self._lock:
                self._waiting.extendleft(reversed([r for r in group.requests if r.id not in cancelled]))
            dropped += [r for r in group.requests if r.id in cancelled]
        for request in dropped:
            request.finish = "cancelled"
            self._close(events, request)
        live = [r for r in self._live.values() if r.id in cancelled]
        for request in live:
            request.finish = "cancelled"
        if live:
            self._static = None
        self._retire(events, live)

    def _close(self, events: dict[int, Event], request: _Request) -> None:
        self._event(events, request, [])
        self._finished += 1
        with self._lock:
            self._open.discard(request.id)

    # -- admission

    def _admit(self, events: dict[int, Event]) -> list[int]:
        """Prefill waiting requests, a chunk at a time, and add them to the batch once prefilled.

        With rows live, prefill passes stop once prefill_step_size prompt tokens ran this step;
        with none, no one is waiting on a round, so the batch fills up first. Prompts of one
        length starting from nothing share their prefill passes."""
        budget = self.prefill_step_size if self._live else None
        joining = self._joining = []
        while budget is None or budget > 0:
            group = self._admitting
            if group is None:
                room = self.max_batch - len(self._live) - sum(len(g.requests) for g in joining)
                group = self._take([r for g in joining for r in g.requests], room, budget)
                if group is None:
                    break
            # Chunks start at the same positions whatever else runs, so a prompt's prefill
            # passes are the same alone or not; a step may overrun its budget by under a chunk.
            n = min(group.length - group.prefilled, self.prefill_step_size)
            if group.prefilled < group.branch:
                n = min(n, group.branch - group.prefilled)
            self._admitting = group  # taken from the queue: a failing pass must end its requests too
            hidden = self._prefill(group, n)
            if group.prefilled == group.branch:  # a copy: the group's cache goes on filling
                self.prefixes.put(group.requests[0].prompt[: group.branch], group.cache.select([0]))
            if budget is not None:
                budget -= n * len(group.requests)
            if group.prefilled < group.length:
                continue
            self._admitting = None
            self._first_tokens(events, group, hidden)
            if group.requests:
                joining.append(group)
        if joining:
            joined = [r for g in joining for r in g.requests]
            positions = self.spec.target.config.max_position_embeddings
            alike = self._rows is None and len({r.budget(positions) - r.emitted for r in joined}) == 1
            self._static = _Static(len(joined)) if alike and len(joined) > 1 else None
            parts = ([] if self._rows is None else [self._rows]) + [g.rows for g in joining]
            samplers = ([] if self._sampler is None else [self._sampler]) + [g.sampler for g in joining]
            self._rows, self._sampler = Rows.stack(parts), Sampler.stack(samplers)
            for group in joining:
                self._live.update((r.id, r) for r in group.requests)
        self._joining = []
        return [r.id for g in joining for r in g.requests]

    def _admissible(self) -> bool:
        """Whether `_admit` would prefill this step: a prefill under way, or a waiting request
        with room for it in the batch and, as `_take` judges it, in K/V memory."""
        if self._admitting is not None:
            return True
        with self._lock:
            head = self._waiting[0] if self._waiting else None
        if head is None or len(self._live) >= self.max_batch:
            return False
        return head.cache is not None or self._kv_admits(list(self._live.values()), head)

    def _kv_admits(self, rows: list[_Request], request: _Request) -> bool:
        """Whether ``request`` fits the K/V bound beside ``rows`` (live, joining, or taken with it),
        each able to grow to the longest reach among them. Alone it always does; beside others,
        not before a first prefill has measured K/V sizes (until then one request goes alone)."""
        if not rows:
            return True
        longest = max(map(_KVSize.longest, rows + [request]))
        return self._kv is not None and self._kv.rows(len(rows) + 1, longest) <= self.kv_memory_bytes

    def _take(self, joining: list[_Request], room: int, budget: int | None) -> "_Admission | None":
        """The next waiting request, with the cache it starts from, and the waiting requests just
        behind it that can share its prefill (same length, nothing to reuse, within the step's
        token budget); None: none waiting, or no room for its K/V. Only this thread removes
        from the queue, so its head stays put between looking and taking."""
        live = list(self._live.values()) + joining
        group: list[_Request] = []
        while len(group) < room:
            with self._lock:
                request = self._waiting[0] if self._waiting else None
            if request is None:
                break
            if request.cache is not None:  # it continues a cache of its own: alone
                if group:
                    break
                self._pop()
                return _Admission([request], request.cache, request.prefilled)
            if group:
                if len(request.prompt) != len(group[0].prompt):
                    break  # only prompts of one length share a prefill
                chunk = min(len(request.prompt), self.prefill_step_size)
                if budget is not None and (len(group) + 1) * chunk > budget:
                    break
            if not self._kv_admits(live + group, request):
                break
            if group and self.prefixes.longest(self.spec, request.prompt)[1] is not None:
                break  # it has a prefix to reuse: it goes alone, next
            self._pop()
            group.append(request)
            if len(group) == 1:
                reused, cache = self.prefixes.take(self.spec, request.prompt)
                if cache is not None:
                    return self._branching(_Admission(group, cache, reused))
        if not group:
            return None
        return self._branching(_Admission(group, new_cache(self.spec, len(group)), 0))

    def _branching(self, group: "_Admission") -> "_Admission":
        """Mark where the group's first prompt branches off a stored entry further than it could
        reuse, when that is worth an entry of its own (see the module docstring)."""
        if self.prefixes.max_tokens:
            shared = self.prefixes.shared(group.requests[0].prompt)
            if shared - group.prefilled >= self.branch_min_tokens:
                group.branch = shared
        return group

    def _pop(self) -> None:
        with self._lock:
            self._waiting.popleft()

    def _prefill(self, group: "_Admission", n: int) -> mx.array | None:
        """Run the next ``n`` prompt tokens into the group's cache; the hidden state of the
        prompt's last token once the chunk ends the prompt (None before).

        Only the K/V of a chunk is evaluated, as mlx-lm's prefill does: MLX then never computes
        what nothing reads (the last layer past its K/V projections, and every KV-shared layer).
        The prompt's last token runs alone for the one hidden state the first token needs."""
        start, rows = group.prefilled, len(group.requests)
        last = start + n == group.length
        ahead = n - 1 if last else n
        if ahead:
            tokens = mx.array([r.prompt[start : start + ahead] for r in group.requests])
            self.spec.target(tokens, Step((start,) * rows, ahead), group.cache)
        hidden = None
        if last:
            tokens = mx.array([r.prompt[start + ahead : start + n] for r in group.requests])
            hidden = self.spec.target(tokens, Step((start + ahead,) * rows, 1), group.cache)
        mx.eval(*([] if hidden is None else [hidden]), *group.cache.arrays())
        group.prefilled += n
        self._read_done = 0.0  # the next round is timed from its own launch, not across this pass
        if self._kv is None:
            kv = _KVSize.of(group.cache)
            if self.spec.group is not None:
                # Each rank's cache holds its own K/V heads, so its sizes are its own; admission
                # must be the same on every rank: rank 0's sizes (as its memory bound above).
                shared = distributed.from_rank0(self.spec.group,
                                                mx.array([kv.per_position, kv.per_row], dtype=mx.float32))
                per_position, per_row = shared.tolist()
                kv = _KVSize(per_position, int(per_row))
            self._kv = kv  # once, whole: `check` reads it from other threads
        return hidden

    def _first_tokens(self, events: dict[int, Event], group: "_Admission", hidden: mx.array) -> None:
        """Each prefilled request's first token, from the prefill; the group keeps the rows that
        token did not already end, ready to join the batch."""
        requests = group.requests
        sampler = Sampler([r.options.sampling for r in requests], self.spec.target.config.vocab_size,
                          group=self.spec.group)
        first = sampler.pick(self.spec.target.logits(hidden[:, 0]))
        mx.eval(first)
        now = time.perf_counter()
        position = group.length
        for request, token in zip(requests, first.tolist()):
            request.stats.prefill_seconds = now - request.submitted
            request.stats.reused_tokens = group.reused
            self._emit(events, request, [token])
        rows = Rows([r.id for r in requests], [position] * len(requests), first, hidden, group.cache)
        keep = [b for b, r in enumerate(requests) if r.finish is None]
        for b, request in enumerate(requests):
            if request.finish is not None:
                self._store(request, rows, b)
                self._close(events, request)
        group.requests = [requests[b] for b in keep]
        if keep:
            group.rows, group.sampler = rows.select(keep), sampler.select(keep)

    # -- a round

    def _decide(self, rows: Rows, requests: list[_Request], pending: int) -> tuple[int, list[int], list[Decision]]:
        """The round's draft length k, each row's own (at most k), and the decision behind it.

        The one place a round's k is decided (every rank of a sharded run must take the same):
        rows asking for "auto" share the policy's k for this batch size; fixed rows draft their own k;
        no row drafts past its max_tokens (less the ``pending`` token of a plain round in flight)."""
        spec, B = self.spec, len(requests)
        if spec.drafter is None:
            decisions = [Decision(0, "k=0: the model has no drafter")] * B
        else:
            auto = None
            if any(r.options.draft_tokens == "auto" for r in requests):
                with self._lock:
                    static = self._static is not None and not self._waiting  # no request to take a row's place
                # Over a group, rank 0's policy decides for all (each rank measures its own times).
                auto = distributed.agree(spec.group, spec.policy.decide(B, static=static))
            decisions = [auto if r.options.draft_tokens == "auto" else fixed_decision(r.options.draft_tokens)
                         for r in requests]
        # The cache's rings bound k whatever the policy says.
        cap = min(K_MAX, rows.cache.max_step - 1)
        positions = spec.target.config.max_position_embeddings
        limits = [max(0, min(d.k, r.budget(positions) - r.emitted - pending - 1, cap))
                  for d, r in zip(decisions, requests)]
        return max(limits), limits, decisions

    def _launch(self, before: "_Launch | None" = None) -> "_Launch":
        """Start a round on the live rows, which become the rows after it. ``before``: a plain
        round launched and not yet read (this one is launched ahead of reading it)."""
        rows = self._rows
        requests = [self._live[i] for i in rows.ids]
        start = time.perf_counter()
        k, limits, decisions = self._decide(rows, requests, pending=before is not None)
        if k and before is not None:
            self._read(before)  # time the plain round alone, and the drafting round from its launch
        self._rows, result = speculative_round(self.spec, rows, k, self._sampler,
                                               None if all(n == k for n in limits) else limits,
                                               time_drafts=self.spec.policy.draft_timing_due(len(requests)))
        return _Launch(list(rows.ids), result, k, limits, decisions, start, max(rows.pos) + 1)

    def _read(self, launch: "_Launch") -> None:
        """Wait for a launched round's results (once), timing it from the last read, or from its
        launch when a prefill pass ran since: read to read, whether the round was launched ahead
        (plain) or after that read (drafting), so both pay the work between rounds alike."""
        if launch.seconds is None:
            launch.result.read(since=self._read_done)
            now = time.perf_counter()
            launch.seconds = now - (self._read_done or launch.start)
            self._read_done = now

    def _round(self, events: dict[int, Event]) -> None:
        """Read one round, launched now or ahead in the last step, and pass on its tokens.

        A plain round (k = 0) moves every row by exactly one position, so the next round is
        launched on its rows before reading it, as mlx-lm's generate_step pipelines plain
        decoding; rows that finish meanwhile are dropped from the one in flight (its writes lie
        past their end, like rejected drafts). Sampled rows pipeline too: each draws from its
        own key."""
        ahead = self._ahead is not None and self._ahead.seconds is None  # launched last step, not read
        current, self._ahead = self._ahead or self._launch(), None
        positions = self.spec.target.config.max_position_embeddings
        if current.k == 0 and any(r.budget(positions) - r.emitted > 1 for r in self._live.values()):
            self._ahead = self._launch(before=current)
        # Only a plain round with plain rounds launched ahead on both sides times plain decoding.
        steady = ahead and self._ahead is not None and self._ahead.k == 0
        self._read(current)
        result, seconds = current.result, current.seconds
        requests = [self._live.get(i) for i in current.ids]  # None: it left while the round ran
        present = [r for r in requests if r is not None]
        before = [r.emitted for r in present] if self._static is not None else []  # see _time_static
        # A round that did not time its drafts apart (see DraftPolicy.draft_timing_due) is split
        # for the stats at the drafter's measured cost; the policy takes that cost off itself.
        drafting = result.draft_seconds
        if drafting is None:
            drafting = min(self.spec.policy.drafting_seconds(len(current.ids), current.k) or 0.0,
                           result.verify_seconds)
        verifying = result.verify_seconds - (drafting if result.draft_seconds is None else 0.0)
        for b, request in enumerate(requests):
            if request is None or request.finish is not None:
                continue
            n = result.accepted[b]
            self._emit(events, request, result.drafted[b][:n] + [result.next[b]])
            request.stats.record_round(current.limits[b], n, current.decisions[b], drafting, verifying, seconds)
        # A drafting round's verify cell is charged with all of it but the drafting: what a plain
        # round's read-to-read time holds too (reading, emitting, deciding), so neither side of
        # the comparison leaves out the work every round does. The first round of a shape (rows,
        # k) in this process also traces the compiled layers for it, once, at the cost of
        # several plain rounds on a small model: the policy gets its acceptance, not its times.
        shape = (len(current.ids), current.k)
        timed = shape in self.spec.shapes_run
        self.spec.shapes_run.add(shape)
        t_draft, t_verify = (result.draft_seconds, seconds - (result.draft_seconds or 0.0)) if timed else (0.0, 0.0)
        self.spec.policy.record(shape[0], current.k, result.accepted, t_draft, t_verify, 0.0, current.limits,
                                steady, current.context)
        self._rounds += 1
        self._row_rounds += shape[0]
        self._last_k = current.k
        auto = [d for d, r in zip(current.decisions, requests) if r and r.options.draft_tokens == "auto"]
        self._off_reason = auto[0].reason if auto and auto[0].k == 0 else None
        for n, limit in zip(result.accepted, current.limits):
            for i in range(min(limit, n + 1)):
                self._reached[i] += 1
                self._accepted[i] += int(i < n)
        finished = [r for r in requests if r is not None and r.finish is not None]
        self._retire(events, finished)
        if self._static is not None:
            self._time_static(current, seconds, [r.emitted - n for r, n in zip(present, before)], finished)

    def _time_static(self, launch: "_Launch", seconds: float, took: list[int], finished: list[_Request]) -> None:
        """Count a round of the static batch (``took``: the tokens each row took), and tell the
        policy what the batch lost finishing apart, and how far apart its rows drifted, once its
        last row has left. A row that ended early ("stop": EOS) makes it a batch whose rows plain
        decoding would not have ended together either."""
        static = self._static
        if any(r.finish != "length" for r in finished):
            self._static = None
            return
        static.seconds += seconds
        static.tokens += sum(took)
        if len(launch.ids) == static.rows:
            static.full += 1
            static.drafting += launch.k > 0
            if static.first is None and len(took) > 1:
                static.variance += token_variance(took)
        if finished and static.first is None:
            static.first = (static.seconds, static.tokens)
        if not self._live:
            self._static = None
            # Only a batch that drafted in most of its rounds of all rows shows what drafting loses.
            if 2 * static.drafting < static.full:
                self.spec.policy.record_plain_batch(static.rows)
            elif static.first[0] < static.seconds:
                self.spec.policy.record_finish(static.rows, finishing_loss(static.seconds, static.tokens, *static.first),
                                               finishing_spread(static.variance, static.rows, static.tokens))

    def _retire(self, events: dict[int, Event], leaving: list[_Request]) -> None:
        """Rows leave the batch (and any round in flight); their caches go to the prefix store."""
        if not leaving:
            return
        rows, gone = self._rows, {r.id for r in leaving}
        for b, row_id in enumerate(rows.ids):
            if row_id in gone:
                request = self._live.pop(row_id)
                self._store(request, rows, b)
                self._close(events, request)
        keep = [b for b, row_id in enumerate(rows.ids) if row_id not in gone]
        if keep:
            self._rows, self._sampler = rows.select(keep), self._sampler.select(keep)
        else:
            self._rows, self._sampler, self._ahead = None, None, None

    def _store(self, request: _Request, rows: Rows, b: int) -> None:
        """Keep row b's cache for later prompts that share its tokens."""
        if self.prefixes.max_tokens == 0:
            return
        held = request.seq[:-1]  # the last token is the next step's input, not in the cache
        self.prefixes.put(held, rows.cache if len(rows.ids) == 1 else rows.cache.select([b]))
