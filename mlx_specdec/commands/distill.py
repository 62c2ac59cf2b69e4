"""Distil a Gemma 4 assistant drafter against a frozen target, on the user's text.

What one training step does, for a batch of B token sequences of length L:

1. The target runs one parallel forward over each sequence (``target(tokens, Step, cache)``),
   which gives its final hidden state h at every position, its logits (the teacher) and, in
   the cache, the K/V the drafter reads (exactly what ``decode.target_kv`` hands the drafter
   at inference).
2. The drafter drafts from every position p = 1 .. L - S at once, as it would in a
   speculative round that starts at p: step 1 reads (embed(x_p), h_{p-1}) and the target's
   K/V at positions < p, and predicts token p + 1; steps 2 .. S stay at the same position p
   and read the drafter's own post-projected hidden state from the step before (as at
   inference) with the next token of the sequence, and predict tokens p + 2 .. p + S.
   The teacher for step s is the target's distribution at position p + s - 1, which is
   conditioned on exactly the tokens the drafter was fed (``feed="data"``, the default);
   ``feed="drafter"`` feeds the drafter's own greedy token instead, as it feeds itself at
   inference (the teacher then still conditions on the text's token where the two differ).
   Positions are vectorised as the query axis of one drafter call: queries at positions
   1 .. L - S attend the same K/V under a per-query mask (keys before the query, within the
   sliding window), so the K/V is never copied per position.
3. Loss: the mean over steps and positions of KL(target || drafter) over the full vocabulary.
   A drafter with the centroid head also learns to pick clusters: a cross-entropy of its
   centroid scores against the target's probability mass per cluster (the head scores only
   the tokens of its top clusters at inference, so the right cluster must rank high).

Memory is dominated by vocabulary-sized arrays, about (2 + 3 S) * B * L * V * 4 bytes: with
Gemma's 262k vocabulary keep B * L near 512 (about 7.5 GB at S = 4).

Acceptance is reported two ways. *Teacher-forced*: on held-out sequences, step s counts as
accepted when the drafter's argmax equals the target's, and positions count for step s + 1 only
while the text itself follows the target's greedy choice (so the drafter was fed what a greedy
round would feed it): a cheap estimate of greedy acceptance a_s. *Loop*: the real speculative
loop (``generate_batch(..., draft_tokens=k)``) on held-out prompts, greedy,
``Stats.acceptance_by_position``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..cache import Plan, Step
from ..decode import target_kv
from ..errors import InputError
from ..loading import DTYPES, SpecModel, load_drafter
from ..models import assistant, gemma4
from ..models.assistant import FULL, SLIDING, TargetKV
from ..policy import K_MAX, DraftPolicy, expected_tokens


class DataError(InputError):
    """Training text that cannot be read or is too short."""


# ---------------------------------------------------------------------------------------------
# Settings


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


# ---------------------------------------------------------------------------------------------
# Data: files, folders or JSONL -> token streams


def _jsonl_texts(path: Path, tokenizer) -> list[list[int]]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON: {e.msg}") from None
        if isinstance(row, str):
            docs.append(tokenizer.encode(row))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            docs.append(list(tokenizer.apply_chat_template(row["messages"], tokenize=True)))
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append(tokenizer.encode(row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            reply = next((row[k] for k in ("completion", "response", "answer") if isinstance(row.get(k), str)), "")
            docs.append(tokenizer.encode(row["prompt"] + reply))
        else:
            raise DataError(
                f"{path}:{n}: expected a string or an object with 'text', 'prompt' or 'messages', "
                f"found {type(row).__name__}{' with keys ' + ', '.join(row) if isinstance(row, dict) else ''}"
            )
    return docs


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if path.is_file():
        return [path]
    raise DataError(f"data path {path} does not exist")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' "sequence longer than the model's maximum" warning: documents
    are tokenised whole, then cut into windows."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_documents(paths: Sequence[str | Path], tokenizer) -> list[list[int]]:
    """Token ids of every document: a text file is one document, a JSONL line is one
    (a string, {"text"}, {"prompt", "completion"} or chat {"messages"}); folders are read
    recursively (hidden files skipped, files that are not UTF-8 text skipped)."""
    if not paths:
        raise DataError("no training data given")
    if tokenizer is None:
        raise DataError("the target has no tokenizer files: cannot tokenise training text")
    docs = []
    with _quiet_transformers():
        for path in map(Path, paths):
            docs += _read_path(path, tokenizer)
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"no text found in {', '.join(map(str, paths))}")
    return docs


def _read_path(path: Path, tokenizer) -> list[list[int]]:
    docs = []
    files = _files(path)
    for f in files:
        if f.suffix == ".jsonl":
            docs += _jsonl_texts(f, tokenizer)
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if len(files) == 1:
                raise DataError(f"{f} is not UTF-8 text") from None
            continue  # a binary file inside a folder
        if text.strip():
            docs.append(tokenizer.encode(text))
    return docs


@dataclass
class Data:
    """A training token stream and a held-out one (documents end with EOS)."""

    train: np.ndarray
    held_out: np.ndarray

    @classmethod
    def from_documents(cls, docs: list[list[int]], eos: int, settings: Settings,
                       held_out_docs: list[list[int]] | None = None, held_out_fraction: float = 0.05) -> "Data":
        """Without ``held_out_docs``, the last ``held_out_fraction`` of the (seeded) shuffled
        stream is held out, at least enough for the evaluation sequences."""

        def stream(ds):
            return np.array([t for d in ds for t in (*d, eos)], dtype=np.int32)

        need = settings.seq_len + 1
        if held_out_docs is None:
            order = np.random.default_rng(settings.seed).permutation(len(docs))
            all_tokens = stream([docs[i] for i in order])
            n_held = max(int(len(all_tokens) * held_out_fraction), min(settings.eval_sequences, 2) * need)
            train, held = all_tokens[:-n_held], all_tokens[-n_held:]
        else:
            train, held = stream(docs), stream(held_out_docs)
        if len(train) < need:
            raise DataError(
                f"training data has {len(train)} tokens (after holding out {len(held)}); "
                f"need at least seq len + 1 = {need}: add text or lower --seq-len"
            )
        if len(held) < need:
            raise DataError(f"held-out data has {len(held)} tokens; need at least seq len + 1 = {need}")
        return cls(train, held)

    def windows(self, stream: np.ndarray, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        starts = rng.integers(0, len(stream) - length + 1, size=n)
        return np.stack([stream[s : s + length] for s in starts])

    def batch(self, step: int, settings: Settings) -> mx.array:
        """Step ``step``'s rows: a function of (seed, step) only, so resuming replays the
        batches an uninterrupted run would have seen."""
        rng = np.random.default_rng([settings.seed, 0, step])
        return mx.array(self.windows(self.train, rng, settings.batch_size, settings.seq_len))

    def eval_sequences(self, settings: Settings) -> mx.array:
        rng = np.random.default_rng([settings.seed, 1])
        return mx.array(self.windows(self.held_out, rng, settings.eval_sequences, settings.seq_len))

    def eval_prompts(self, settings: Settings) -> list[list[int]]:
        rng = np.random.default_rng([settings.seed, 2])
        length = min(settings.eval_prompt_len, len(self.held_out))
        return self.windows(self.held_out, rng, settings.eval_prompts, length).tolist()


# ---------------------------------------------------------------------------------------------
# A drafter from scratch, and saving one


# The drafter that goes with each target text decoder: model_type and transformers' class.
_DRAFTER_FOR = {
    gemma4.GEMMA4_TEXT: ("gemma4_assistant", "Gemma4AssistantForCausalLM"),
    gemma4.UNIFIED_TEXT: ("gemma4_unified_assistant", "Gemma4UnifiedAssistantForCausalLM"),
}


def scratch_config(target: gemma4.Model, *, hidden_size: int, layers: int, heads: int | None = None,
                   intermediate_size: int | None = None) -> dict:
    """A gemma4_assistant config.json (gemma4_unified_assistant for the 12B) fitted to
    ``target``: attention geometry, window, RoPE and vocabulary copied from the target's K/V
    source layers; layer types alternate sliding/full and end with full (or are all full when
    the target has no sliding layer)."""
    c = target.config
    sources = target.drafter_sources()
    kinds = [SLIDING if i % 2 == 0 and SLIDING in sources else FULL for i in range(layers - 1)] + [FULL]
    sliding, full = sources.get(SLIDING, sources[FULL]), sources[FULL]
    extra = c.extra
    text = {
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": layers,
        "layer_types": kinds,
        "num_attention_heads": heads or c.num_attention_heads,
        "num_key_value_heads": c.kv_heads[sliding],
        "head_dim": c.head_dims[sliding],
        "global_head_dim": c.head_dims[full],
        "attention_k_eq_v": c.kv_heads[full] != c.kv_heads[sliding] or c.attention_k_eq_v,
        "num_global_key_value_heads": c.kv_heads[full],
        "rope_parameters": json.loads(json.dumps(c.rope_parameters)),
        "sliding_window": c.sliding_window,
        "final_logit_softcapping": c.final_logit_softcapping,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": True,
        "max_position_embeddings": c.max_position_embeddings,
        "num_kv_shared_layers": layers,
        "use_double_wide_mlp": False,
    }
    if c.model_type == gemma4.GEMMA4_TEXT:  # the unified config has no such keys
        text.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if key in extra:
            text[key] = extra[key]
    model_type, architecture = _DRAFTER_FOR[c.model_type]
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "backbone_hidden_size": c.hidden_size,
        "use_ordered_embeddings": False,
        "tie_word_embeddings": True,
        "text_config": text,
    }


def _embedding_matrix(module: nn.Module) -> mx.array:
    if isinstance(module, nn.QuantizedEmbedding):
        return mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
    return module.weight


def new_drafter(target: gemma4.Model, config: dict, seed: int) -> assistant.Drafter:
    """A freshly initialised drafter. When its width equals the target's, its (tied) head
    starts as a copy of the target's embedding, i.e. the target's own output head."""
    mx.random.seed(seed)
    cfg = assistant.AssistantConfig.from_dict(config)
    assistant.check_compatible(cfg, target.config, target.drafter_sources())
    drafter = assistant.Drafter(cfg, target.embed_tokens)
    if cfg.text.hidden_size == target.config.hidden_size and target.config.tie_word_embeddings:
        drafter.lm_head.weight = mx.array(_embedding_matrix(target.embed_tokens).astype(mx.float32))
    mx.eval(drafter.parameters())
    return drafter


def hf_weights(drafter: assistant.Drafter, dtype=mx.bfloat16) -> dict[str, mx.array]:
    """The drafter's parameters under transformers' Gemma4AssistantForCausalLM names (the
    inverse of ``Drafter.sanitize``)."""
    out = {}
    for key, value in tree_flatten(drafter.parameters()):
        if key == "lm_head.weight":
            key = "model.embed_tokens.weight"
        elif key.startswith(("layers.", "norm.")):
            key = "model." + key
        if key == "masked_embedding.token_ordering":
            out[key] = value.astype(mx.int64)
        else:
            out[key] = value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
    return out




def save_drafter(drafter: assistant.Drafter, config: dict, out: Path, dtype: str = "bfloat16") -> Path:
    """A drafter folder ``load(target, drafter=out)`` reads: config.json + model.safetensors."""
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "dtype": dtype}
    mx.save_safetensors(str(out / "model.safetensors"), hf_weights(drafter, DTYPES[dtype]), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# The training forward


@dataclass
class TeacherPass:
    """The frozen target's view of a batch: what the drafter reads and what it must match."""

    tokens: mx.array  # (B, L)
    hidden: mx.array  # (B, L, backbone)
    logprobs: mx.array  # (B, L, V) log-softmax of the target's logits
    probs: mx.array  # (B, L, V) their softmax
    neg_entropy: mx.array  # (B, L) sum p log p, so that KL = neg_entropy - sum p log q
    greedy: mx.array  # (B, L) the target's argmax
    kv: dict[str, TargetKV]


