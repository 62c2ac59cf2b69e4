"""distill's settings: every knob of a run, checked when made."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InputError
from ...policy import K_MAX



FEEDS = ("data", "drafter")


@dataclass(frozen=True)
class Settings:
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 256
    draft_steps: int = 4  # S: steps unrolled per position
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    centroid_weight: float = 1.0
    feed: str = "data"
    eval_every: int = 100
    eval_sequences: int = 8  # held-out sequences for the teacher-forced estimate
    eval_prompts: int = 8  # held-out prompts for the loop's acceptance
    eval_prompt_len: int = 64
    eval_new_tokens: int = 48
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (1 <= self.draft_steps <= K_MAX, f"draft steps must be in 1..{K_MAX}, got {self.draft_steps}"),
            (self.seq_len >= self.draft_steps + 2,
             f"seq len must be >= draft steps + 2 = {self.draft_steps + 2}, got {self.seq_len}"),
            (self.feed in FEEDS, f"feed must be one of {', '.join(FEEDS)}, got {self.feed!r}"),
            (self.eval_every >= 1 and self.checkpoint_every >= 1, "eval/checkpoint intervals must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
