"""Tests for mlx_specdec.sampling: literal arrays for the acceptance walk, hand-computed filters,
and chi-square tests that speculative sampling emits exactly the target's distribution."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from mlx_specdec.sampling import (
    SamplingParams,
    greedy_accept,
    make_key,
    probabilities,
    sample,
    speculative_accept,
)

N_SAMPLES = 20_000  # rows per statistical test, all drawn in one batched call per round
ALPHA = 1e-3  # a chi-square p-value below this fails a test (and must flag a wrong rule)

# ---------------------------------------------------------------------------------------------
# greedy_accept


def test_greedy_accept_all_accepted_takes_bonus_from_last_position():
    n, nxt = greedy_accept(mx.array([[5, 6, 7, 8]]), mx.array([[5, 6, 7]]))
    assert n.tolist() == [3] and nxt.tolist() == [8]


def test_greedy_accept_none_accepted_takes_targets_first_token():
    n, nxt = greedy_accept(mx.array([[5, 6, 7, 8]]), mx.array([[1, 6, 7]]))
    assert n.tolist() == [0] and nxt.tolist() == [5]


def test_greedy_accept_partial_stops_at_first_mismatch():
    # Position 2 matches again after the mismatch at 1: only the prefix counts.
    n, nxt = greedy_accept(mx.array([[5, 6, 7, 8]]), mx.array([[5, 0, 7]]))
    assert n.tolist() == [1] and nxt.tolist() == [6]


def test_greedy_accept_rows_accept_different_counts():
    target = mx.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    draft = mx.array([[1, 2, 3], [9, 2, 3], [1, 2, 9], [1, 9, 3]])
    n, nxt = greedy_accept(target, draft)
    assert n.dtype == mx.int32
    assert n.tolist() == [3, 0, 2, 1]
    assert nxt.tolist() == [4, 1, 3, 2]


def test_greedy_accept_without_draft_is_plain_decoding():
    n, nxt = greedy_accept(mx.array([[4], [7]]), mx.zeros((2, 0), dtype=mx.int32))
    assert n.tolist() == [0, 0] and nxt.tolist() == [4, 7]


# ---------------------------------------------------------------------------------------------
# probabilities

P4 = np.array([0.4, 0.3, 0.2, 0.1])
LOGITS4 = mx.array(np.log(P4) + 1.7)  # an arbitrary shift: only differences matter


def _normalised(x):
    x = np.asarray(x, dtype=np.float64)
    return x / x.sum()


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(temperature=1.0), P4),
        (SamplingParams(temperature=0.5), _normalised(P4**2)),
        (SamplingParams(temperature=2.0), _normalised(P4**0.5)),
        (SamplingParams(temperature=1.0, top_k=2), _normalised([0.4, 0.3, 0, 0])),
        (SamplingParams(temperature=1.0, top_k=4), P4),
        (SamplingParams(temperature=1.0, top_k=10), P4),
        # top-p: keep while the mass of the strictly more likely tokens is < top_p
        (SamplingParams(temperature=1.0, top_p=0.35), [1, 0, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.6), _normalised([0.4, 0.3, 0, 0])),
        (SamplingParams(temperature=1.0, top_p=0.75), _normalised([0.4, 0.3, 0.2, 0])),
        (SamplingParams(temperature=1.0, top_p=0.95), P4),
        # min-p: keep p >= min_p * p_max (p_max = 0.4)
        (SamplingParams(temperature=1.0, min_p=0.6), _normalised([0.4, 0.3, 0, 0])),
        (SamplingParams(temperature=1.0, min_p=0.3), _normalised([0.4, 0.3, 0.2, 0])),
        # filters intersect
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.6), _normalised([0.4, 0.3, 0, 0])),
        (SamplingParams(temperature=1.0, top_k=1, min_p=0.3), [1, 0, 0, 0]),
        (SamplingParams(temperature=0.5, top_k=3), _normalised([0.16, 0.09, 0.04, 0])),
    ],
    ids=repr,
)
def test_probabilities_matches_hand_computed(params, expected):
    got = probabilities(LOGITS4, params)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), expected, atol=1e-6)


def test_filters_are_judged_before_temperature():
    # Untempered, top_p=0.6 keeps {0.4, 0.3}. At T=3 the tempered distribution is flatter and a
    # temperature-first rule would also keep 0.2; we follow mlx-lm and judge on softmax(logits).
    got = probabilities(LOGITS4, SamplingParams(temperature=3.0, top_p=0.6))
    expected = _normalised([0.4 ** (1 / 3), 0.3 ** (1 / 3), 0, 0])
    np.testing.assert_allclose(np.array(got), expected, atol=1e-6)
    # Untempered, min_p=0.6 keeps 0.3 (>= 0.24); at T=0.5, 0.09 < 0.6 * 0.16 would drop it.
    got = probabilities(LOGITS4, SamplingParams(temperature=0.5, min_p=0.6))
    np.testing.assert_allclose(np.array(got), _normalised([0.16, 0.09, 0, 0]), atol=1e-6)


def test_filters_keep_ties_with_the_last_survivor():
    logits = mx.log(mx.array([0.3, 0.3, 0.3, 0.1]))
    got = probabilities(logits, SamplingParams(temperature=1.0, top_k=1))
    np.testing.assert_allclose(np.array(got), [1 / 3, 1 / 3, 1 / 3, 0], atol=1e-6)


def test_greedy_is_one_hot_argmax_with_lowest_index_on_ties():
    logits = mx.array([[0.0, 2.0, 2.0, 1.0], [3.0, -1.0, 0.0, 3.0]])
    got = probabilities(logits, SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    assert np.array(got).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_probabilities_keeps_leading_shape_and_casts_to_float32():
    logits = mx.random.normal((2, 3, 11), key=mx.random.key(0)).astype(mx.bfloat16)
    got = probabilities(logits, SamplingParams(temperature=0.8, top_p=0.9))
    assert got.shape == (2, 3, 11) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got.sum(-1)), 1.0, atol=1e-5)


def test_probabilities_matches_mlx_lm_sampler_filters():
    # Our distribution must be the one mlx-lm's make_sampler draws from with the same settings:
    # its filters on log-probs, in its order, then categorical(logprobs / temp).
    from mlx_lm import sample_utils

    logits = mx.random.normal((16, 64), key=mx.random.key(1)) * 3
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    settings_ = [(0.7, 0.9, 0.0, 0), (1.3, 1.0, 0.05, 0), (1.0, 1.0, 0.0, 5), (0.9, 0.8, 0.02, 20)]
    for temp, top_p, min_p, top_k in settings_:
        theirs = logprobs
        if top_p < 1:
            theirs = sample_utils.apply_top_p(theirs, top_p)
        if min_p > 0:
            theirs = sample_utils.apply_min_p(theirs, min_p)
        if top_k > 0:
            theirs = sample_utils.apply_top_k(theirs, top_k)
        expected = mx.softmax(theirs / temp, axis=-1)
        params = SamplingParams(temperature=temp, top_p=top_p, min_p=min_p, top_k=top_k)
        ours = probabilities(logits, params)
        np.testing.assert_allclose(np.array(ours), np.array(expected), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.0}, "min_p"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_greedy():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy


@settings(max_examples=40, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=12),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.05]),
    top_k=st.integers(0, 5),
    min_p=st.sampled_from([0.0, 0.1, 0.9]),
)
def test_probabilities_is_a_distribution_that_keeps_the_argmax(
    logits, temperature, top_p, top_k, min_p
):
    logits = np.array(logits, np.float32)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    got = np.array(probabilities(mx.array(logits), params))
    assert np.all(got >= 0)
    assert got.sum() == pytest.approx(1.0, abs=1e-5)
    assert got[np.argmax(logits)] > 0
    if top_k:  # only the top_k largest logits, and ties with the k-th, survive
        kth = np.sort(logits)[::-1][min(top_k, logits.size) - 1]
        assert np.all(logits[got > 0] >= kth)


# ---------------------------------------------------------------------------------------------
# sample / make_key


def test_sample_never_draws_zero_probability_tokens_and_is_keyed():
    probs = mx.broadcast_to(mx.array([0.0, 0.5, 0.0, 0.5]), (1000, 4))
    tokens = sample(probs, mx.random.key(3))
    assert tokens.dtype == mx.int32 and tokens.shape == (1000,)
    assert set(np.array(tokens).tolist()) == {1, 3}
    assert mx.array_equal(tokens, sample(probs, mx.random.key(3)))


def test_make_key_is_seeded_or_fresh():
    assert mx.array_equal(make_key(7), make_key(7))
    assert not mx.array_equal(make_key(None), make_key(None))


# ---------------------------------------------------------------------------------------------
# speculative_accept: exact cases


def _one_hot(tokens, vocab):
    return (mx.array(tokens)[..., None] == mx.arange(vocab)).astype(mx.float32)


def test_one_hot_p_and_q_reduce_to_greedy_accept_literal():
    target = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]
    draft = [[1, 2, 3], [0, 2, 3], [1, 2, 0], [1, 0, 3]]
    p, q = _one_hot(target, 6), _one_hot(draft, 6)
    n, nxt = speculative_accept(p, q, mx.array(draft), mx.random.key(0))
    assert n.tolist() == [3, 0, 2, 1] and nxt.tolist() == [4, 1, 3, 2]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 6),
    k=st.integers(0, 5),
    vocab=st.integers(2, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_hot_p_and_q_reduce_to_greedy_accept(data, batch, k, vocab, seed):
    token = st.integers(0, vocab - 1)
    row = st.lists(token, min_size=k + 1, max_size=k + 1)
    target = data.draw(st.lists(row, min_size=batch, max_size=batch))
    # Each draft token copies the target's or is arbitrary, so every acceptance count occurs.
    draft = [[data.draw(st.one_of(st.just(t), token)) for t in row[:k]] for row in target]
    target_a, draft_a = mx.array(target), mx.array(draft, dtype=mx.int32).reshape(batch, k)
    expected = greedy_accept(target_a, draft_a)
    p, q = _one_hot(target_a, vocab), _one_hot(draft_a, vocab)
    got = speculative_accept(p, q, draft_a, mx.random.key(seed))
    assert got[0].tolist() == expected[0].tolist()
    assert got[1].tolist() == expected[1].tolist()


def test_equal_p_and_q_accept_everything():
    p = mx.softmax(mx.random.normal((50, 4, 7), key=mx.random.key(0)), axis=-1)
    draft = sample(p[:, :3], mx.random.key(1))
    n, _ = speculative_accept(p, p[:, :3], draft, mx.random.key(2))
    assert n.tolist() == [3] * 50


def test_zero_residual_falls_back_to_p():
    # p == q, but the draft is a token neither can produce: it is rejected and the residual
    # max(0, p - q) is all zero; the replacement must still be a valid draw from p.
    p = mx.broadcast_to(mx.array([0.0, 0.25, 0.75, 0.0]), (2000, 2, 4))
    draft = mx.zeros((2000, 1), dtype=mx.int32)
    n, nxt = speculative_accept(p, p[:, :1], draft, mx.random.key(0))
    assert n.tolist() == [0] * 2000
    counts = np.bincount(np.array(nxt), minlength=4)
    assert counts[0] == counts[3] == 0
    assert 0.7 < counts[2] / 2000 < 0.8


def test_rejects_mismatched_shapes():
    p, q = mx.ones((2, 3, 5)) / 5, mx.ones((2, 3, 5)) / 5
    with pytest.raises(ValueError, match="p \\(B, k\\+1, V\\)"):
        speculative_accept(p, q, mx.zeros((2, 3), dtype=mx.int32), mx.random.key(0))


# ---------------------------------------------------------------------------------------------
# speculative_accept: the emitted tokens follow p (chi-square)


def _chi_square_pvalue(samples, probs):
    """p-value that the ints `samples` were drawn from `probs`; a zero-probability token fails."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    counts = np.bincount(np.asarray(samples).ravel(), minlength=probs.size)
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token of probability zero"
    expected = probs[support] / probs[support].sum() * counts.sum()
    return chisquare(counts[support], expected).pvalue