def teacher(target: gemma4.Model, tokens: mx.array, drafter_window: int) -> TeacherPass:
    """One parallel target forward over (B, L) tokens, K/V read from its cache as the loop does."""
    B, L = tokens.shape
    cache = target.make_cache(B, max_step=L, drafter_window=drafter_window)
    hidden = target(tokens, Step((0,) * B, L), cache)
    logits = target.logits(hidden).astype(mx.float32)
    kv = target_kv(SpecModel(target, None, None), cache)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    probs = mx.exp(logprobs)
    out = TeacherPass(tokens, hidden, logprobs, probs, (probs * logprobs).sum(-1), mx.argmax(logits, axis=-1), kv)
    mx.eval(out.hidden, out.logprobs, out.probs, out.neg_entropy, out.greedy,
            *[a for e in kv.values() for a in (e.keys, e.values)])
    return out


def query_masks(drafter: assistant.Drafter, first: int, count: int, kv: dict[str, TargetKV]) -> dict[str, mx.array]:
    """``Drafter.masks`` for ``count`` queries at positions first, first + 1, ...: each reads
    the keys before its own position (and, sliding, within the drafter's window)."""
    q = mx.arange(first, first + count, dtype=mx.int32)[None, None, :, None]
    out = {}
    for kind, entry in kv.items():
        k = entry.positions[:, None, None, :]
        mask = (k >= 0) & (k < q)
        if kind == SLIDING:
            mask = mask & (q - 1 - k <= drafter.config.sliding_window)
        out[kind] = mask
    return out


