"""The training loop: AdamW steps, checkpoints and resuming, progress events and the report."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ...errors import InputError
from ...loading import DTYPES, SpecModel
from ...models import assistant

from .settings import Settings
from .data import Data
from .drafter import save_drafter
from .objective import teacher, loss_terms
from .evaluate import Acceptance, evaluate_teacher_forced, evaluate_loop


@dataclass
class Progress:
    """One training step's report."""

    step: int
    steps: int
    loss: float
    kl_by_step: list[float]
    lr: float
    tokens_per_second: float
    elapsed: float
    eval: Acceptance | None = None  # teacher-forced, on eval steps


@dataclass
class Report:
    """Before/after acceptance on held-out text and where the drafter was written."""

    out: Path
    steps: int  # the drafter's training steps in all, earlier runs' included
    seconds: float  # this run's
    resumed_from: int = 0  # the checkpoint's step this run started from (0: a fresh start)
    before: dict[str, Acceptance] = field(default_factory=dict)  # at step 0, kept in the checkpoint
    after: dict[str, Acceptance] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"out": str(self.out), "steps": self.steps, "resumed_from": self.resumed_from,
                "seconds": self.seconds, "before": acceptances_as_dict(self.before),
                "after": acceptances_as_dict(self.after)}


def acceptances_as_dict(d: dict[str, Acceptance]) -> dict:
    return {method: a.as_dict() for method, a in d.items()}


CHECKPOINT_DIR = "checkpoint"


