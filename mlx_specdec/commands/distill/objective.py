"""The training forward: the target's teacher pass, the drafter unrolled over its draft steps from every position, and the loss."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ...cache import Step
from ...decode import target_kv
from ...loading import SpecModel
from ...models import assistant, gemma4
from ...models.assistant import TargetKV

from .settings import Settings


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
    # Every step of every round starts at its own position 1 .. Q: queries 1 .. Q of one call.
    position = mx.ones((t.tokens.shape[0],), dtype=mx.int32)
    masks = drafter.masks(position, t.kv, Q)
    tokens, hidden = t.tokens[:, 1 : 1 + Q], t.hidden[:, :Q]
    for s in range(1, steps + 1):
        h, hidden = drafter.forward(tokens, hidden, position, t.kv, masks)
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