def draft_step(drafter: assistant.Drafter, tokens: mx.array, hidden: mx.array, first: int,
               kv: dict[str, TargetKV], masks: dict[str, mx.array]):
    """``Drafter.__call__`` for a row of queries at positions first .. first + Q - 1 (one
    speculative round starting at each), returning the normed hidden (for the full-vocab and
    centroid heads) and the post-projected hidden fed to the next step."""
    x = mx.concatenate([drafter.embed(tokens), hidden], axis=-1)
    h = drafter.pre_projection(x)
    offsets = mx.full((tokens.shape[0],), first, dtype=mx.int32)
    for kind, layer in zip(drafter.config.text.layer_types, drafter.layers):
        plan = Plan(slots=None, written=0, concat=False, mask=masks[kind])
        h, _ = layer(h, offsets, plan, (kv[kind].keys, kv[kind].values))
    h = drafter.norm(h)
    return h, drafter.post_projection(h)


def full_logits(drafter: assistant.Drafter, h: mx.array) -> mx.array:
    return drafter.lm_head.as_linear(h)


def _cluster_logprobs(drafter: assistant.Drafter, logprobs: mx.array) -> mx.array:
    """The target's log-probability mass on each of the drafter's clusters."""
    head = drafter.masked_embedding
    ordered = mx.take(logprobs, head.token_ordering, axis=-1)
    return mx.logsumexp(ordered.reshape(*logprobs.shape[:-1], -1, head.per_cluster), axis=-1)


