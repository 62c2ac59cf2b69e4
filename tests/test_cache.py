"""The position-addressed cache directly: which position each slot holds after a ring wraps,
what a query may see when a rejected draft is still in its slot, and rows leaving (`select`)
and joining (`stack`) a batch."""

import mlx.core as mx
import numpy as np

from mlx_specdec.cache import Cache, LayerKV, PositionTable, Step

WINDOW, MAX_STEP = 4, 3


def _ring(batch: int = 1) -> tuple[Cache, PositionTable]:
    table = PositionTable(batch, WINDOW, WINDOW + MAX_STEP)
    return Cache({"sliding": table}, [LayerKV(table)]), table


def _write(cache: Cache, starts: tuple[int, ...], length: int) -> None:
    """A pass over ``length`` tokens per row whose K/V are their own positions (as floats)."""
    plans = cache.plan(Step(starts, length))
    pos = np.array(starts)[:, None] + np.arange(length)[None, :]
    kv = mx.array(pos, dtype=mx.float32)[:, None, :, None]  # (B, heads 1, L, dim 1)
    cache.layers[0].update_and_fetch(kv, kv, plans["sliding"])
    mx.eval(*cache.arrays())


def _visible(table: PositionTable, row: int, query: int) -> list[int]:
    """The positions a query at ``query`` may attend to, by the table's own mask."""
    keys = table.positions[row : row + 1]
    mask = table.mask(mx.array([[query]], dtype=mx.int32), keys)
    return sorted(int(k) for k, m in zip(np.array(keys[0]), np.array(mask).reshape(-1)) if m)


def test_a_ring_after_wrap_holds_the_newest_positions_and_masks_a_rejected_draft():
    cache, table = _ring()
    _write(cache, (0,), 10)  # a prefill longer than the ring: it wraps
    assert sorted(np.array(table.positions[0]).tolist()) == list(range(3, 10))
    _write(cache, (10,), 3)  # verify 10, 11, 12: then 11 and 12 are rejected
    _write(cache, (11,), 1)  # the next round writes 11 again; 12 still sits in its slot
    held = np.array(table.positions[0]).tolist()
    assert 12 in held and sorted(held) == list(range(6, 13))
    assert _visible(table, 0, 11) == [8, 9, 10, 11]  # the window, and never the stale 12
    # The K/V in each slot is the position the table says it holds.
    keys = np.array(cache.layers[0].keys[0, 0, :, 0])
    assert keys.tolist() == held


def test_select_keeps_rows_and_stack_joins_them():
    cache, _ = _ring(batch=2)
    _write(cache, (5, 2), 3)  # rows at different positions
    kept = cache.select([1])
    assert kept.batch_size == 1
    np.testing.assert_array_equal(np.array(kept.tables["sliding"].positions[0]),
                                  np.array(cache.tables["sliding"].positions[1]))
    np.testing.assert_array_equal(np.array(kept.layers[0].keys[0]), np.array(cache.layers[0].keys[1]))

    short, _ = _ring()
    _write(short, (0,), 2)
    joined = Cache.stack([kept, short])
    assert joined.batch_size == 2
    rows = [sorted(p for p in np.array(joined.tables["sliding"].positions[b]).tolist() if p >= 0) for b in (0, 1)]
    assert rows == [[2, 3, 4], [0, 1]]
    assert _visible(joined.tables["sliding"], 1, 2) == [0, 1]
    _write(joined, (5, 2), 1)  # the joined batch decodes on: each row at its own position
    assert _visible(joined.tables["sliding"], 0, 5) == [2, 3, 4, 5]
    assert _visible(joined.tables["sliding"], 1, 2) == [0, 1, 2]
