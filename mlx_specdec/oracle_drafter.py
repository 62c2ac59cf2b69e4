"""A stand-in drafter that proposes the target's own greedy continuation.

For tests and benchmarks: it is the ceiling of what drafting can give (every
draft accepted), where real random drafters almost never agree with a random
target and only exercise rejection. This stand-in knows each row's plain-greedy sequence and the
target's hidden state at every position of it; it recognises which row and
position it is drafting for by the hidden state it is handed (nearest
neighbour), so it works for batches whose rows leave as they finish. With
``error_rate`` > 0 it proposes a wrong token now and then, deterministically,
to exercise partial acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_specdec.cache import Step
from mlx_specdec.models.assistant import Draft


@dataclass(frozen=True)
class StandInConfig:
    sliding_window: int = 0


class StandInDrafter:
    def __init__(self, target, sequences: list[list[int]], error_rate: float = 0.0, seed: int = 0):
        self.config = StandInConfig()
        self.vocab = target.config.vocab_size
        self.sequences = [list(s) for s in sequences]
        self.hiddens = []
        for seq in self.sequences:
            cache = target.make_cache(1, max_step=len(seq))
            h = target(mx.array([seq]), Step((0,), len(seq)), cache)
            self.hiddens.append(np.array(h[0]))
        self.error_rate = error_rate
        self.rng = np.random.default_rng(seed)

    def _locate(self, hidden: np.ndarray) -> tuple[int, int]:
        best, where = np.inf, (0, 0)
        for s, hs in enumerate(self.hiddens):
            d = np.abs(hs - hidden[None]).max(axis=-1)
            t = int(np.argmin(d))
            if d[t] < best:
                best, where = d[t], (s, t)
        assert best < 1e-3, f"stand-in drafter lost track of the sequence (distance {best})"
        return where

    def masks(self, position, kv):
        return None  # it reads no K/V

    def __call__(self, tokens, hidden, position, kv, masks=None) -> Draft:
        proposals, next_hidden = [], []
        for h in np.array(hidden[:, 0]):
            s, t = self._locate(h)
            seq = self.sequences[s]
            # hidden at t predicted seq[t + 1], the token being handed in; draft the one after.
            token = seq[t + 2] if t + 2 < len(seq) else 0
            if self.rng.random() < self.error_rate:
                token = (token + 1 + int(self.rng.integers(self.vocab - 1))) % self.vocab
            proposals.append(token)
            next_hidden.append(self.hiddens[s][min(t + 1, len(seq) - 1)])
        logits = np.zeros((len(proposals), self.vocab), dtype=np.float32)
        logits[np.arange(len(proposals)), proposals] = 10.0  # a confident one-hot
        logits = mx.array(logits)
        return Draft(logits=logits, candidates=None, hidden=mx.array(np.stack(next_hidden))[:, None])
