"""The cases the distributed test runs, once in one process and once per rank under mlx.launch.

One function runs a whole plan on a loaded model, so the single-process reference and every rank
go through exactly the same calls (a rank that made one call more would hang the others).
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
import numpy as np

from mlx_specdec import generate, generate_batch
from mlx_specdec.cache import Step
from mlx_specdec.decode import target_kv
from mlx_specdec.loading import SpecModel
from tests.stand_in import StandInDrafter
from tests.helpers import prompt

MAX_TOKENS = 10
DRAFT_MODES = [0, 1, 2, 3, 4, 5, 6, 7, 8, "auto"]
STANDIN_KS = (1, 4, 8)


def cases(light: bool = False) -> list[dict]:
    """Greedy batches at every k and auto (a batch costs the ranks as many all-reduces as one
    prompt does), single prompts, and sampling with and without a seed; ``light``: three
    greedy batches (plain, k=3, auto)."""
    batch = [prompt(5, seed=2), prompt(11, seed=1), prompt(9, seed=3)]
    if light:
        return [{"prompts": batch, "k": k} for k in (0, 3, "auto")]
    greedy = [{"prompts": batch, "k": k} for k in DRAFT_MODES]
    single = [{"prompts": [prompt(11, seed=1)], "k": k} for k in (4, "auto")]
    sampled = [{"prompts": batch[:2], "k": 3, "temp": 1.0, "seed": s} for s in (7, None)]
    return greedy + single + sampled


def _digest(x: mx.array) -> str:
    return hashlib.sha256(np.array(x.astype(mx.float32)).tobytes()).hexdigest()


def _logits(spec: SpecModel, ids: list[int]) -> dict:
    """The prefill's logits and the drafter's first draft logits: their bits, and their values."""
    cache = spec.target.make_cache(1, max_step=9, drafter_window=spec.drafter.config.sliding_window)
    hidden = spec.target(mx.array([ids]), Step((0,), len(ids)), cache)
    logits = spec.target.logits(hidden)
    token = mx.argmax(logits[:, -1], axis=-1)
    draft = spec.drafter(token, hidden[:, -1:], mx.array([len(ids)]), target_kv(spec, cache))
    return {"target": np.array(logits[0]).tolist(), "target_bits": _digest(logits),
            "draft": np.array(draft.logits[0]).tolist(), "draft_bits": _digest(draft.logits)}


def _run(spec: SpecModel, case: dict) -> dict:
    kwargs = {"max_tokens": MAX_TOKENS, "draft_tokens": case["k"], "temperature": case.get("temp", 0.0),
              "seed": case.get("seed")}
    if len(case["prompts"]) == 1:
        results = [generate(spec, case["prompts"][0], **kwargs)]
    else:
        results = generate_batch(spec, case["prompts"], **kwargs)
    return {"tokens": [r.tokens for r in results], "accepted": [r.stats.accepted for r in results],
            "k_histogram": [[list(kv) for kv in sorted(r.stats.k_histogram.items())] for r in results]}


def standin(spec: SpecModel, prompts: list[list[int]]) -> SpecModel:
    """The target with a drafter that proposes its own continuation, wrong now and then: drafts
    accepted in part, so multi-token acceptance is exercised too."""
    endless = SpecModel(target=spec.target, drafter=None, tokenizer=None, group=spec.group)
    seqs = [p + generate(endless, p, max_tokens=MAX_TOKENS + 12, draft_tokens=0).tokens for p in prompts]
    drafter = StandInDrafter(spec.target, seqs, error_rate=0.3, seed=0)
    return SpecModel(target=spec.target, drafter=drafter, tokenizer=None, eos_token_ids=spec.eos_token_ids,
                     group=spec.group)


def run_plan(spec: SpecModel, light: bool = False) -> dict:
    """Every case with the model's own drafter, a few with the stand-in, and the logits."""
    out = {"logits": _logits(spec, prompt(10, seed=6)), "cases": [_run(spec, c) for c in cases(light)]}
    if light:
        return out
    prompts = [prompt(8, seed=8), prompt(6, seed=9)]
    stand_in = standin(spec, prompts)
    out["standin"] = [_run(stand_in, {"prompts": prompts, "k": k}) for k in STANDIN_KS]
    return out
