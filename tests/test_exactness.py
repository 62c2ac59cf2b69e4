"""Speculative greedy output == plain greedy output == transformers' greedy output."""

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_specdec import generate, generate_batch, load
from mlx_specdec.loading import SpecModel
from tests import oracle
from tests.helpers import prompt, until_eos
from tests.stand_in import StandInDrafter

WINDOW = 8
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@functools.lru_cache(maxsize=None)
def _spec(target, drafter):
    return load(target, drafter=drafter or False)


def _plain(spec, ids, n):
    return generate(spec, ids, max_tokens=n, draft_tokens=0).tokens


def standin(spec, prompts, max_tokens, error_rate=0.0, seed=0):
    """A SpecModel whose drafter proposes the target's own greedy continuation."""
    # The continuation runs past EOS and max_tokens so the stand-in can always look ahead.
    endless = SpecModel(target=spec.target, drafter=None, tokenizer=None)
    seqs = [p + _plain(endless, p, max_tokens + 12) for p in prompts]
    drafter = StandInDrafter(spec.target, seqs, error_rate=error_rate, seed=seed)
    return SpecModel(target=spec.target, drafter=drafter, tokenizer=None, eos_token_ids=spec.eos_token_ids)


@pytest.mark.slow
@SETTINGS
@given(
    geometry=st.sampled_from(oracle.GEOMETRIES),
    length=st.integers(1, 5 * WINDOW),
    k=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    centroids=st.booleans(),
)
def test_random_drafter_greedy_equals_plain_and_transformers(checkpoints, geometry, length, k, seed, centroids):
    target = checkpoints.target(geometry)
    spec = _spec(target, checkpoints.assistant(target, centroids=centroids))
    ids = prompt(length, seed)
    n = 24
    expected = until_eos(oracle.reference_greedy(target, ids, n))
    assert _plain(spec, ids, n) == expected
    assert generate(spec, ids, max_tokens=n, draft_tokens=k).tokens == expected


@SETTINGS
@given(
    geometry=st.sampled_from(oracle.GEOMETRIES),
    length=st.integers(1, 5 * WINDOW),
    k=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    error_rate=st.sampled_from([0.0, 0.3]),
)
def test_standin_drafter_greedy_equals_plain(checkpoints, geometry, length, k, seed, error_rate):
    spec = _spec(checkpoints.target(geometry), None)
    ids = prompt(length, seed)
    n = 30
    expected = _plain(spec, ids, n)
    result = generate(standin(spec, [ids], n, error_rate, seed), ids, max_tokens=n, draft_tokens=k)
    assert result.tokens == expected
    if error_rate == 0.0:
        assert result.stats.drafted == 0 or result.stats.acceptance_rate == 1.0


@pytest.mark.parametrize("geometry", ["dense", "unified-shared"])
def test_perfect_drafter_accepts_every_token_in_exact_rounds(checkpoints, geometry):
    spec = _spec(checkpoints.target(geometry), None)
    ids = prompt(3 * WINDOW, 7)
    expected = _plain(spec, ids, 64)
    assert len(expected) == 64, "pick a prompt whose greedy continuation has no EOS"
    for k in range(1, 9):
        result = generate(standin(spec, [ids], 64), ids, max_tokens=64, draft_tokens=k)
        assert result.tokens == expected
        # The first token comes from the prefill; each round then yields k + 1.
        assert result.stats.rounds == -(-63 // (k + 1))
        assert result.stats.accepted == result.stats.drafted
        assert result.finish_reason == "length"


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["e2b", "unified", "unified-shared"])
def test_transformers_assisted_generation_agrees(checkpoints, geometry):
    target = checkpoints.target(geometry)
    drafter = checkpoints.assistant(target, centroids=geometry != "unified")
    spec = _spec(target, drafter)
    ids = prompt(2 * WINDOW + 3, 11)
    expected = oracle.reference_greedy(target, ids, 20, assistant_path=drafter, num_assistant_tokens=4)
    assert generate(spec, ids, max_tokens=20, draft_tokens=4).tokens == until_eos(expected)


def test_eos_ends_generation_exactly(checkpoints):
    spec = _spec(checkpoints.target("dense"), None)
    ids = prompt(10, 3)
    free = _plain(spec, ids, 40)
    eos = free[5]
    cut = free[: free.index(eos)]
    spec_eos = SpecModel(target=spec.target, drafter=None, tokenizer=None, eos_token_ids=frozenset({eos}))
    for k, s in ((0, spec_eos), (4, standin(spec_eos, [ids], 40))):
        result = generate(s, ids, max_tokens=40, draft_tokens=k)
        assert result.tokens == cut
        assert result.finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 9])
def test_max_tokens_is_exact(checkpoints, max_tokens):
    spec = _spec(checkpoints.target("dense"), None)
    ids = prompt(12, 5)
    s = standin(spec, [ids], 16)
    for k in (0, 1, 4, 8):
        result = generate(s, ids, max_tokens=max_tokens, draft_tokens=k)
        assert len(result.tokens) == max_tokens
        assert result.finish_reason == "length"


@pytest.mark.slow
@SETTINGS
@given(
    geometry=st.sampled_from(oracle.GEOMETRIES),
    lengths=st.lists(st.integers(1, 4 * WINDOW), min_size=1, max_size=8),
    k=st.integers(0, 6),
    seed=st.integers(0, 1000),
    error_rate=st.sampled_from([0.0, 0.25]),
)
def test_batch_rows_equal_single_generation(checkpoints, geometry, lengths, k, seed, error_rate):
    spec = _spec(checkpoints.target(geometry), None)
    prompts = [prompt(n, seed + i) for i, n in enumerate(lengths)]
    # Rows finish at different times: different max_tokens per row are not an
    # option of one call, so EOS (random model) and the shared limit do it.
    n = 20
    expected = [_plain(spec, p, n) for p in prompts]
    results = generate_batch(standin(spec, prompts, n, error_rate, seed), prompts, max_tokens=n, draft_tokens=k)
    assert [r.tokens for r in results] == expected


@pytest.mark.parametrize("geometry", ["31b", "unified", "unified-shared"])
def test_batch_with_real_drafter_equals_single(checkpoints, geometry):
    target = checkpoints.target(geometry)
    spec = _spec(target, checkpoints.assistant(target, centroids=geometry == "unified-shared"))
    prompts = [prompt(n, n) for n in (1, 9, 30, 4, 17, 2, 25, 8)]
    results = generate_batch(spec, prompts, max_tokens=15, draft_tokens=3)
    assert [r.tokens for r in results] == [_plain(spec, p, 15) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("geometry", oracle.UNIFIED_GEOMETRIES)
def test_unified_pairs_are_exact_for_every_k(checkpoints, geometry):
    """The 12B's decoder with its real (random) drafter: every k, one row and a batch, equal
    transformers' greedy output, prompts past the sliding window several times over."""
    target = checkpoints.target(geometry, multimodal=True, published=True)
    spec = _spec(target, checkpoints.assistant(target, centroids=geometry == "unified-shared", published=True))
    prompts = [prompt(n, 40 + n) for n in (4 * WINDOW + 3, 2, WINDOW + 1)]
    expected = [until_eos(oracle.reference_greedy(target, p, 20)) for p in prompts]
    for k in range(1, 9):
        assert generate(spec, prompts[0], max_tokens=20, draft_tokens=k).tokens == expected[0]
        assert [r.tokens for r in generate_batch(spec, prompts, max_tokens=20, draft_tokens=k)] == expected
