"""How heads split over ranks, and the clear errors where no split works (one process: sharding
only needs a group's size and rank; the collectives run in tests/test_distributed.py)."""

from __future__ import annotations

import pytest

from mlx_specdec import ConfigError, ShardError
from mlx_specdec.loading import load_target
from mlx_specdec.models.gemma4 import HeadSplit, split_heads


class Rank:
    """Stands in for an mx.distributed group at shard time (size and rank are all it reads)."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_heads_and_their_kv_heads_split_evenly():
    assert [split_heads(8, 4, 2, r) for r in range(2)] == [HeadSplit(0, 4, 0, 2), HeadSplit(4, 8, 2, 4)]
    assert [split_heads(8, 2, 4, r) for r in range(4)] == [
        HeadSplit(0, 2, 0, 1), HeadSplit(2, 4, 0, 1), HeadSplit(4, 6, 1, 2), HeadSplit(6, 8, 1, 2)]


def test_one_global_kv_head_is_kept_by_every_rank():
    assert [split_heads(4, 1, 2, r) for r in range(2)] == [HeadSplit(0, 2, 0, 1), HeadSplit(2, 4, 0, 1)]


@pytest.mark.parametrize("heads, kv_heads, size, message", [
    (6, 2, 4, "6 attention heads do not split over 4 processes"),
    (12, 3, 2, "rank 0's queries would read parts of 2 K/V heads"),
])
def test_no_split_is_a_clear_error(heads, kv_heads, size, message):
    # Every rank refuses, not only the one whose split fails: none is left waiting for the others.
    for rank in range(size):
        with pytest.raises(ShardError, match=message):
            split_heads(heads, kv_heads, size, rank)


def test_a_model_that_does_not_split_is_refused_before_it_is_read(checkpoints):
    target = load_target(checkpoints.target("dense"))
    with pytest.raises(ShardError, match="4 attention heads do not split over 3 processes") as e:
        target.shard(Rank(3, 0))
    assert isinstance(e.value, ConfigError)  # the CLI turns it into one line and exit code 1


def test_sharded_layers_keep_this_ranks_slices(checkpoints):
    # 31B-like: 4 query heads; sliding layers 2 K/V heads (one per rank), full layers 1 (kept whole).
    target = load_target(checkpoints.target("31b"))
    target.shard(Rank(2, 1))
    sliding, full = target.model.layers[0].self_attn, target.model.layers[2].self_attn
    assert (sliding.n_heads, sliding.n_kv_heads, full.n_heads, full.n_kv_heads) == (2, 1, 2, 1)
    assert sliding.q_proj.weight.shape == (2 * 8, 48) and sliding.k_proj.weight.shape == (8, 48)
    assert full.k_proj.weight.shape == (16, 48)  # the one global K/V head, whole
    assert target.model.layers[0].mlp.gate_proj.weight.shape == (40, 48)
    assert target.model.layers[0].mlp.down_proj.weight.shape == (48, 40)