def _random_distributions(rng, n, vocab, concentration=1.0, floor=0.02):
    """Random rows with every entry >= floor, so that every chi-square cell is well populated."""
    d = rng.dirichlet(np.full(vocab, concentration), size=n)
    return (d + floor) / (1 + vocab * floor)


def _disagreeing(p):
    """A q that puts most of its mass where p has little."""
    q = np.roll(p[..., ::-1], 1, axis=-1) ** 3 + 0.01
    return q / q.sum(-1, keepdims=True)


def _emit(P, Q, k, n_tokens, key, accept=speculative_accept):
    """Run speculative rounds for N_SAMPLES independent rows; return the first n_tokens emitted.

    P, Q: (L, V) the target's and drafter's distributions at each absolute position, the same
    for every row and independent of the tokens before (a context-free "model"). A row whose
    round starts at position s drafts from Q[s : s+k] and is verified against P[s : s+k+1], so
    the emitted stream must be independent draws from P[0], P[1], ...
    """
    P, Q = np.asarray(P, np.float32), np.asarray(Q, np.float32)
    out = np.full((N_SAMPLES, n_tokens), -1)
    start = np.zeros(N_SAMPLES, dtype=np.int64)
    last = P.shape[0] - 1
    while start.min() < n_tokens:
        key, draft_key, accept_key = mx.random.split(key, 3)
        positions = np.minimum(start[:, None] + np.arange(k + 1), last)
        p, q = mx.array(P[positions]), mx.array(Q[positions[:, :k]])
        draft = sample(q, draft_key)
        n, nxt = (np.array(a) for a in accept(p, q, draft, accept_key))
        emitted = np.concatenate([np.array(draft), np.zeros((N_SAMPLES, 1), np.int32)], axis=1)
        emitted[np.arange(N_SAMPLES), n] = nxt
        for j in range(k + 1):
            rows = (j <= n) & (start + j < n_tokens)
            out[rows, start[rows] + j] = emitted[rows, j]
        start += n + 1
    assert (out >= 0).all()
    return out


