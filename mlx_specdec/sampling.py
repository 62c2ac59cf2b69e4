"""Sampling and speculative acceptance, as pure MLX functions.

Nothing here knows about models or caches: every function maps arrays to arrays, batch
first, so the decode loop can run any batch size through the same code.

The acceptance rule is the one of Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding" (arXiv:2211.17192), and Chen et al. 2023, "Accelerating Large Language
Model Decoding with Speculative Sampling" (arXiv:2302.01318), in the paper's notation:
``p`` is the target's distribution, ``q`` the drafter's.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import InputError

# MLX's PRNG keys are made from an unsigned 64-bit seed.
SEED_RANGE = 2**64

from .policy import K_MAX


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into the distribution we sample from.

    Defaults switch everything off: ``temperature=0`` means greedy decoding.
    """

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not is_number(value):
                raise InputError(f"{name} must be a number, got {value!r}")
        # Written as `not (a <= x)` so that NaN is rejected too.
        if not 0 <= self.temperature < math.inf:
            raise InputError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 <= self.min_p < 1:
            raise InputError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if self.seed is not None:
            if not is_integer(self.seed):
                raise InputError(f"seed must be an integer, got {self.seed!r}")
            # Any integer is a seed: reduced to the key's range, so -1 and 2**64 - 1 are one seed.
            object.__setattr__(self, "seed", int(self.seed) % SEED_RANGE)
        object.__setattr__(self, "top_k", int(self.top_k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_integer(value) -> bool:
    """An int or a NumPy integer, not a bool (which Python counts as an int)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def probabilities(logits: mx.array, params: SamplingParams) -> mx.array:
    """The distribution that sampling actually draws from, ``(..., V)`` -> ``(..., V)`` float32.

    Speculative sampling is exact only if the acceptance rule sees the very distribution that
    plain sampling would use, so both target and drafter go through this one function.

    Semantics follow mlx-lm's ``make_sampler`` (so a speculative run samples from the same
    distribution as ``mlx_lm.generate`` with the same settings):

    1. The filters are judged on the untempered distribution ``softmax(logits)``:
       - top-p keeps the smallest set of most likely tokens whose mass is >= ``top_p``;
       - min-p keeps tokens with ``p >= min_p * p_max``;
       - top-k keeps the ``top_k`` most likely tokens.
       A token survives if it passes all three. (mlx-lm chains top-p, min-p, top-k; as top-p
       runs first and the other two do not depend on renormalisation, the chain is exactly this
       intersection, so the order does not matter.) Tokens tied with the last survivor are kept,
       and the most likely token always survives.
    2. Temperature then reshapes the survivors: ``softmax(logits / temperature)`` over them.

    Greedy params give the one-hot of ``argmax`` (ties -> lowest index, as ``mx.argmax``); the
    filters cannot change the argmax, so they are ignored.
    """
    logits = logits.astype(mx.float32)
    vocab = logits.shape[-1]
    if params.greedy:
        best = mx.argmax(logits, axis=-1, keepdims=True)
        return (mx.arange(vocab) == best).astype(mx.float32)

    keep = mx.ones(logits.shape, dtype=mx.bool_)
    if params.top_p < 1:
        keep = keep & _top_p_mask(mx.softmax(logits, axis=-1), params.top_p)
    if params.min_p > 0:
        floor = mx.max(logits, axis=-1, keepdims=True) + math.log(params.min_p)
        keep = keep & (logits >= floor)
    if 0 < params.top_k < vocab:
        kth_largest = mx.min(mx.topk(logits, params.top_k, axis=-1), axis=-1, keepdims=True)
        keep = keep & (logits >= kth_largest)
    return mx.softmax(mx.where(keep, logits / params.temperature, -mx.inf), axis=-1)


def _top_p_mask(probs: mx.array, top_p: float) -> mx.array:
    """Nucleus: keep a token if the mass of the strictly more likely tokens is < ``top_p``."""
    descending = -mx.sort(-probs, axis=-1)
    mass_before = mx.cumsum(descending, axis=-1, inclusive=False)
    n_keep = mx.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0
    smallest_kept = mx.take_along_axis(descending, n_keep - 1, axis=-1)
    return probs >= smallest_kept


def sample(probs: mx.array, key: mx.array) -> mx.array:
    """Draw one token id per row, ``(..., V)`` -> ``(...)`` int32, from an explicit PRNG key.

    ``key`` is one key, or ``(B, 2)`` keys for ``(B, V)`` probs: one per row, so that a row's
    draw depends on its own key only, whatever rows share the batch.
    ``probs`` need not be normalised; zero entries are never drawn.
    """
    if key.ndim == 2:
        draw = mx.vmap(lambda logp, k: mx.random.categorical(logp, key=k))
        return draw(mx.log(probs), key).astype(mx.int32)
    return mx.random.categorical(mx.log(probs), axis=-1, key=key).astype(mx.int32)


def make_key(seed: int | None) -> mx.array:
    """A PRNG key from ``seed``, or from a fresh random seed when it is None."""
    return mx.random.key(secrets.randbits(64) if seed is None else seed)


def greedy_accept(
    target_tokens: mx.array, draft_tokens: mx.array, limits: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Accept the longest prefix of the draft that the target's argmax agrees with.

    Args:
        target_tokens: ``(B, k+1)`` argmax of the target at each verified position.
        draft_tokens: ``(B, k)`` the drafted tokens.
        limits: ``(B,)`` at most this many drafts count in each row (a row's own draft length
            when rows of one round draft different lengths); None: all ``k``.

    Returns:
        ``n_accepted`` ``(B,)`` int32 in ``[0, k]`` and ``next_token`` ``(B,)``: the target's
        token at position ``n_accepted`` (its correction of the first wrong draft, or the bonus
        token after ``k`` accepted ones). Emitting ``draft[:n] + [next]`` is then exactly what
        plain greedy decoding would have produced.
    """
    k = draft_tokens.shape[1]
    if k == 0:  # a plain round: nothing to compare (five fewer ops on every plain step)
        return mx.zeros(target_tokens.shape[:1], dtype=mx.int32), target_tokens[:, 0]
    matches = (draft_tokens == target_tokens[:, :k]).astype(mx.int32)
    n_accepted = mx.sum(mx.cumprod(matches, axis=1), axis=1)
    if limits is not None:
        n_accepted = mx.minimum(n_accepted, limits)
    next_token = mx.take_along_axis(target_tokens, n_accepted[:, None], axis=1)[:, 0]
    return n_accepted, next_token


def speculative_accept(
    p: mx.array, q: mx.array, draft_tokens: mx.array, key: mx.array, limits: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Rejection-sample the draft so that the emitted tokens follow ``p`` exactly.

    Leviathan et al. 2023 (Algorithm 1) / Chen et al. 2023: draft ``x_i ~ q_i`` is accepted
    with probability ``min(1, p_i(x_i) / q_i(x_i))``, left to right; the first rejection at
    ``i`` is replaced by a sample from ``normalize(max(0, p_i - q_i))``, which restores the
    probability mass that ``q`` under-proposed; if all ``k`` are accepted, a bonus token is drawn
    from ``p_k``. Each emitted token is then distributed exactly as ``p``, whatever ``q`` is.

    Args:
        p: ``(B, k+1, V)`` target probabilities at the verified positions, from `probabilities`.
        q: ``(B, k, V)`` drafter probabilities that ``draft_tokens`` were sampled from, from
            `probabilities` (a one-hot for a greedy drafter is fine).
        draft_tokens: ``(B, k)``.
        key: one PRNG key, or ``(B, 2)``: one per row. Each row's key is split here, one part
            for its acceptance tests and one for its replacement/bonus token; a row draws the
            same numbers whatever k and the other rows are, so a seeded row is reproducible
            in any batch.
        limits: ``(B,)`` at most this many drafts count in each row (its own draft length when
            rows of one round draft different lengths): a row that accepts all of its own
            drafts takes its bonus token from ``p`` there. None: all ``k``.

    Returns:
        ``n_accepted`` ``(B,)`` int32 in ``[0, k]`` and ``next_token`` ``(B,)`` int32.

    With one-hot ``p`` and ``q`` this reduces to `greedy_accept`; for greedy decoding prefer
    `greedy_accept` itself, which needs no randomness.
    """
    B, k, V = q.shape
    if p.shape != (B, k + 1, V) or draft_tokens.shape != (B, k):
        raise ValueError(
            "speculative_accept expects p (B, k+1, V), q (B, k, V), draft_tokens (B, k); "
            f"got p {p.shape}, q {q.shape}, draft_tokens {draft_tokens.shape}"
        )
    keys = key if key.ndim == 2 else mx.random.split(key, B)
    split = mx.vmap(lambda k: mx.random.split(k))(keys)
    accept_keys, resample_keys = split[:, 0], split[:, 1]

    drafted = draft_tokens[..., None]
    p_draft = mx.take_along_axis(p[:, :k], drafted, axis=-1)[..., 0]
    q_draft = mx.take_along_axis(q, drafted, axis=-1)[..., 0]
    # u < p/q, multiplied out so that q(x) = 0 cannot make a NaN. u < 1, so p >= q always accepts.
    # Each row draws the same K_MAX numbers whatever k is, and uses the first k.
    width = max(k, K_MAX)
    u = mx.vmap(lambda key: mx.random.uniform(shape=(width,), key=key))(accept_keys)[:, :k]
    accepted = (u * q_draft < p_draft).astype(mx.int32)
    if limits is not None:
        accepted = accepted * (mx.arange(k)[None, :] < limits[:, None])
    n_accepted = mx.sum(mx.cumprod(accepted, axis=1), axis=1)

    # The next token comes from position n. The bonus position (n = k) has no draft: its q is
    # taken as zero, so the residual there is p_k itself.
    p_next = _at_position(p, n_accepted)
    q_next = _at_position(q, mx.minimum(n_accepted, k - 1)) if k > 0 else mx.zeros_like(p_next)
    drafts = k if limits is None else limits
    q_next = mx.where((n_accepted < drafts)[:, None], q_next, 0.0)
    residual = mx.maximum(p_next - q_next, 0.0)
    # An all-zero residual means p == q at that position (both sum to 1), where a draft from q is
    # never rejected; it only happens for a draft outside q's support or through rounding. Fall
    # back to p there rather than sample from nothing. (`sample` needs no normalised input.)
    has_mass = mx.sum(residual, axis=-1, keepdims=True) > 0
    return n_accepted, sample(mx.where(has_mass, residual, p_next), resample_keys)


def _at_position(x: mx.array, position: mx.array) -> mx.array:
    """``x[b, position[b]]`` for each row: ``(B, T, V)``, ``(B,)`` -> ``(B, V)``."""
    return mx.take_along_axis(x, position[:, None, None], axis=1)[:, 0]
