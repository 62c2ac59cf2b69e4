"""The engine: requests that join and leave a live batch between rounds each get exactly what
generating alone gives them; prefix reuse prefills only what is new; admission is chunked and
bounded."""

import dataclasses
import functools
import inspect
import time

import pytest

from mlx_specdec import generate, load
from mlx_specdec.decode import Options
from mlx_specdec.engine import Engine
from mlx_specdec.errors import InputError
from mlx_specdec.loading import SpecModel
from mlx_specdec.policy import DraftPolicy
from tests.stand_in import StandInDrafter
from mlx_specdec.sampling import SamplingParams
from tests.helpers import prompt

WINDOW = 8  # the tiny checkpoints' sliding window


@functools.lru_cache(maxsize=None)
def _spec(target, drafter):
    return load(target, drafter=drafter or False)


def _real(checkpoints, geometry="dense"):
    target = checkpoints.target(geometry)
    return _spec(target, checkpoints.assistant(target))


def _alone(spec, ids, max_tokens, **kw):
    result = generate(spec, ids, max_tokens=max_tokens, **kw)
    return result.tokens, result.finish_reason


def _options(max_tokens, draft_tokens="auto", **sampling):
    return Options(max_tokens=max_tokens, sampling=SamplingParams(**sampling), draft_tokens=draft_tokens)


def run(engine, arrivals, cancels=None):
    """Submit each (step, prompt, options) when the engine reaches that step; cancel request i at
    step cancels[i]. Returns each request's tokens, finish reason, last stats, and the steps at
    which it received tokens."""
    cancels = cancels or {}
    ids, out, step = {}, {}, 0
    while len(ids) < len(arrivals) or engine.has_work:
        for i, (at, ids_, options) in enumerate(arrivals):
            if at == step:
                ids[engine.submit(ids_, options)] = i
                out[i] = {"tokens": [], "finish": None, "stats": None, "steps": []}
        for i, at in cancels.items():
            if at == step:
                engine.cancel(next(r for r, j in ids.items() if j == i))
        for event in engine.step():
            o = out[ids[event.request_id]]
            assert o["finish"] is None, "no event after a request finished"
            o["tokens"] += event.tokens
            o["finish"], o["stats"] = event.finish_reason, event.stats
            if event.tokens:
                o["steps"].append(step)
        step += 1
        assert step < 500
    return [out[i] for i in range(len(arrivals))]


ARRIVALS = [  # (step, prompt length, max_tokens): different lengths, joining at different rounds
    (0, 5, 14), (0, 23, 9), (2, 1, 20), (3, 40, 12), (3, 12, 6), (7, 3, 16), (9, 31, 10),
]


@pytest.mark.parametrize("draft_tokens", [3, "auto", 0])
def test_requests_joining_and_leaving_each_get_what_they_get_alone(checkpoints, draft_tokens):
    spec = _real(checkpoints)
    prompts = [prompt(n, seed=n) for _, n, _ in ARRIVALS]
    expected = [_alone(spec, p, m, draft_tokens=0) for p, (_, _, m) in zip(prompts, ARRIVALS)]
    engine = Engine(spec, max_batch=4, prefill_step_size=8)
    arrivals = [(at, p, _options(m, draft_tokens)) for p, (at, _, m) in zip(prompts, ARRIVALS)]
    got = run(engine, arrivals, cancels={1: 4})
    for i, (g, (tokens, finish)) in enumerate(zip(got, expected)):
        if i == 1:  # cancelled mid-way: what it got so far is the start of its answer
            assert g["finish"] == "cancelled" and g["tokens"] == tokens[: len(g["tokens"])]
            continue
        assert (g["tokens"], g["finish"]) == (tokens, finish), f"request {i}"
    assert not engine.has_work and engine.metrics()["batch_size"] == 0


