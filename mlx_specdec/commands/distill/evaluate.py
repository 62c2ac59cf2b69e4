"""Acceptance per draft position on held-out text, teacher-forced and in the real loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx

from ...loading import SpecModel
from ...models import assistant
from ...policy import DraftPolicy, expected_tokens

from .objective import teacher, teacher_forced_acceptance


@dataclass
class Acceptance:
    """Acceptance per draft position (a_i given positions < i accepted) and what it counts."""

    method: str  # "teacher-forced" or "loop"
    by_position: list[float]
    reached: list[int]

    def as_dict(self) -> dict:
        return {"by_position": self.by_position, "reached": self.reached,
                "expected_tokens_per_round": self.expected_tokens_per_round}

    @classmethod
    def from_dict(cls, method: str, d: dict) -> "Acceptance":
        return cls(method, list(d["by_position"]), list(d["reached"]))

    @classmethod
    def from_counts(cls, method: str, reached: list[int], accepted: list[int]) -> "Acceptance":
        return cls(method, [a / r if r else 0.0 for a, r in zip(accepted, reached)], reached)

    @property
    def expected_tokens_per_round(self) -> float:
        """E(k) for the measured rates, k = the positions measured."""
        return expected_tokens(self.by_position, len(self.by_position))


def evaluate_teacher_forced(spec: SpecModel, drafter: assistant.Drafter, sequences: mx.array,
                            steps: int, batch: int = 4) -> Acceptance:
    reached, accepted = [0] * steps, [0] * steps
    window = drafter.config.sliding_window
    for i in range(0, sequences.shape[0], batch):
        t = teacher(spec.target, sequences[i : i + batch], window)
        r, a = teacher_forced_acceptance(drafter, t, steps)
        reached = [x + y for x, y in zip(reached, r)]
        accepted = [x + y for x, y in zip(accepted, a)]
    return Acceptance.from_counts("teacher-forced", reached, accepted)


def evaluate_loop(spec: SpecModel, drafter: assistant.Drafter, prompts: list[list[int]],
                  draft_tokens: int, max_tokens: int) -> Acceptance:
    """Greedy speculative decoding of each held-out prompt with k = ``draft_tokens``."""
    from ...api import generate_batch

    model = dataclasses.replace(spec, drafter=drafter, policy=DraftPolicy())  # keep the caller's policy stats clean
    results = generate_batch(model, prompts, max_tokens=max_tokens, draft_tokens=draft_tokens)
    reached = [sum(r.stats.reached_by_position[i] for r in results) for i in range(draft_tokens)]
    accepted = [sum(r.stats.accepted_by_position[i] for r in results) for i in range(draft_tokens)]
    return Acceptance.from_counts("loop", reached, accepted)