def _assert_stream_follows(P, Q, k, key, n_tokens=2, accept=speculative_accept):
    """Marginal of token 0 is P[0], and the joint of tokens (0, 1) is P[0] x P[1]."""
    out = _emit(P, Q, k, n_tokens, key, accept)
    P = np.asarray(P, np.float64)
    assert _chi_square_pvalue(out[:, 0], P[0]) > ALPHA
    if n_tokens > 1:
        vocab = P.shape[1]
        assert _chi_square_pvalue(out[:, 0] * vocab + out[:, 1], np.outer(P[0], P[1])) > ALPHA


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("vocab", [5, 8])
@pytest.mark.parametrize("q_kind", ["random", "disagreeing", "greedy_drafter"])
def test_first_token_follows_target(k, vocab, q_kind):
    rng = np.random.default_rng(1000 * k + 10 * vocab + len(q_kind))
    P = _random_distributions(rng, k + 1, vocab)
    Q = {
        "random": lambda: _random_distributions(rng, k + 1, vocab, concentration=0.5, floor=0.0),
        "disagreeing": lambda: _disagreeing(P),
        "greedy_drafter": lambda: np.eye(vocab)[rng.integers(0, vocab, k + 1)],  # one-hot q
    }[q_kind]()
    _assert_stream_follows(P, Q, k, mx.random.key(k * vocab), n_tokens=1)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("position_dependent", [False, True])