class Trainer:
    """AdamW on the drafter's parameters (its layers, projections and own head; the target,
    and with it the drafter's input embedding, stay frozen)."""

    def __init__(self, spec: SpecModel, drafter: assistant.Drafter, config: dict, data: Data, settings: Settings):
        if any(k.endswith(".scales") for k, _ in tree_flatten(drafter.parameters())):
            raise InputError("cannot train a quantized drafter: start from a float (unquantized) drafter")
        self.spec, self.drafter, self.config, self.data, self.settings = spec, drafter, config, data, settings
        s = settings
        drafter.freeze(keys=["layer_scalar", "token_ordering"], strict=False)
        warmup = max(1, min(s.warmup, s.steps // 2))
        schedule = optim.join_schedules(
            [optim.linear_schedule(s.lr * 0.01, s.lr, warmup),
             optim.cosine_decay(s.lr, max(1, s.steps - warmup), s.lr * s.min_lr_ratio)],
            [warmup],
        )
        self.optimizer = optim.AdamW(learning_rate=schedule, betas=(0.9, 0.98), weight_decay=s.weight_decay)
        self.step = 0
        self._grad = nn.value_and_grad(drafter, lambda d, t: loss_terms(d, t, s))

    def train_step(self) -> tuple[float, list[float]]:
        t = teacher(self.spec.target, self.data.batch(self.step, self.settings), self.drafter.config.sliding_window)
        (loss, kls), grads = self._grad(self.drafter, t)
        grads, _ = optim.clip_grad_norm(grads, self.settings.grad_clip)
        self.optimizer.update(self.drafter, grads)
        mx.eval(loss, kls, self.drafter.parameters(), self.optimizer.state)
        self.step += 1
        return loss.item(), [k.item() for k in kls]

    def save_checkpoint(self, folder: Path, before: dict[str, Acceptance] | None = None) -> None:
        """Weights, optimizer state and step; ``before``: the acceptance measured at step 0, so
        that a resumed run's report still has it."""
        folder.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(folder / "drafter.safetensors"), dict(tree_flatten(self.drafter.parameters())))
        mx.save_safetensors(str(folder / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
        state = {"step": self.step, "settings": dataclasses.asdict(self.settings), "config": self.config,
                 "before": acceptances_as_dict(before or {})}
        tmp = folder / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(folder / "state.json")  # written last: a checkpoint counts once state.json exists

    def load_checkpoint(self, folder: Path) -> None:
        self.drafter.load_weights(str(folder / "drafter.safetensors"), strict=True)
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
        self.step = json.loads((folder / "state.json").read_text())["step"]
        mx.eval(self.drafter.parameters(), self.optimizer.state)


def read_checkpoint_state(out: Path) -> dict | None:
    file = out / CHECKPOINT_DIR / "state.json"
    return json.loads(file.read_text()) if file.exists() else None


def resume_drafter(spec: SpecModel, out: Path) -> tuple[assistant.Drafter, dict, dict]:
    """The drafter module and config of the checkpoint in ``out`` (weights loaded by the Trainer)."""
    state = read_checkpoint_state(out)
    if state is None:
        raise InputError(f"nothing to resume: no checkpoint in {out / CHECKPOINT_DIR}")
    config = state["config"]
    cfg = assistant.AssistantConfig.from_dict(config)
    assistant.check_compatible(cfg, spec.target.config, spec.target.drafter_sources())
    return assistant.Drafter(cfg, spec.target.embed_tokens), config, state


def distill(spec: SpecModel, drafter: assistant.Drafter, config: dict, data: Data, settings: Settings,
            out: Path, *, resume: bool = False, save_dtype: str = "bfloat16",
            evaluate_before: bool = True) -> Iterator[Progress | Report]:
    """Train ``drafter`` against ``spec.target``; yields a Progress per step and a Report last.

    Checkpoints (weights, optimizer state, step) go to ``out/checkpoint`` every
    ``settings.checkpoint_every`` steps; ``resume`` continues from there. The drafter folder
    (config.json + model.safetensors in ``save_dtype``) is written to ``out`` at the end.
    Interrupted (Ctrl-C while it trains, or the caller closing the generator), it saves a
    checkpoint at the step it reached before it ends, so ``resume`` loses nothing.
    """
    out = Path(out)
    if save_dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {save_dtype!r}")
    trainer = Trainer(spec, drafter, config, data, settings)
    report = Report(out, settings.steps, 0.0)
    if resume:
        trainer.load_checkpoint(out / CHECKPOINT_DIR)
        state = read_checkpoint_state(out)
        report.resumed_from = trainer.step
        report.before = {m: Acceptance.from_dict(m, d) for m, d in state.get("before", {}).items()}
    s = settings
    eval_seqs, prompts = data.eval_sequences(s), data.eval_prompts(s)

    def measure(into: dict):
        into["teacher-forced"] = evaluate_teacher_forced(spec, drafter, eval_seqs, s.draft_steps)
        into["loop"] = evaluate_loop(spec, drafter, prompts, s.draft_steps, s.eval_new_tokens)

    started = time.perf_counter()
    if evaluate_before and trainer.step == 0:
        measure(report.before)
    tokens = 0
    train_start = time.perf_counter()
    saved = trainer.step
    try:
        while trainer.step < s.steps:
            loss, kls = trainer.train_step()
            tokens += s.batch_size * s.seq_len
            lr = float(trainer.optimizer.learning_rate.item())
            progress = Progress(trainer.step, s.steps, loss, kls, lr,
                                tokens / (time.perf_counter() - train_start), time.perf_counter() - started)
            if trainer.step % s.eval_every == 0 or trainer.step == s.steps:
                progress.eval = evaluate_teacher_forced(spec, drafter, eval_seqs, s.draft_steps)
            if math.isnan(loss):
                raise InputError(f"the loss became NaN at step {trainer.step}: lower --lr")
            if trainer.step % s.checkpoint_every == 0 or trainer.step == s.steps:
                trainer.save_checkpoint(out / CHECKPOINT_DIR, report.before)
                saved = trainer.step
            yield progress
    except (KeyboardInterrupt, GeneratorExit):
        if trainer.step > saved:
            trainer.save_checkpoint(out / CHECKPOINT_DIR, report.before)
        raise
    save_drafter(drafter, config, out, save_dtype)
    measure(report.after)
    report.steps = trainer.step
    report.seconds = time.perf_counter() - started
    (out / "distill_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    yield report
