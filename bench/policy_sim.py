"""Closed-loop simulation of the draft policy: the real DraftPolicy deciding rounds in a synthetic world.

On this machine a bench cell's runs spread by up to 2x, so a change to the policy that moves auto
by 2-3% cannot be seen in `mlx-specdec bench`. Here the world is known and repeatable: each draft
position i accepts with a fixed conditional probability a_i (per workload), a target pass over L
tokens in each of B rows costs w + c * B * L seconds and a drafter step wd + cd * B (constants
close to the demo pair's on this CPU; or, with ``--verify-costs measured``, the demo pair's own
uneven costs at B = 1, 2 and 4), and every round's time is multiplied by lognormal jitter
(``--sigma``) and, optionally, by slow spells: the machine runs ``--spell-factor`` times slower
for stretches of ``--spell-seconds`` on average, quick ones of the same mean between them
(another process taking the cores for a while, the kind of noise this machine has). A seed's
jitter (by round) and spells (by simulated time) are the same for every mode it runs, so modes
are compared on the same machine, not on different luck. A round that builds its target pass's
graph while the device idles pays for it (``BUILD_WAIT``), as the engine's do: the first plain
round after a drafting one, and a drafting round that waits for its drafts to time the drafter
apart (the others build the verify pass while the drafts compute).

A cell runs as `mlx-specdec bench` runs one: a fresh policy, one warm-up run and ``--runs`` timed
ones, every row to ``--max-tokens`` (rows that finish leave the batch), for plain decoding, each
fixed k and auto, over ``--seeds`` worlds; reported are auto against plain and against the best
fixed k (the ratio of mean tokens/s, the best k known, not picked from noisy runs). Rows draw
their drafts' fates alike, or, with ``--row-spread``, each row with its own acceptance (a
lognormal factor on the workload's, the same in every run and mode): the bench's rows are
different prompts, and a batch lasts as long as its slowest row, whose last rounds run with
the others gone at a smaller batch's cost per token. Plain decoding has no such tail. Each run is a
static batch to auto's policy, as `generate_batch`'s rows are to the engine's: it decides knowing
that, and is told what a run that drafted lost finishing apart (DraftPolicy.record_finish).

    python bench/policy_sim.py                        # jitter only
    python bench/policy_sim.py --spell-seconds 0.7    # slow spells of about 50 rounds
    python bench/policy_sim.py --verify-costs measured --k-max 8
    python bench/policy_sim.py --verify-costs measured --k-max 8 --batch-sizes 4 --row-spread 0.25
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path

from mlx_specdec.policy import DraftPolicy, finishing_loss, finishing_spread, token_variance

# Conditional acceptance of draft positions 1..8, by workload: roughly the demo pair's on the
# built-in workloads (`mlx-specdec bench`), a drafter at the break-even point at B = 1 that loses
# 16% at B = 4 (where a policy misled by noise shows it), and one that never agrees.
WORKLOADS = {
    "code": [0.82, 0.6, 0.75, 0.7, 0.7, 0.7, 0.7, 0.7],
    "prose": [0.82, 0.8, 0.78, 0.78, 0.78, 0.78, 0.78, 0.78],
    "qa": [0.81, 0.86, 0.83, 0.83, 0.83, 0.83, 0.8, 0.8],
    "short": [0.87, 0.40, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6],
    "marginal": [0.44] * 8,
    "never": [0.0] * 8,
}
# Not run unless named: the demo pair on bench/peers.py's 512-token prompts (slices of one source
# file; a_1 0.61-0.67 and a_2 0.68-0.82 by decision logs), whose rows spread about 0.25 in the log
# of their acceptance (bench/batch_tail.py). With `--workloads source512 --batch-sizes 4
# --max-tokens 64 --verify-costs measured --k-max 8 --row-spread 0.25` the simulation gives k = 1
# 0.954x plain and auto 0.947x (30 seeds), where batch_tail measured 0.91-0.96x and 0.87-0.91x.
CALIBRATED = {"source512": [0.64, 0.78, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75]}

VERIFY_FIXED, VERIFY_PER_TOKEN = 6.8e-3, 1.17e-3  # seconds: w, and c per row-token
DRAFT_FIXED, DRAFT_PER_ROW = 2.2e-3, 0.15e-3
# Of a plain round: building a target pass's graph unhidden (the first plain round after drafting,
# a drafting round timed apart). On the demo pair a k=1 round timed apart took 6.4 ms, one in a
# stretch of k=1 rounds 4.7-5 ms, a plain round 3.5-4 ms: 0.3-0.5; 0.3 is what the switch cost here before.
BUILD_WAIT = 0.3
# Of a plain round: what the first drafting round after plain rounds costs over a steady one (its
# drafter and the cache gone cold meanwhile). On the demo pair at B = 1 a k=1 round after 8 plain
# rounds took 5.48 ms against 5.2 ms in its stretch, after 60 plain rounds 7.51 against 6.58 ms,
# with plain rounds at 3.2 and 4.1 ms: 0.09-0.23. Most of it is the drafter's: timed apart after
# 30 plain rounds, its step took 1.88 ms in the first drafting round, 1.50, 1.37 and 1.26 in the
# next three (plain rounds about 3.7 ms), so the simulation charges it to the drafting.
SWITCH_IN = 0.15
# Of a plain round: what the second plain round after drafting rounds costs over a steady one (the
# first is BUILD_WAIT's). Steady plain rounds of auto's stretches on the demo pair at B = 1 took
# 4.11, 3.9, 3.8 and 3.48 ms, the first to the fourth, where a plain run's took 3.54 (low quartile)
# and 3.9 (median): about 0.1.
SETTLE_WAIT = 0.1


# A target pass over L tokens in each of B rows against a plain pass at B, as measured on the demo
# pair on this CPU (OpenBLAS): each fixed k's round time over plain decoding's in `mlx-specdec bench
# -w qa,prose -b 1,2,4 --modes plain,1-8 --repeats 5`, less k drafter steps at 0.2 of a plain pass,
# L = 1..9. Not smooth in L: at B = 4 passes of 16, 24 or 32 row-tokens cost little more than of
# 12, 20 or 28 (the BLAS kernels' blocking), so k = 3 beats k = 1 and k = 2 beats neither; linear
# costs cannot show a policy stuck beside the best length, or exploring lengths past it.
MEASURED_VERIFY = {
    1: [1.0, 1.32, 1.49, 1.63, 1.91, 1.91, 1.91, 1.92, 2.07],
    2: [1.0, 1.42, 1.66, 1.85, 2.14, 2.39, 2.46, 2.5, 2.72],
    4: [1.0, 1.39, 1.87, 1.94, 2.42, 2.66, 3.06, 3.11, 3.47],
}
MEASURED_DRAFT = 0.2  # a drafter step, of a plain pass at the same B (0.18-0.22 timed at B = 4)
# ROUND_OVERHEAD_NOTE: plain decoding has got quicker since MEASURED_VERIFY was taken, drafting
# rounds less so. In a decision log of `mlx-specdec bench -w prose -b 1` on 31833f7's code, rounds
# at B = 1 took 3.6-3.7 ms plain and 6.57, 7.8, 9.3 and 10.7 ms at k = 1..4: 1.80, 2.14, 2.55 and
# 2.93 plain rounds, where MEASURED_VERIFY and MEASURED_DRAFT give 1.52, 1.89, 2.23 and 2.71.
# `--round-overhead 0.27` adds the difference to every drafting round.


def verify_seconds(batch: int, length: int, measured: bool = False) -> float:
    """A target pass: linear in B * L, or a plain pass scaled by MEASURED_VERIFY (interpolated in B)."""
    plain = VERIFY_FIXED + VERIFY_PER_TOKEN * batch
    if not measured:
        return plain + VERIFY_PER_TOKEN * batch * (length - 1)
    lo = max(b for b in MEASURED_VERIFY if b <= batch)
    hi = min((b for b in MEASURED_VERIFY if b >= batch), default=lo)
    at = lambda b: MEASURED_VERIFY[b][length - 1]  # noqa: E731
    ratio = at(lo) if hi == lo else at(lo) + (at(hi) - at(lo)) * (batch - lo) / (hi - lo)
    return plain * ratio


def draft_seconds(batch: int, measured: bool = False) -> float:
    return MEASURED_DRAFT * verify_seconds(batch, 1) if measured else DRAFT_FIXED + DRAFT_PER_ROW * batch


class Machine:
    """Each round's slowdown: lognormal jitter (the n-th round's the same whatever the mode) times
    spell_factor while a slow spell is on (spells placed in simulated time), and now and then a
    hiccup: one round 2-6x slower (this machine's other processes; a k=1 probe on the demo pair
    took 26.75 and 10.53 ms where a steady one takes 5)."""

    def __init__(self, seed: int, sigma: float, spell_factor: float, spell_seconds: float, hiccups: float = 0.0):
        self.jitter, self.spells, self.hiccup = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
        self.sigma, self.spell_factor, self.spell_seconds = sigma, spell_factor, spell_seconds
        self.hiccups = hiccups
        self.clock, self.slow, self.switch = 0.0, False, self._next(0.0)

    def _next(self, now: float) -> float:
        return now + self.spells.expovariate(1 / self.spell_seconds) if self.spell_seconds else math.inf

    def factor(self) -> float:
        while self.clock >= self.switch:
            self.slow, self.switch = not self.slow, self._next(self.switch)
        factor = math.exp(self.jitter.gauss(0.0, self.sigma)) * (self.spell_factor if self.slow else 1.0)
        if self.hiccups and self.hiccup.random() < self.hiccups:
            factor *= self.hiccup.uniform(2.0, 6.0)
        return factor

    def spend(self, seconds: float) -> None:
        self.clock += seconds


def run(acceptance: list[float], batch: int, max_tokens: int, mode, policy: DraftPolicy | None,
        machine: Machine, rng: random.Random, shapes: set, measured: bool = False,
        round_overhead: float = 0.0, row_factors: list[float] | None = None) -> float:
    """One run of `batch` rows to max_tokens each: tokens per simulated second. Row r accepts
    each position with row_factors[r] times the workload's probability (at most 0.99), if given."""
    remaining = [max_tokens] * batch
    by_row = [acceptance if row_factors is None else [min(0.99, a * row_factors[r]) for a in acceptance]
              for r in range(batch)]
    tokens, seconds, last_k, since = 0, 0.0, None, math.inf  # since: rounds since the last drafting round
    first, full, drafting_full = None, 0, 0  # (seconds, tokens) when a row first finished; rounds of all rows
    variance = 0.0  # summed token_variance, as the engine sums it (DraftPolicy.record_finish's spread)
    while any(remaining):
        rows = [i for i, left in enumerate(remaining) if left]
        b = len(rows)
        wanted = policy.decide(b, static=True).k if mode == "auto" else mode
        limits = [min(wanted, remaining[i] - 1) for i in rows]  # no row drafts past its max_tokens
        k = max(limits)
        accepted = []
        for i, limit in zip(rows, limits):
            n = 0
            while n < limit and rng.random() < by_row[i][n]:
                n += 1
            accepted.append(n)
        slowdown = machine.factor()
        drafting = k * draft_seconds(b, measured) * slowdown
        verifying = verify_seconds(b, k + 1, measured) * slowdown
        apart = policy is not None and k > 0 and policy.draft_timing_due(b)
        if (k == 0 and last_k not in (0, None)) or apart:
            verifying += BUILD_WAIT * verify_seconds(b, 1, measured) * slowdown
        if k == 0 and since == 1:
            verifying += SETTLE_WAIT * verify_seconds(b, 1, measured) * slowdown
        if k > 0 and last_k == 0:  # the drafter pays it (timed apart, its steps show it)
            drafting += SWITCH_IN * verify_seconds(b, 1, measured) * slowdown
        if k > 0:
            verifying += round_overhead * verify_seconds(b, 1, measured) * slowdown
        seconds += drafting + verifying
        machine.spend(drafting + verifying)
        took = [min(n + 1, remaining[i]) for i, n in zip(rows, accepted)]
        for i, got in zip(rows, took):
            remaining[i] -= got
            tokens += got
        if b == batch > 1 and first is None:
            variance += token_variance(took)
        full, drafting_full = full + (b == batch), drafting_full + (b == batch and k > 0)
        if first is None and not all(remaining[i] for i in rows):
            first = (seconds, tokens)
        if policy is not None:
            # As the engine records: a shape's first round traces it (no times), a drafting round
            # times its drafts apart only when the policy asks, a plain round counts as timing
            # plain decoding only inside a stretch of plain rounds.
            timed = (b, k) in shapes
            shapes.add((b, k))
            t_draft = (drafting if apart else None) if timed else 0.0
            t_verify = (verifying if apart or k == 0 else drafting + verifying) if timed else 0.0
            policy.record(b, k, accepted, t_draft if k else None, t_verify, 0.0, limits,
                          steady=k == 0 and last_k == 0)
        last_k, since = k, 0 if k > 0 else since + 1
    # As the engine tells the policy of a static batch, by whether it drafted in most of its rounds of all rows.
    if mode == "auto" and batch > 1:
        if 2 * drafting_full < full:
            policy.record_plain_batch(batch)
        elif first[0] < seconds:
            policy.record_finish(batch, finishing_loss(seconds, tokens, *first), finishing_spread(variance, batch, tokens))
    return tokens / seconds


