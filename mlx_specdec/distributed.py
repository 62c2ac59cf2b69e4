"""One model over several processes (started by ``mlx.launch``): the group, and one decision per round.

The models shard themselves (``Model.shard`` and ``Drafter.shard``: tensor parallelism with
mlx.nn's sharded layers, two all-reduces of the hidden state per layer). What the loop needs
besides is that every rank takes the same decisions: every rank runs the same loop, and each
collective inside the models must be entered by all ranks with the same shapes, so a rank that
drafted another k, accepted another number of tokens or ended a row the others kept would wait
forever at its next all-reduce. Greedy logits do come out of the all-reduces bitwise equal on
every rank (the tests check it), but the policy's k rests on times each rank measures for
itself, an unseeded sampler draws its seed per process, and with more than two ranks a sum's
order may differ. So rank 0 decides and the others take its word: a broadcast, written as an
all_sum of the value masked to rank 0, a few bytes per round next to the per-layer all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .policy import Decision

def world() -> mx.distributed.Group | None:
    """The group this process was started in by ``mlx.launch``, or None when it runs alone."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def is_main(group: mx.distributed.Group | None) -> bool:
    """Whether this process talks to the user (rank 0, or the only process)."""
    return group is None or group.rank() == 0


def from_rank0(group: mx.distributed.Group | None, x: mx.array) -> mx.array:
    """``x`` as rank 0 holds it, on every rank.

    Every rank's sum depends on its own ``x`` (masked, not replaced by zeros): graphs of the same
    shape on every rank evaluate their collectives in the same order, where a rank whose sum
    depended on nothing could run it before the model's all-reduces the others are waiting in."""
    if group is None:
        return x
    return mx.distributed.all_sum(mx.where(mx.array(group.rank() == 0), x, mx.zeros_like(x)), group=group)


def agree(group: mx.distributed.Group | None, decision: Decision) -> Decision:
    """Rank 0's decision on every rank: k and whether it probes."""
    if group is None:
        return decision
    k, probe = from_rank0(group, mx.array([decision.k, int(decision.probe)], dtype=mx.int32)).tolist()
    if group.rank() == 0:
        return decision
    return Decision(k, f"k={k} decided by rank 0", bool(probe))


def share_text(group: mx.distributed.Group | None, text: str | None) -> str | None:
    """Rank 0's text (None for none, e.g. end of input) on every rank: what rank 0 read from
    the terminal or stdin, which the other ranks cannot read."""
    if group is None:
        return text
    data = list(text.encode()) if text is not None and group.rank() == 0 else []
    n = from_rank0(group, mx.array([len(data) if text is not None else -1], dtype=mx.int32)).item()
    if n < 0:
        return None
    padded = mx.array(data if group.rank() == 0 else [0] * n, dtype=mx.int32)
    return bytes(from_rank0(group, padded).tolist()).decode() if n else ""


def share_flag(group: mx.distributed.Group | None, flag: bool) -> bool:
    """Rank 0's flag on every rank (e.g. "the user stopped the answer": all ranks stop together)."""
    return bool(from_rank0(group, mx.array([int(flag)], dtype=mx.int32)).item()) if group is not None else flag


@dataclass(frozen=True)
class Footprint:
    """What one process holds after loading: the weights it keeps against the whole model's,
    and the memory MLX had in use once loading was done."""

    processes: int
    weight_bytes: int  # this rank's weights (its slices plus the replicated parts)
    unsharded_bytes: int  # the same model's weights in one process
    active_bytes: int  # mx.get_active_memory() after loading, less what was in use before

    def line(self) -> str:
        mb = 1024 * 1024
        share = f" ({self.weight_bytes / self.unsharded_bytes:.0%} of {self.unsharded_bytes / mb:.1f} MB unsharded)"
        return (f"processes {self.processes} · weights per process {self.weight_bytes / mb:.1f} MB"
                + (share if self.processes > 1 else "")
                + f" · active memory after load {self.active_bytes / mb:.1f} MB")

    def as_dict(self) -> dict:
        return dict(vars(self))


def parameter_bytes(*models: nn.Module | None) -> int:
    """The bytes of the arrays these models hold (a drafter's share of the target's embedding excluded)."""
    return sum(v.nbytes for m in models if m is not None for _, v in tree_flatten(m.parameters()))


__all__ = ["Footprint", "agree", "from_rank0", "is_main", "share_flag", "share_text",
           "parameter_bytes", "world"]