def test_first_two_tokens_are_independent_draws_from_target(k, position_dependent):
    # i.i.d. case: p and q the same at every position, so the stream is i.i.d. p and the pair
    # (first, second) follows p x p whether the second token is an accepted draft, a bonus
    # token or the first token of the next round. Position-dependent case: P[0] x P[1], which
    # also catches using the wrong position's p or q.
    rng = np.random.default_rng(k + 10 * position_dependent)
    vocab, length = 6, 2 + k
    rows = length if position_dependent else 1
    P = _random_distributions(rng, rows, vocab)
    Q = _random_distributions(rng, rows, vocab, concentration=0.5, floor=0.0)
    if not position_dependent:
        P, Q = np.repeat(P, length, 0), np.repeat(Q, length, 0)
    _assert_stream_follows(P, Q, k, mx.random.key(200 + 10 * k + position_dependent))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.5),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=5),
        SamplingParams(temperature=1.2, min_p=0.1),
    ],
    ids=repr,
)
def test_composes_with_sampling_params(params):
    # Target and drafter logits differ; both go through `probabilities` with the same params.
    rng = np.random.default_rng(7)
    vocab, k = 8, 2
    target_logits = rng.normal(size=(k + 2, vocab)) * 1.5
    draft_logits = target_logits + rng.normal(size=target_logits.shape)
    P = np.array(probabilities(mx.array(target_logits), params))
    Q = np.array(probabilities(mx.array(draft_logits), params))
    _assert_stream_follows(P, Q, k, mx.random.key(5))