def cell(workload: str, batch: int, args) -> dict:
    """Mean tokens/s of every mode over the seeds' timed runs."""
    acceptance = (WORKLOADS | CALIBRATED)[workload]
    modes = [0, *range(1, args.k_max + 1), "auto"]
    out = {}
    for mode in modes:
        means = []
        for seed in range(args.seeds):
            rng = random.Random(seed * 1000 + batch)  # acceptance draws
            machine = Machine(seed * 1000 + batch + 500, args.sigma, args.spell_factor, args.spell_seconds, args.hiccups)
            policy = DraftPolicy() if mode == "auto" else None
            shapes: set = set()
            # Each row a prompt of its own, the same in every run and mode: how well it is drafted.
            spread = random.Random(seed * 1000 + batch + 700)
            factors = [math.exp(spread.gauss(0.0, args.row_spread)) for _ in range(batch)] if args.row_spread else None
            rates = [run(acceptance, batch, args.max_tokens, mode, policy, machine, rng, shapes,
                         args.verify_costs == "measured", args.round_overhead, factors)
                     for _ in range(1 + args.runs)]
            means.append(statistics.mean(rates[1:]))  # the first run warms up
        out["plain" if mode == 0 else mode if mode == "auto" else f"k={mode}"] = statistics.mean(means)
    best = max((m for m in out if m.startswith("k=")), key=out.get)
    return dict(workload=workload, batch=batch, tokens_per_second=out, best=best,
                auto_vs_plain=out["auto"] / out["plain"], auto_vs_best=out["auto"] / out[best])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of {', '.join(WORKLOADS | CALIBRATED)} (default: all but {', '.join(CALIBRATED)})")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--runs", type=int, default=9, help="timed runs per seed, after one warm-up")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--k-max", type=int, default=6, help="largest fixed k compared")
    p.add_argument("--sigma", type=float, default=0.1, help="lognormal jitter of each round's time")
    p.add_argument("--spell-factor", type=float, default=1.4, help="slowdown during a slow spell")
    p.add_argument("--spell-seconds", type=float, default=0.0,
                   help="mean length of a slow spell and of the quick stretch between two (0: no spells)")
    p.add_argument("--hiccups", type=float, default=0.0, help="chance that a round is one 2-6x slower")
    p.add_argument("--verify-costs", choices=("linear", "measured"), default="linear",
                   help="target pass costs: linear in B * L, or as measured on the demo pair (MEASURED_VERIFY)")
    p.add_argument("--round-overhead", type=float, default=0.0,
                   help="what every drafting round costs beyond its drafter steps and verify pass, of a plain "
                        "round (the demo pair at B = 1 on 31833f7: about 0.27, see ROUND_OVERHEAD_NOTE)")
    p.add_argument("--row-spread", type=float, default=0.0,
                   help="lognormal spread of each row's acceptance around the workload's (rows are different "
                        "prompts; a batch waits for its slowest row). 0: every row alike")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS | CALIBRATED]
    if unknown:
        p.error(f"unknown workload {unknown[0]!r}: choose from {', '.join(WORKLOADS | CALIBRATED)}")
    cells = []
    for workload in args.workloads.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            c = cell(workload, batch, args)
            cells.append(c)
            print(f"{workload:6s} B={batch}  auto/plain {c['auto_vs_plain']:.3f}  best {c['best']} "
                  f"{c['tokens_per_second'][c['best']] / c['tokens_per_second']['plain']:.3f}x plain  "
                  f"auto/best {c['auto_vs_best']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(settings=vars(args) | {"json": str(args.json)}, cells=cells), indent=1))
    return cells


if __name__ == "__main__":
    main(sys.argv[1:])