def unroll(drafter: assistant.Drafter, t: TeacherPass, steps: int, feed: str):
    """All S draft steps from positions 1 .. L - S; yields (s, logits, normed hidden, the
    teacher's index range, teacher greedy) per step s = 1 .. S."""
    L = t.tokens.shape[1]
    Q = L - steps
    masks = query_masks(drafter, 1, Q, t.kv)
    tokens, hidden = t.tokens[:, 1 : 1 + Q], t.hidden[:, :Q]
    for s in range(1, steps + 1):
        h, hidden = draft_step(drafter, tokens, hidden, 1, t.kv, masks)
        logits = full_logits(drafter, h)
        yield s, logits, h, slice(s, s + Q), t.greedy[:, s : s + Q]
        if s == steps:
            break
        if feed == "data":
            tokens = t.tokens[:, s + 1 : s + 1 + Q]
        else:
            tokens = mx.stop_gradient(mx.argmax(logits, axis=-1))


def loss_terms(drafter: assistant.Drafter, t: TeacherPass, settings: Settings):
    """(total loss, KL per step). KL(target || drafter) per position, averaged."""
    kls, total = [], 0.0
    for _, logits, h, where, _ in unroll(drafter, t, settings.draft_steps, settings.feed):
        p = t.probs[:, where]
        # KL(p || q) = sum p log p - sum p log q, with log q = logits - logsumexp(logits).
        cross = (p * logits).sum(-1) - mx.logsumexp(logits, axis=-1)
        kl = (t.neg_entropy[:, where] - cross).mean()
        kls.append(kl)
        total = total + kl
        if drafter.config.use_ordered_embeddings and settings.centroid_weight:
            scores = drafter.masked_embedding.centroids(h)
            lc = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
            ce = -(mx.exp(_cluster_logprobs(drafter, t.logprobs[:, where])) * lc).sum(-1).mean()
            total = total + settings.centroid_weight * ce
    return total / settings.draft_steps, kls