def _reference_accept(p, q, draft, key, bug=None):
    """A plain numpy version of the rule, optionally with a deliberate bug, to prove that the
    chi-square test above catches real mistakes (and, with bug=None, that the harness is sound)."""
    p, q, draft = np.array(p, np.float64), np.array(q, np.float64), np.array(draft)
    rng = np.random.default_rng(np.array(key).tolist())
    B, k, V = q.shape
    rows = np.arange(B)[:, None]
    p_x, q_x = p[rows, np.arange(k), draft], q[rows, np.arange(k), draft]
    ratio = q_x / p_x if bug == "inverted_ratio" else p_x / q_x
    n = np.cumprod(rng.random((B, k)) < ratio, axis=1).sum(1)
    q_pad = np.concatenate([q, np.zeros((B, 1, V))], axis=1)
    replacement = p[np.arange(B), n]
    if bug != "replacement_from_p":
        replacement = np.maximum(replacement - q_pad[np.arange(B), n], 0)
    cdf = np.cumsum(replacement / replacement.sum(1, keepdims=True), axis=1)
    nxt = np.minimum((rng.random((B, 1)) > cdf).sum(1), V - 1)
    return mx.array(n), mx.array(nxt)


@pytest.mark.parametrize("bug", ["inverted_ratio", "replacement_from_p"])
@pytest.mark.parametrize("q_kind", ["random", "disagreeing"])
def test_chi_square_catches_a_wrong_acceptance_rule(bug, q_kind):
    rng = np.random.default_rng(11)
    vocab, k = 6, 2
    P = _random_distributions(rng, k + 1, vocab)
    if q_kind == "random":
        Q = _random_distributions(rng, k + 1, vocab, concentration=0.5, floor=0.0)
    else:
        Q = _disagreeing(P)
    key = mx.random.key(9)
    _assert_stream_follows(P, Q, k, key, n_tokens=1, accept=_reference_accept)  # positive control
    wrong = _emit(P, Q, k, 1, key, lambda *a: _reference_accept(*a, bug=bug))
    assert _chi_square_pvalue(wrong[:, 0], P[0]) < ALPHA
