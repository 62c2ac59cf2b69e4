"""K/V caches addressed by token position, so that rolling back is free.

Every row of a batch has its own positions. A step writes the K/V of tokens
at positions ``start[b] .. start[b] + L - 1`` into slots ``position % capacity``
and records, per slot, which position it holds. Attention masks are built from
those recorded positions, never from slot order. Two consequences:

* Rejecting drafts needs no cache edit. Their entries sit at positions beyond
  the row's accepted length; causality masks them until the next step writes
  the same positions again (gpt-fast's trick, made per row).
* Sliding-window layers use a ring of ``window + max_step`` slots. A step of at
  most ``max_step`` tokens overwrites only slots whose positions are out of
  every query's window, even when the step is later rejected. mlx-lm's
  ``RotatingKVCache`` cannot be trimmed once it wraps; this one never needs
  trimming.

Full-attention layers use the same structure with a capacity that grows and
never wraps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

# Full-attention buffers grow in steps of this many slots (as mlx-lm's KVCache).
GROW_STEP = 256

# A long step (a prefill chunk) attends by blocks of this many queries, each over only the keys
# it may see: the causal half and, in sliding layers, the window. Attention over a whole chunk
# computes every score and its exp, masked or not, which on the CPU made up half a 512-token
# prefill; by blocks of 64 the demo's 512-token prefill computes about 40% of them.
ATTENTION_BLOCK = 64


@dataclass(frozen=True)
class Blocks:
    """A long step's attention as blocks of queries: (first query, end, first key, end, mask) each,
    the keys a contiguous range covering every key the block's queries see, and the mask what
    attention takes ("causal": queries aligned to the range's end; None: all visible)."""

    parts: tuple[tuple[int, int, int, int, "mx.array | str | None"], ...]


def _blocks_of(mask: np.ndarray) -> "Blocks | mx.array | str | None":
    """A host (queries, keys) mask as blocks of ATTENTION_BLOCK queries when the step is long."""
    length = mask.shape[0]
    if length < 2 * ATTENTION_BLOCK:
        return mx.array(mask)
    parts = []
    for q0 in range(0, length, ATTENTION_BLOCK):
        q1 = min(q0 + ATTENTION_BLOCK, length)
        seen = np.flatnonzero(mask[q0:q1].any(axis=0))
        k0, k1 = int(seen[0]), int(seen[-1]) + 1
        part = mask[q0:q1, k0:k1]
        causal = np.tril(np.ones(part.shape, dtype=bool), k=part.shape[1] - part.shape[0])
        parts.append((q0, q1, k0, k1, None if part.all() else "causal" if (part == causal).all() else mx.array(part)))
    return Blocks(tuple(parts))


def _causal_blocks(start: int, length: int) -> "Blocks | str":
    """Causal attention of positions start.. over keys 0..end-1 (slot = position), by blocks when long."""
    if length < 2 * ATTENTION_BLOCK:
        return "causal"
    return Blocks(tuple((q0, min(q0 + ATTENTION_BLOCK, length), 0, start + min(q0 + ATTENTION_BLOCK, length), "causal")
                        for q0 in range(0, length, ATTENTION_BLOCK)))


@dataclass(frozen=True)
class Step:
    """Where a forward pass writes: row b gets positions starts[b] + 0..length-1."""

    starts: tuple[int, ...]
    length: int

    @property
    def end(self) -> int:
        return max(self.starts) + self.length

    @property
    def uniform(self) -> bool:
        """Every row starts at the same position (always at B = 1)."""
        return min(self.starts) == max(self.starts)

    def positions(self) -> mx.array:
        starts = mx.array(self.starts, dtype=mx.int32)[:, None]
        return starts + mx.arange(self.length, dtype=mx.int32)[None, :]


@dataclass
class Plan:
    """How one layer type reads and writes the cache in one step.

    Writes go either to ``slots`` (B, written) by scatter, for rows at different
    positions, or, when every row is at the same position, by slice to the
    ``writes`` pieces ``(slot, first token, count)``. Attention then reads, in
    this order of precedence: only the step's own keys (``fresh``: a prefill
    from position 0), the old buffer followed by the new keys (``concat``: the
    step is longer than a ring can take without overwriting keys it still
    needs), or buffer slots ``read`` = (lo, hi) (all slots in use when None).
    ``mask`` is a boolean array broadcastable to (B, 1, L, keys), "causal", None
    when every key read is visible to every query, or `Blocks` for a long step.
    """

    slots: mx.array | None
    written: int
    concat: bool
    mask: mx.array | str | None
    writes: tuple[tuple[int, int, int], ...] | None = None
    read: tuple[int, int] | None = None
    fresh: bool = False


class PositionTable:
    """Which position each slot holds, shared by all layers of one attention type."""

    def __init__(self, batch: int, window: int | None, capacity: int):
        self.window = window
        self.capacity = capacity
        self.positions = mx.full((batch, capacity), -1, dtype=mx.int32)
        # Slots in use (full attention only): attention never reads past this.
        self.used = 0

    @property
    def ring(self) -> bool:
        return self.window is not None

    def plan(self, step: Step) -> Plan:
        """Record the step's positions and say how attention reads and writes for it."""
        if not self.ring and step.end > self.capacity:
            grow = -(-(step.end - self.capacity) // GROW_STEP) * GROW_STEP
            pad = mx.full((self.positions.shape[0], grow), -1, dtype=mx.int32)
            self.positions = mx.concatenate([self.positions, pad], axis=1)
            self.capacity += grow
        if step.uniform:
            return self._plan_uniform(step.starts[0], step.length)
        q_pos = step.positions()
        concat = self.ring and step.length > self.capacity - self.window + 1
        written = min(step.length, self.capacity)
        slots = q_pos[:, step.length - written :] % self.capacity
        if concat:
            # Old entries at positions this step rewrites are stale drafts.
            old = self.positions
            old = mx.where(old < q_pos[:, :1], old, -1)
            k_pos = mx.concatenate([old, q_pos], axis=1)
        new_positions = mx.put_along_axis(
            self.positions, slots, q_pos[:, step.length - written :], axis=1
        )
        self.used = self.capacity if self.ring else max(self.used, step.end)
        if not concat:
            k_pos = new_positions[:, : self.used]
        self.positions = new_positions
        return Plan(slots, written, concat, self.mask(q_pos, k_pos))

    def _plan_uniform(self, start: int, length: int) -> Plan:
        """Every row at ``start``: slice writes, and a mask from arithmetic on the host.

        Rows at one position have the same layout: every position before ``start``
        was written (by the prefill or a verify pass) and, in a ring, a slot holds
        the newest position that maps to it, except slots a rejected draft
        overwrote, whose old positions are out of every window (see the module
        docstring). So which slot holds what follows from ``start`` alone.
        """
        end, C, W = start + length, self.capacity, self.window
        if not self.ring:
            writes = self._write(start, 0, length)
            self.used = max(self.used, end)
            return Plan(None, length, False, None if length == 1 else _causal_blocks(start, length), writes, (0, end))
        concat = length > C - W + 1
        written = min(length, C)
        writes = self._write(end - written, length - written, written)
        self.used = C
        q = np.arange(start, end)[:, None]
        if concat:
            k = np.arange(start, end)[None, :]
            if start == 0:
                mask = (k <= q) & (k > q - W)
                return Plan(None, written, True, _host_mask(mask, length, W), writes, fresh=True)
            # The ring as it was before this step, then the new keys.
            old = (start - 1) - ((start - 1 - np.arange(C)) % C)
            k = np.concatenate([old[None, :], k], axis=1)
            return Plan(None, written, True, _blocks_of((k >= 0) & (k <= q) & (k > q - W)), writes)
        lo = max(0, start - W + 1)  # the oldest position any query of the step sees
        if lo // C == (end - 1) // C:  # the positions lo..end-1 lie in order in the ring
            k = np.arange(lo, end)[None, :]
            mask = None if length == 1 else _host_mask((k <= q) & (k > q - W), length, W, end - lo)
            return Plan(None, written, False, mask, writes, (lo % C, lo % C + end - lo))
        if length == 1 and start >= C:  # a decode step in a full ring: the mask repeats every C steps
            return Plan(None, written, False, _ring_mask(C, W, start % C), writes, (0, C))
        slot = np.arange(C)[None, :]
        k = q - ((q - slot) % C)  # the position each slot holds in each query's view
        return Plan(None, written, False, mx.array((k >= 0) & (k > q - W)), writes, (0, C))

    def _write(self, position: int, first: int, count: int) -> tuple[tuple[int, int, int], ...]:
        """Slice writes of ``count`` tokens from ``position`` on (wrapping in a ring), recorded."""
        pieces, slot = [], position % self.capacity
        while count:
            n = min(count, self.capacity - slot)
            pieces.append((slot, first, n))
            self.positions[:, slot : slot + n] = mx.arange(position, position + n, dtype=mx.int32)
            position, first, count, slot = position + n, first + n, count - n, 0
        return tuple(pieces)

    def mask(self, q_pos: mx.array, k_pos: mx.array) -> mx.array:
        q = q_pos[:, None, :, None]
        k = k_pos[:, None, None, :]
        mask = (k >= 0) & (k <= q)
        if self.ring:
            mask = mask & (k > q - self.window)
        return mask


@lru_cache(maxsize=4096)
def _ring_mask(capacity: int, window: int, phase: int) -> mx.array:
    """The mask of one query at a position ``phase`` (mod capacity) of a ring it has filled: which
    slots hold one of its ``window`` newest positions. Built once per phase, not every step."""
    slot = np.arange(capacity)
    return mx.array(((phase - slot) % capacity) < window)[None, :]


def _host_mask(mask: np.ndarray, length: int, window: int, keys: int | None = None):
    """"causal" where the window cuts nothing, so attention needs no mask array."""
    if (keys if keys is not None else length) <= window:
        return "causal"
    return _blocks_of(mask)


class LayerKV:
    """The K/V buffers of one non-shared attention layer."""

    def __init__(self, table: PositionTable):
        self.table = table
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def _ensure(self, keys: mx.array, values: mx.array):
        B, H, _, _ = keys.shape
        capacity = self.table.capacity
        if self.keys is None:
            self.keys = mx.zeros((B, H, capacity, keys.shape[-1]), dtype=keys.dtype)
            self.values = mx.zeros((B, H, capacity, values.shape[-1]), dtype=values.dtype)
        elif self.keys.shape[2] < capacity:
            grow = capacity - self.keys.shape[2]
            self.keys = mx.pad(self.keys, [(0, 0), (0, 0), (0, grow), (0, 0)])
            self.values = mx.pad(self.values, [(0, 0), (0, 0), (0, grow), (0, 0)])

    def update_and_fetch(self, keys: mx.array, values: mx.array, plan: Plan):
        """Write the step's K/V where the plan says; return the K/V attention reads."""
        self._ensure(keys, values)
        if plan.concat and not plan.fresh:
            all_keys = mx.concatenate([self.keys, keys], axis=2)
            all_values = mx.concatenate([self.values, values], axis=2)
        if plan.writes is not None:
            for slot, first, n in plan.writes:
                self.keys[:, :, slot : slot + n] = keys[:, :, first : first + n]
                self.values[:, :, slot : slot + n] = values[:, :, first : first + n]
        else:
            self._scatter(keys, values, plan)
        if plan.fresh:
            return keys, values
        if plan.concat:
            return all_keys, all_values
        lo, hi = plan.read or (0, self.table.used)
        return self.keys[:, :, lo:hi], self.values[:, :, lo:hi]

    def _scatter(self, keys: mx.array, values: mx.array, plan: Plan) -> None:
        L = keys.shape[2]
        for name, new in (("keys", keys), ("values", values)):
            idx = mx.broadcast_to(
                plan.slots[:, None, :, None], (new.shape[0], new.shape[1], plan.written, new.shape[-1])
            )
            setattr(self, name, mx.put_along_axis(getattr(self, name), idx, new[:, :, L - plan.written :], axis=2))

    def state(self):
        return self.keys, self.values


class Cache:
    """Everything the target remembers: one position table per attention type,
    one K/V buffer per non-shared layer (KV-shared layers read their source's)."""

    def __init__(self, tables: dict[str, PositionTable], layers: list[LayerKV], max_step: int):
        self.tables = tables
        self.layers = layers
        # Longest decode step the rings were sized for: a longer one would overwrite keys
        # still in a window when it is rejected, so the loop never drafts past max_step - 1.
        self.max_step = max_step

    @property
    def batch_size(self) -> int:
        return next(iter(self.tables.values())).positions.shape[0]

    def plan(self, step: Step) -> dict[str, Plan]:
        if len(step.starts) != self.batch_size:
            raise ValueError(
                f"step has {len(step.starts)} rows but the cache holds {self.batch_size}"
            )
        return {kind: table.plan(step) for kind, table in self.tables.items()}

    def select(self, rows: list[int]) -> "Cache":
        """The cache of a subset of rows (finished rows leave the batch)."""
        idx = mx.array(rows, dtype=mx.int32)
        tables = {}
        for kind, t in self.tables.items():
            tables[kind] = PositionTable(len(rows), t.window, t.capacity)
            tables[kind].positions = t.positions[idx]
            tables[kind].used = t.used
        layers = []
        for layer in self.layers:
            new = LayerKV(tables[_kind_of(self.tables, layer.table)])
            if layer.keys is not None:
                new.keys, new.values = layer.keys[idx], layer.values[idx]
            layers.append(new)
        return Cache(tables, layers, self.max_step)

    @staticmethod
    def stack(caches: list["Cache"]) -> "Cache":
        """One batched cache from per-row caches (each row prefilled alone)."""
        first = caches[0]
        tables = {}
        for kind, t in first.tables.items():
            parts = [c.tables[kind] for c in caches]
            capacity = max(p.capacity for p in parts)
            tables[kind] = PositionTable(len(caches), t.window, capacity)
            tables[kind].positions = mx.concatenate(
                [_pad_axis(p.positions, capacity, 1, -1) for p in parts], axis=0
            )
            tables[kind].used = max(p.used for p in parts)
        layers = []
        for i, layer in enumerate(first.layers):
            new = LayerKV(tables[_kind_of(first.tables, layer.table)])
            if layer.keys is not None:
                capacity = new.table.capacity
                new.keys = mx.concatenate([_pad_axis(c.layers[i].keys, capacity, 2, 0) for c in caches])
                new.values = mx.concatenate([_pad_axis(c.layers[i].values, capacity, 2, 0) for c in caches])
            layers.append(new)
        return Cache(tables, layers, min(c.max_step for c in caches))

    def arrays(self) -> list[mx.array]:
        """All arrays the cache holds, for mx.eval."""
        out = [t.positions for t in self.tables.values()]
        for layer in self.layers:
            if layer.keys is not None:
                out += [layer.keys, layer.values]
        return out


def _kind_of(tables: dict[str, PositionTable], table: PositionTable) -> str:
    return next(kind for kind, t in tables.items() if t is table)


def _pad_axis(x: mx.array, size: int, axis: int, value) -> mx.array:
    if x.shape[axis] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return mx.pad(x, widths, constant_values=value)