def test_a_perfect_drafter_accepts_everything_while_rows_come_and_go(checkpoints):
    base = _spec(checkpoints.target("e2b"), None)
    prompts = [prompt(n, seed=100 + n) for _, n, _ in ARRIVALS]
    endless = SpecModel(target=base.target, drafter=None, tokenizer=None)
    seqs = [p + _alone(endless, p, 40, draft_tokens=0)[0] for p in prompts]
    spec = SpecModel(target=base.target, drafter=StandInDrafter(base.target, seqs), tokenizer=None,
                     eos_token_ids=base.eos_token_ids)
    expected = [_alone(base, p, m, draft_tokens=0) for p, (_, _, m) in zip(prompts, ARRIVALS)]
    arrivals = [(at, p, _options(m, 4)) for p, (at, _, m) in zip(prompts, ARRIVALS)]
    got = run(Engine(spec, max_batch=8, prefill_step_size=16), arrivals)
    assert [(g["tokens"], g["finish"]) for g in got] == expected
    for g in got:
        assert g["stats"].accepted == g["stats"].drafted


def test_rows_with_their_own_draft_length_share_a_round(checkpoints):
    spec = _real(checkpoints, "31b")
    prompts = [prompt(n, seed=n) for n in (6, 13, 9)]
    kinds = [0, 2, "auto"]
    engine = Engine(spec, max_batch=3)
    got = run(engine, [(0, p, _options(15, k)) for p, k in zip(prompts, kinds)])
    for p, g, k in zip(prompts, got, kinds):
        assert g["tokens"] == _alone(spec, p, 15, draft_tokens=0)[0]
        if k != "auto":  # a fixed k is the row's own, whatever the others draft (less near max_tokens)
            assert max(g["stats"].k_histogram) == k


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_a_seeded_request_draws_the_same_tokens_alone_or_batched(checkpoints, draft_tokens):
    spec = _real(checkpoints, "e2b")
    ids = prompt(11, seed=4)
    sampling = dict(temperature=1.0, top_p=0.95, seed=1234)
    alone = _alone(spec, ids, 16, draft_tokens=draft_tokens, **sampling)[0]
    assert alone != _alone(spec, ids, 16, draft_tokens=draft_tokens, **{**sampling, "seed": 99})[0]
    others = [  # greedy, sampled with other params and no seed, another draft length
        (0, prompt(5, 1), _options(20, 3)),
        (0, prompt(17, 2), _options(8, "auto", temperature=0.7, top_k=5)),
        (2, prompt(3, 3), _options(12, 1, temperature=1.3)),
    ]
    for at in (0, 1, 3):
        arrivals = others + [(at, ids, _options(16, draft_tokens, **sampling))]
        assert run(Engine(spec, max_batch=4, prefill_step_size=8), arrivals)[-1]["tokens"] == alone


def test_prefix_reuse_prefills_only_the_new_tokens(checkpoints):
    spec = _real(checkpoints, "e2b")
    engine = Engine(spec, max_batch=2)
    system = prompt(3 * WINDOW, seed=7)
    first = system + prompt(2, seed=8)
    [a] = run(engine, [(0, first, _options(4, 2))])
    assert a["stats"].reused_tokens == 0
    # A continued conversation: the earlier prompt, its answer, and a new turn; and a request
    # that shares only the system prompt (the short first answer left the ring holding its end).
    follow = first + a["tokens"] + prompt(6, seed=9)
    other = system + prompt(4, seed=10)
    got = run(engine, [(0, follow, _options(10, 2)), (0, other, _options(10, "auto"))])
    assert len(follow) - 6 - 1 <= got[0]["stats"].reused_tokens < len(follow)
    assert got[1]["stats"].reused_tokens == len(system)
    assert [g["tokens"] for g in got] == [_alone(spec, p, 10, draft_tokens=0)[0] for p in (follow, other)]
    m = engine.metrics()
    assert m["prefix_cache_hits"] == 2 and m["prefix_reused_tokens"] == sum(g["stats"].reused_tokens for g in got)


