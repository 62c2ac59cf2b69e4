"""The position-addressed cache directly: which position each slot holds after a ring wraps,
what a query may see when a rejected draft is still in its slot, and rows leaving (`select`)
and joining (`stack`) a batch. Caches come from a tiny target's own `make_cache`."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_specdec.cache import Cache, Step
from mlx_specdec.loading import load
from mlx_specdec.models.gemma4 import FULL, SLIDING

MAX_STEP = 3


@pytest.fixture(scope="module")
def target(checkpoints):
    return load(checkpoints.target("dense"), drafter=False).target


def _ring(target, batch: int = 1) -> tuple[Cache, int, int]:
    """A cache, the index of its first sliding layer, and the window."""
    cache = target.make_cache(batch, max_step=MAX_STEP)
    layer = target.config.layer_types.index(SLIDING)
    return cache, layer, cache.tables[SLIDING].window


def _write(cache: Cache, layer: int, starts: tuple[int, ...], length: int) -> None:
    """A pass over ``length`` tokens per row whose K/V are their own positions (as floats)."""
    plans = cache.plan(Step(starts, length))
    pos = np.array(starts)[:, None] + np.arange(length)[None, :]
    kv = mx.array(pos, dtype=mx.float32)[:, None, :, None]  # (B, heads 1, L, dim 1)
    cache.layers[layer].update_and_fetch(kv, kv, plans[SLIDING])
    mx.eval(*cache.arrays())


def _held(cache: Cache, row: int) -> list[int]:
    return np.array(cache.tables[SLIDING].positions[row]).tolist()


def _visible(cache: Cache, row: int, query: int) -> list[int]:
    """The positions a query at ``query`` may attend to, by the table's own mask."""
    table = cache.tables[SLIDING]
    keys = table.positions[row : row + 1]
    mask = table.mask(mx.array([[query]], dtype=mx.int32), keys)
    return sorted(int(k) for k, m in zip(np.array(keys[0]), np.array(mask).reshape(-1)) if m)


def test_a_ring_after_wrap_holds_the_newest_positions_and_masks_a_rejected_draft(target):
    cache, layer, W = _ring(target)
    C = cache.tables[SLIDING].capacity
    n = C + 3
    _write(cache, layer, (0,), n)  # a prefill longer than the ring: it wraps
    assert sorted(_held(cache, 0)) == list(range(n - C, n))
    _write(cache, layer, (n,), 3)  # verify n, n + 1, n + 2: then n + 1 and n + 2 are rejected
    _write(cache, layer, (n + 1,), 1)  # the next round writes n + 1 again; n + 2 stays in its slot
    held = _held(cache, 0)
    assert n + 2 in held and sorted(held) == list(range(n + 3 - C, n + 3))
    q = n + 1
    assert _visible(cache, 0, q) == list(range(q - W + 1, q + 1))  # the window, never the stale n + 2
    # The K/V in each slot is the position the table says it holds.
    assert np.array(cache.layers[layer].keys[0, 0, :, 0]).tolist() == held


def test_select_keeps_rows_and_stack_joins_them(target):
    cache, layer, W = _ring(target, batch=2)
    _write(cache, layer, (5, 2), 3)  # rows at different positions
    kept = cache.select([1])
    assert kept.batch_size == 1 and _held(kept, 0) == _held(cache, 1)
    np.testing.assert_array_equal(np.array(kept.layers[layer].keys[0]), np.array(cache.layers[layer].keys[1]))

    short, _, _ = _ring(target)
    _write(short, layer, (0,), 2)
    joined = Cache.stack([kept, short])
    assert joined.batch_size == 2
    assert [sorted(p for p in _held(joined, b) if p >= 0) for b in (0, 1)] == [[2, 3, 4], [0, 1]]
    _write(joined, layer, (5, 2), 1)  # the joined batch decodes on: each row at its own position
    assert _visible(joined, 0, 5) == [p for p in range(2, 6) if p > 5 - W]
    assert _visible(joined, 1, 2) == [0, 1, 2]


@pytest.mark.parametrize("chunks", [(40,), (17, 23), (5, 30, 5)])
def test_a_long_step_attends_by_blocks_of_queries_as_it_would_all_at_once(target, monkeypatch, chunks):
    # Each block of queries reads only the keys it may see (the causal part, a sliding layer's
    # window; a later chunk's also the ring before it): the same hidden states as one block.
    import mlx_specdec.cache as cache_module

    tokens = mx.array([[(7 * i) % 50 + 3 for i in range(sum(chunks))]])

    plan = cache_module.PositionTable.plan

    def prefill(block: int) -> tuple[np.ndarray, set[str]]:
        monkeypatch.setattr(cache_module, "ATTENTION_BLOCK", block)
        kinds = set()

        def spy(table, step):
            out = plan(table, step)
            if isinstance(out.mask, cache_module.Blocks):
                kinds.add(SLIDING if table.ring else FULL)
            return out

        monkeypatch.setattr(cache_module.PositionTable, "plan", spy)
        cache, start, outs = target.make_cache(1, max_step=MAX_STEP), 0, []
        for n in chunks:
            outs.append(target(tokens[:, start : start + n], Step((start,), n), cache))
            start += n
        return np.array(mx.concatenate(outs, axis=1)), kinds

    whole, none = prefill(10**6)
    blocked, kinds = prefill(4)
    assert not none and kinds == set(target.config.layer_types)
    assert target.config.sliding_window < max(chunks)  # the window cuts inside a step
    # Blocks sum in another order than one pass: with OpenBLAS preloaded (as the benchmarks run)
    # one element in 1920 moved by 1.08e-5. A wrong mask moves them by tenths.
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=5e-5)
