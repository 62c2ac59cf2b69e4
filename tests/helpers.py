"""Small helpers shared by the tests (run our port the way the loop does)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_specdec.cache import Step
from mlx_specdec.decode import target_kv


def prompt(length: int, seed: int = 0, vocab: int = 96) -> list[int]:
    # Ids 3.. avoid pad/eos/bos so that a prompt never ends early by construction.
    return [int(x) for x in np.random.RandomState(seed).randint(3, vocab, size=length)]


def record_round(policy, batch_size: int, k: int, accepted: list[int], t_draft: float, t_verify: float) -> None:
    """Record a round with the policy as the engine does: the drafts timed apart only when the
    policy asks for it, else the whole round's time (the drafting inside it)."""
    if k and not policy.draft_timing_due(batch_size):
        t_draft, t_verify = None, t_draft + t_verify
    policy.record(batch_size, k, accepted, t_draft, t_verify)


def forward_in_steps(target, ids: list[int], steps: list[int], max_step: int = 9):
    """Run the target over ids in chunks (the first one a prefill), return logits and hidden."""
    cache = target.make_cache(1, max_step=max_step)
    logits, hiddens, p = [], [], 0
    for n in steps:
        h = target(mx.array([ids[p : p + n]]), Step((p,), n), cache)
        logits.append(target.logits(h))
        hiddens.append(h)
        p += n
    assert p == len(ids)
    return np.array(mx.concatenate(logits, axis=1)[0]), np.array(mx.concatenate(hiddens, axis=1)[0])


def first_drafts(spec, ids: list[int], steps: int):
    """The drafter's first round right after a prefill, greedy, as the reference runs it."""
    target, drafter = spec.target, spec.drafter
    cache = target.make_cache(1, max_step=9, drafter_window=drafter.config.sliding_window)
    h = target(mx.array([ids]), Step((0,), len(ids)), cache)
    token = mx.argmax(target.logits(h[:, -1]), axis=-1)
    kv, hidden, out = target_kv(spec, cache), h[:, -1:], []
    for _ in range(steps):
        draft = drafter(token, hidden, mx.array([len(ids)]), kv)
        token, hidden = draft.greedy_tokens(), draft.hidden
        out.append(draft)
    return out


def until_eos(tokens: list[int], eos: int = 1) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def wait_healthy(url: str, proc, timeout_s: float) -> bool:
    """Poll ``url``/health until it answers 200 (True), or until ``proc`` exits or the time is
    up (False): how the server tests wait for a server they started."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
