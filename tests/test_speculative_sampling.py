"""Speculative sampling keeps the target's distribution: a statistical test
through the whole loop, on a 16-token vocabulary, against the exact
distribution the target defines."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chisquare

import mlx_specdec.decode as decode_module
from mlx_specdec import generate_batch, load
from mlx_specdec.cache import Step
from mlx_specdec.loading import SpecModel
from mlx_specdec.sampling import SamplingParams, probabilities, sample
from tests import oracle

VOCAB = 16
SAMPLES = 20_000
CHUNK = 5_000
# A correct sampler fails this about once in 10^4 runs; the bug below fails it always.
P_VALUE_FLOOR = 1e-4
PROMPT = [5, 9, 3, 12, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vocab")
    target = oracle.save_target(root / "target", "e2b", vocab_size=VOCAB, seed=2)
    drafter = oracle.save_assistant(root / "drafter", target, centroids=True, seed=5)
    spec = load(target, drafter=drafter)
    # No EOS: every row yields exactly max_tokens tokens.
    return SpecModel(target=spec.target, drafter=spec.drafter, tokenizer=None, eos_token_ids=frozenset())


def _next_token_probs(spec, prefixes, params):
    cache = spec.target.make_cache(len(prefixes), max_step=16)
    n = len(prefixes[0])
    hidden = spec.target(mx.array(prefixes), Step((0,) * len(prefixes), n), cache)
    return np.array(probabilities(spec.target.logits(hidden[:, -1]), params), dtype=np.float64)


def exact_joints(spec, params):
    """P(t1, t2) and P(t2, t3) under plain sampling, by enumerating prefixes."""
    p1 = _next_token_probs(spec, [PROMPT], params)[0]
    p2 = _next_token_probs(spec, [PROMPT + [a] for a in range(VOCAB)], params)
    pairs = list(itertools.product(range(VOCAB), repeat=2))
    p3 = _next_token_probs(spec, [PROMPT + [a, b] for a, b in pairs], params).reshape(VOCAB, VOCAB, VOCAB)
    joint12 = p1[:, None] * p2
    joint123 = joint12[:, :, None] * p3
    return joint12, joint123.sum(axis=0)


def sampled_tokens(spec, params, k, seed):
    rows = []
    for i in range(SAMPLES // CHUNK):
        results = generate_batch(
            spec, [PROMPT] * CHUNK, max_tokens=3, draft_tokens=k,
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=seed + i,
        )
        rows += [r.tokens for r in results]
    tokens = np.array(rows)
    assert tokens.shape == (SAMPLES, 3)
    return tokens


def chi_square_p(observed_pairs: np.ndarray, expected_probs: np.ndarray) -> float:
    counts = np.zeros(expected_probs.size)
    np.add.at(counts, observed_pairs[:, 0] * VOCAB + observed_pairs[:, 1], 1)
    expected = expected_probs.reshape(-1) * len(observed_pairs)
    assert counts[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
    # Pool cells with small expectation so the chi-square approximation holds.
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


CASES = [
    (SamplingParams(temperature=1.0), 2),
    (SamplingParams(temperature=0.6), 2),
    (SamplingParams(temperature=1.3, top_p=0.8), 2),
    (SamplingParams(temperature=1.0, top_k=6), 1),
]


@pytest.mark.parametrize("params, k", CASES)
def test_speculative_sampling_matches_the_target_distribution(tiny, params, k):
    joint12, joint23 = exact_joints(tiny, params)
    tokens = sampled_tokens(tiny, params, k, seed=100)
    assert chi_square_p(tokens[:, :2], joint12) > P_VALUE_FLOOR
    assert chi_square_p(tokens[:, 1:], joint23) > P_VALUE_FLOOR


def test_rounds_really_drafted_and_rejected(tiny):
    results = generate_batch(tiny, [PROMPT] * 200, max_tokens=3, draft_tokens=2, temperature=1.0, seed=1)
    drafted = sum(r.stats.drafted for r in results)
    accepted = sum(r.stats.accepted for r in results)
    assert drafted == 200 * 1  # 3 tokens: one from the prefill, a round of k = 1 + bonus
    assert 0 < accepted < drafted


def test_a_wrong_acceptance_rule_is_caught(tiny, monkeypatch):
    """The threshold has teeth: sampling a rejected draft's replacement from p
    instead of the residual max(0, p - q) skews the distribution, and the test
    above rejects it."""
    real = decode_module.speculative_accept

    def replacement_from_p(p, q, draft_tokens, keys, limits=None):
        n, _ = real(p, q, draft_tokens, keys, limits)
        p_next = mx.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
        return n, sample(p_next, keys)

    monkeypatch.setattr(decode_module, "speculative_accept", replacement_from_p)
    params = SamplingParams(temperature=1.0)
    joint12, _ = exact_joints(tiny, params)
    tokens = sampled_tokens(tiny, params, 2, seed=100)
    assert chi_square_p(tokens[:, :2], joint12) < P_VALUE_FLOOR