def test_a_prefix_past_the_sliding_ring_is_not_reused(checkpoints):
    spec = _real(checkpoints, "dense")
    engine = Engine(spec, max_batch=1)
    head = prompt(WINDOW, seed=1)
    [a] = run(engine, [(0, head + prompt(4 * WINDOW, seed=2), _options(4, 0))])
    # Shares only the first WINDOW tokens, which the ring has long since overwritten.
    branch = head + prompt(5, seed=3)
    [b] = run(engine, [(0, branch, _options(8, 0))])
    assert b["stats"].reused_tokens == 0
    assert b["tokens"] == _alone(spec, branch, 8, draft_tokens=0)[0]


def test_the_prefix_store_is_bounded_least_recently_used_first(checkpoints):
    spec = _real(checkpoints, "dense")
    engine = Engine(spec, max_batch=1, prefix_cache_tokens=1000)  # ~3 entries: each holds 256 full-attention slots + its ring
    prompts = [prompt(20, seed=s) for s in range(6)]
    for p in prompts:
        run(engine, [(0, p, _options(3, 0))])
    store = engine.prefixes
    assert store.size <= 1000 and 0 < len(store) < len(prompts)
    [last] = run(engine, [(0, prompts[-1] + [5, 6], _options(3, 0))])
    assert last["stats"].reused_tokens == len(prompts[-1])
    [oldest] = run(engine, [(0, prompts[0] + [5, 6], _options(3, 0))])
    assert oldest["stats"].reused_tokens == 0


def test_a_shared_system_prompt_is_reused_once_a_second_request_branches_off_it(checkpoints):
    # Long answers: a finished row's ring has moved well past where the next prompt branches off.
    spec = _real(checkpoints, "e2b")
    engine = Engine(spec, max_batch=1, branch_min_tokens=2 * WINDOW)
    system = prompt(5 * WINDOW, seed=21)
    asks = [system + prompt(4 + i, seed=30 + i) for i in range(3)]
    got = [run(engine, [(0, p, _options(3 * WINDOW, 2))])[0] for p in asks]
    # The first has nothing to reuse; the second can no longer continue the first's cache but
    # keeps its own at the branch point; the third reuses the system prompt from there.
    assert [g["stats"].reused_tokens for g in got] == [0, 0, len(system)]
    assert [g["tokens"] for g in got] == [_alone(spec, p, 3 * WINDOW, draft_tokens=0)[0] for p in asks]
    # Below the threshold nothing is kept: the chat header every conversation shares is not worth an entry.
    engine = Engine(spec, max_batch=1, branch_min_tokens=len(system) + 1)
    got = [run(engine, [(0, p, _options(3 * WINDOW, 2))])[0] for p in asks]
    assert [g["stats"].reused_tokens for g in got] == [0, 0, 0]
    assert len(engine.prefixes) == 3


def test_a_long_prompt_stalls_the_live_batch_for_about_one_chunk(checkpoints):
    spec = _real(checkpoints, "dense")
    calls = []
    counting = _CountingTarget(spec.target, calls)
    spec = SpecModel(**{**vars(spec), "target": counting})
    engine = Engine(spec, max_batch=2, prefill_step_size=16)
    live = prompt(4, seed=1)
    long = prompt(70, seed=2)
    got = run(engine, [(0, live, _options(30, 0)), (2, long, _options(3, 0))])
    # The long prompt ran in ceil(70 / 16) chunks of at most 16 tokens, one per step (the last
    # chunk's final token in a pass of its own), and the live row received tokens in each of
    # those steps. (The live prompt's passes: 3 tokens, then 1.)
    chunks = [n for rows, n in calls if n > 3 and rows == 1]
    assert chunks == [16, 16, 16, 16, 5]
    first_long = got[1]["steps"][0]
    assert set(range(2, first_long + 1)) <= set(got[0]["steps"])
    assert got[1]["tokens"] == _alone(spec, long, 3, draft_tokens=0)[0]