def teacher_forced_acceptance(drafter: assistant.Drafter, t: TeacherPass, steps: int) -> tuple[list[int], list[int]]:
    """(reached, accepted) per draft step, counted as described in the module docstring."""
    reached, accepted = [], []
    L = t.tokens.shape[1]
    Q = L - steps
    reach = mx.ones((t.tokens.shape[0], Q), dtype=mx.bool_)
    for s, logits, _, _, greedy in unroll(drafter, t, steps, "data"):
        match = mx.argmax(logits, axis=-1) == greedy
        reached.append(reach.sum())
        accepted.append((reach & match).sum())
        if s == steps:
            break
        # The next step is fed the text's next token: it is what greedy decoding fed only
        # when it is the target's choice.
        reach = reach & match & (t.tokens[:, s + 1 : s + 1 + Q] == greedy)
    mx.eval(reached, accepted)
    return [int(r.item()) for r in reached], [int(a.item()) for a in accepted]


# ---------------------------------------------------------------------------------------------
# Evaluation


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
    from ..api import generate_batch

    model = dataclasses.replace(spec, drafter=drafter, policy=DraftPolicy())  # keep the caller's policy stats clean
    results = generate_batch(model, prompts, max_tokens=max_tokens, draft_tokens=draft_tokens)
    reached = [sum(r.stats.reached_by_position[i] for r in results) for i in range(draft_tokens)]
    accepted = [sum(r.stats.accepted_by_position[i] for r in results) for i in range(draft_tokens)]
    return Acceptance.from_counts("loop", reached, accepted)


# ---------------------------------------------------------------------------------------------
# Training


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


QUANT_BITS = (2, 3, 4, 5, 6, 8)


def quantize_target(target: gemma4.Model, bits: int, group_size: int = 64) -> gemma4.Model:
    """Quantize the target's linear layers and embedding in place (as an mlx-lm conversion
    would). Do it before a drafter is built around the target's embedding."""
    if bits not in QUANT_BITS:
        raise InputError(f"quantization bits must be one of {QUANT_BITS}, got {bits}")
    try:
        nn.quantize(target, group_size=group_size, bits=bits)
    except ValueError as e:
        raise InputError(f"cannot quantize the target with group size {group_size}: {e}") from None
    mx.eval(target.parameters())
    return target


def start_drafter(spec: SpecModel, drafter_path: Path | None, *, hidden_size: int, layers: int,
                  seed: int) -> tuple[assistant.Drafter, dict]:
    """The drafter to train: loaded from ``drafter_path`` (in fp32), or new from the sizes."""
    if drafter_path is not None:
        drafter = load_drafter(Path(drafter_path), spec.target, dtype="float32")
        config = json.loads((Path(drafter_path) / "config.json").read_text())
        return drafter, config
    if hidden_size < 1 or layers < 1:
        raise InputError(f"hidden size and layers must be >= 1, got {hidden_size} and {layers}")
    config = scratch_config(spec.target, hidden_size=hidden_size, layers=layers)
    return new_drafter(spec.target, config, seed), config


__all__ = [
    "Acceptance", "Data", "DataError", "Progress", "Report", "Settings", "Trainer", "distill",
    "evaluate_loop", "evaluate_teacher_forced", "new_drafter", "quantize_target", "read_documents", "resume_drafter",
    "save_drafter", "scratch_config", "start_drafter",
]