class _CountingTarget:
    """The target, recording (rows, tokens per row) of every pass."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, tokens, step, cache):
        self.calls.append(tuple(tokens.shape))
        return self.inner(tokens, step, cache)


def test_admission_waits_for_kv_memory_and_refuses_what_never_fits(checkpoints):
    spec = _real(checkpoints, "dense")
    probe = Engine(spec, max_batch=4)
    probe.submit(prompt(10), _options(20, 0))
    probe.step()
    one_row = probe.metrics()["kv_reserved_bytes"]  # what one such request could grow to
    assert one_row > 0
    prompts = [prompt(10, seed=s) for s in range(3)]
    # Room for one such request's K/V at a time: they run one after another, each exact.
    bound = int(1.5 * one_row)
    engine = Engine(spec, max_batch=4, kv_memory_bytes=bound)
    sizes = []
    got = run(_Observing(engine, sizes), [(0, p, _options(20, 0)) for p in prompts])
    assert max(sizes) == 1
    assert [g["tokens"] for g in got] == [_alone(spec, p, 20, draft_tokens=0)[0] for p in prompts]
    with pytest.raises(InputError, match="K/V"):
        engine.submit(prompt(10), _options(100_000, 0))


class _Observing:
    """An engine, recording the live batch size after every step."""

    def __init__(self, engine, sizes):
        self.engine, self.sizes = engine, sizes

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        events = self.engine.step()
        self.sizes.append(self.engine.metrics()["batch_size"])
        return events


def test_cancelling_a_waiting_request_and_metrics(checkpoints):
    spec = _real(checkpoints, "dense")
    engine = Engine(spec, max_batch=1)
    a = engine.submit(prompt(6), _options(5, 2))
    b = engine.submit(prompt(7), _options(5, 2))
    engine.cancel(b)
    events = {e.request_id: e for e in engine.step()}
    assert events[b].finish_reason == "cancelled" and events[b].tokens == []
    while engine.has_work:
        engine.step()
    engine.cancel(a)  # already finished: nothing happens
    assert engine.step() == []
    m = engine.metrics()
    assert m["batch_size"] == 0 and m["queue_depth"] == 0 and m["requests_finished"] == 2
    assert m["tokens_generated"] == 5 and m["rounds"] >= 2 and len(m["acceptance_by_position"]) == 8
    with pytest.raises(InputError):
        engine.submit([], _options(5))
    with pytest.raises(InputError):
        Engine(spec, max_batch=0)


class _FailingTarget(_CountingTarget):
    """The target, raising on its n-th pass."""

    def __init__(self, inner, at):
        super().__init__(inner, [])
        self.at = at

    def __call__(self, tokens, step, cache):
        if len(self.calls) + 1 == self.at:
            self.calls.append(None)
            raise RuntimeError("out of memory (simulated)")
        return super().__call__(tokens, step, cache)


# Failing pass: the first prompt's prefill (the second prompt, still queued, is then served),
# the second's (the first, prefilled in the same step, fails with it), the first round.
@pytest.mark.parametrize("at,hit", [(1, [0]), (3, [0, 1]), (5, [0, 1])])
def test_a_failed_pass_ends_the_requests_it_hit_and_the_engine_serves_on(checkpoints, at, hit):
    spec = _real(checkpoints, "dense")
    failing = SpecModel(**{**vars(spec), "target": _FailingTarget(spec.target, at=at)})
    engine = Engine(failing, max_batch=2)
    prompts = [prompt(n, seed=n) for n in (5, 8)]
    first = [engine.submit(p, _options(10, 2)) for p in prompts]
    events = []
    while engine.has_work:
        events += engine.step()
    ended = {e.request_id: e for e in events if e.finish_reason}
    for b, (i, p) in enumerate(zip(first, prompts)):
        if b in hit:
            assert ended[i].finish_reason == "error" and isinstance(ended[i].error, RuntimeError)
        else:
            tokens = sum((e.tokens for e in events if e.request_id == i), [])
            assert tokens == _alone(spec, p, 10, draft_tokens=0)[0]
    [after] = run(engine, [(0, prompt(6, seed=3), _options(10, 2))])
    assert after["tokens"] == _alone(spec, prompt(6, seed=3), 10, draft_tokens=0)[0]


def test_plain_rounds_are_launched_before_the_last_one_is_read(checkpoints):
    spec = _real(checkpoints, "dense")
    calls = []
    spec = SpecModel(**{**vars(spec), "target": _CountingTarget(spec.target, calls)})
    engine = Engine(spec, max_batch=2)
    engine.submit(prompt(5), _options(6, 0))
    [first] = engine.step()  # the prefill (the prompt's last token alone) and its token
    assert calls == [(1, 4), (1, 1)] and len(first.tokens) == 1
    [event] = engine.step()
    # The round this step read, and the next one already running.
    assert calls == [(1, 4), (1, 1), (1, 1), (1, 1)]
    tokens = first.tokens + event.tokens
    while engine.has_work:
        tokens += sum((e.tokens for e in engine.step()), [])
    # No round runs past the last token's: 2 prefill passes + 5 rounds, the last one not ahead.
    assert len(calls) == 7
    assert tokens == _alone(spec, prompt(5), 6, draft_tokens=0)[0]


def _steady_rounds(spec, monkeypatch) -> list[bool]:
    """Whether each round the policy records from now on is steady, in order."""
    steady, record = [], spec.policy.record

    def spy(*args, **kwargs):
        steady.append(inspect.signature(record).bind(*args, **kwargs).arguments.get("steady", True))
        record(*args, **kwargs)

    monkeypatch.setattr(spec.policy, "record", spy)  # the spec is shared: no spy left behind
    return steady


def test_only_plain_rounds_inside_a_pipelined_stretch_time_plain_decoding(checkpoints, monkeypatch):
    # The first round of a stretch waits for its own graph as well, the last one is only a tail:
    # neither is what a plain round costs, so neither reaches the policy's plain cost.
    spec = _real(checkpoints, "dense")
    steady = _steady_rounds(spec, monkeypatch)
    engine = Engine(spec, max_batch=2)
    engine.submit(prompt(5), _options(8, 0))
    while engine.has_work:
        engine.step()
    # 8 tokens: the prefill's, then 7 rounds; the first and the last are not steady.
    assert steady == [False] + [True] * 5 + [False]


@pytest.mark.parametrize("out_of", ["rows", "kv memory"])
def test_a_full_batch_keeps_its_plain_rounds_pipelined_while_requests_wait(checkpoints, monkeypatch, out_of):
    # Requests waiting for room, in rows or in K/V memory, must not stop the live batch's plain
    # rounds from being launched ahead of the read (an overloaded server decodes plainly).
    spec = _real(checkpoints, "dense")
    bound = None
    if out_of == "kv memory":  # room for more rows, but for one such request's K/V only
        probe = Engine(spec, max_batch=4)
        probe.submit(prompt(5), _options(8, 0))
        probe.step()
        bound = int(1.5 * probe.metrics()["kv_reserved_bytes"])
    steady = _steady_rounds(spec, monkeypatch)
    engine = Engine(spec, max_batch=1 if out_of == "rows" else 4, kv_memory_bytes=bound)
    for _ in range(2):
        engine.submit(prompt(5), _options(8, 0))
    while engine.has_work:
        engine.step()
    # The first request's rounds while the second waits are as steady as a request's alone.
    assert steady == ([False] + [True] * 5 + [False]) * 2


def test_drafting_rounds_pay_the_work_between_rounds_as_plain_rounds_do(checkpoints, monkeypatch):
    # Plain rounds are timed read to read, so they pay for whatever runs between two rounds (the
    # engine's own work, its caller's); a drafting round timed only from its launch did not, and
    # drafting looked cheaper than it was. The prefill is neither round's, and the first round of
    # a shape (it also traces the compiled layers) reports no times at all.
    # As if loaded afresh, with nothing measured yet.
    spec = dataclasses.replace(_real(checkpoints, "dense"), shapes_run=set(), policy=DraftPolicy())
    between = 0.3
    seen, record = [], spec.policy.record

    def spy(*args, **kwargs):
        bound = inspect.signature(record).bind(*args, **kwargs).arguments
        seen.append((bound["k"], bound["t_draft"], bound["t_verify"]))
        record(*args, **kwargs)

    monkeypatch.setattr(spec.policy, "record", spy)
    engine = Engine(spec, max_batch=2)
    verify = []
    for _ in range(2):
        seen.clear()
        engine.submit(prompt(5), _options(12, 2))
        while engine.has_work:
            engine.step()
            time.sleep(between)
        verify.append([(t_draft, t) for k, t_draft, t in seen if k == 2])
    first, second = verify
    assert len(first) >= 2 and len(second) >= 2
    assert first[0] == (0.0, 0.0)  # the engine's first round at (1 row, k = 2)
    assert 0 < second[0][1] < between  # launched right after a prefill: timed from its launch
    assert all(t >= between for _, t in first[1:] + second[1:])
    # The drafter is timed apart (t_draft) in the first timed round, then now and then (None: its
    # drafts overlapped the verify pass being built, and t holds them too).
    assert first[1][0] is not None and first[1][0] > 0
    timed = [t_draft for t_draft, _ in first[2:] + second[1:] if t_draft is not None]
    assert len(timed) < len(first) + len(second) - 3 and all(t_draft > 0 for t_draft in timed)


@pytest.mark.parametrize("k", [0, 2])
def test_each_round_tells_the_policy_the_context_it_attended_over(checkpoints, monkeypatch, k):
    # Costs timed at a context the decoding has since outgrown expire (policy.CONTEXT_SLACK): the
    # engine says, per round, how many tokens its longest row held when it was launched.
    spec = _real(checkpoints, "dense")
    seen, record = [], spec.policy.record

    def spy(*args, **kwargs):
        bound = inspect.signature(record).bind(*args, **kwargs).arguments
        seen.append((bound["accepted"][0], bound["context"]))
        record(*args, **kwargs)

    monkeypatch.setattr(spec.policy, "record", spy)
    engine = Engine(spec, max_batch=2)
    engine.submit(prompt(5), _options(12, k))
    while engine.has_work:
        engine.step()
    # The prompt's 5 tokens and the one the prefill sampled, then each round's accepted and its own.
    assert seen[0][1] == 6 and len(seen) >= 2
    assert all(after == context + accepted + 1 for (accepted, context), (_, after) in zip(seen, seen[1:]))


@pytest.mark.parametrize("k", [0, 2])
def test_a_round_launches_everything_its_read_waits_for(checkpoints, monkeypatch, k):
    # On MLX's CPU stream an array left out of the launch is computed only when read, behind
    # the round launched meanwhile: reading a pipelined plain round then waited for the whole
    # next one, and the device sat idle while the round after it was built.
    import mlx.core as mx

    from mlx_specdec import decode as decode_module

    spec = _real(checkpoints, "dense")
    launched, real = [], mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *arrays: (launched.extend(arrays), real(*arrays)))
    engine = Engine(spec, max_batch=1)
    engine.submit(prompt(6), _options(3, k))
    engine.step()  # the prefill
    rows, sampler = engine._rows, engine._sampler
    launched.clear()
    _, result = decode_module.speculative_round(spec, rows, k, sampler)
    assert all(any(a is b for b in launched) for a in result._arrays)


def _guessing(checkpoints, prompts, error_rate=0.4):
    """A pair whose drafter guesses each row's greedy continuation, wrong now and then: rows of a
    batch accept different numbers of drafts and move apart."""
    base = _spec(checkpoints.target("e2b"), None)
    endless = SpecModel(target=base.target, drafter=None, tokenizer=None)
    seqs = [p + _alone(endless, p, 40, draft_tokens=0)[0] for p in prompts]
    return SpecModel(target=base.target, drafter=StandInDrafter(base.target, seqs, error_rate=error_rate),
                     tokenizer=None, eos_token_ids=frozenset())


@pytest.mark.parametrize("arrivals, recorded", [
    ([(0, 20), (0, 20), (0, 20)], True),  # a static batch
    ([(0, 20), (0, 20), (0, 14)], False),  # rows with different budgets: plain decoding ends them apart too
    ([(0, 20), (0, 20), (3, 20)], False),  # a row that joined later
])
def test_a_static_batch_that_drafted_tells_the_policy_what_its_rows_finishing_apart_lost(
        checkpoints, monkeypatch, arrivals, recorded):
    # Rows that start together with as many tokens to go, and that nothing joins, end in the same
    # round decoded plainly; drafted, they finish apart (DraftPolicy.record_finish).
    prompts = [prompt(6, seed=s) for s in range(len(arrivals))]
    spec = _guessing(checkpoints, prompts)
    finishes, plain = [], []
    monkeypatch.setattr(spec.policy, "record_finish", lambda b, lost, spread: finishes.append((b, lost, spread)))
    monkeypatch.setattr(spec.policy, "record_plain_batch", plain.append)
    got = run(Engine(spec, max_batch=4), [(at, p, _options(m, 3)) for p, (at, m) in zip(prompts, arrivals)])
    assert plain == []  # a batch that drafted, or no static batch
    assert [g["tokens"] for g in got] == [_alone(spec, p, m, draft_tokens=0)[0] for p, (_, m) in zip(prompts, arrivals)]
    ends = {g["steps"][-1] for g in got}
    if recorded:
        assert len(ends) > 1, "the rows should finish apart"
        assert len(finishes) == 1 and finishes[0][0] == 3 and 0 < finishes[0][1] < 1 and finishes[0][2] > 0
    else:
        assert finishes == []


def test_a_static_batch_decoded_plainly_tells_the_policy_it_measured_no_finishing_loss(checkpoints, monkeypatch):
    # While finishing losses hold drafting off, plain batches are all that come
    # (DraftPolicy.record_plain_batch): the policy counts them to measure those losses again.
    prompts = [prompt(6, seed=s) for s in range(3)]
    spec = _guessing(checkpoints, prompts)
    finishes, plain = [], []
    monkeypatch.setattr(spec.policy, "record_finish", lambda b, lost, spread: finishes.append(b))
    monkeypatch.setattr(spec.policy, "record_plain_batch", plain.append)
    run(Engine(spec, max_batch=4), [(0, p, _options(12, 0)) for p in prompts])
    assert plain == [3] and finishes == []


def test_auto_rows_are_a_static_batch_only_while_no_request_waits_for_a_row(checkpoints, monkeypatch):
    prompts = [prompt(6, seed=s) for s in range(3)]
    spec = _guessing(checkpoints, prompts)
    seen, decide = [], spec.policy.decide
    monkeypatch.setattr(spec.policy, "decide", lambda b, static=False: (seen.append((b, static)), decide(b, static))[1])
    run(Engine(spec, max_batch=3), [(0, p, _options(16)) for p in prompts])
    assert seen and all(static for _, static in seen)
    seen.clear()
    # Two rows at a time: the third request waits for one to leave, then joins the other.
    run(Engine(spec, max_batch=2), [(0, p, _options(16)) for p in prompts])
    assert seen and not any(static for _, static in seen)
