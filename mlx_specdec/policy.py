"""Choosing the draft length k of each speculative round from measured acceptance and measured costs.

A round that drafts k tokens yields, per row, E(k) = 1 + a_1 + a_1 a_2 + ... + a_1...a_k tokens,
where a_i is the acceptance of draft position i given that every position before it was accepted
(the 1 is the target's own token, which every round yields). For a constant rate a this is
(1 - a^(k+1)) / (1 - a) (Leviathan, Kalman & Matias 2023, arXiv:2211.17192). The round costs
k * t_draft(B) + t_verify(B, k + 1) for a batch of B rows; k = 0 is plain decoding at
t_verify(B, 1) per token. The policy picks the k (0 included) with the highest B * E(k) / cost(k).

Nothing here assumes verification is cheap. On Apple GPUs quantized kernels are far from
memory-bound: verifying 2/4/9 tokens has measured 1.7x/3.1x/6.1x a 1-token forward, and a
mixture-of-experts target at B=1 wakes other experts for each extra token. So every cost is
measured in this process, for this batch size; unmeasured ones are estimated from measured
neighbours, never taken as free (see CostModel). A costly target then switches drafting off on
its own, with no model-name special case.

Nothing is timed on the side: every measurement is a real round's. A batch size first decodes
plainly for a few rounds, which times plain decoding there (the yardstick of every choice); its
draft lengths meanwhile borrow their neighbours' costs. A draft length whose verify cost is not yet
measured at this batch size is explored (run once or twice for real, shortest first) when it could
beat the best measured choice even if verifying its k + 1 tokens cost no more than the longest
measured shorter pass, plus half the measured lengths' average growth per token for each token past
it: an optimistic bound, so a length that might pay gets measured, while one that could not pay
even then (a drafter that never agrees) is never tried. Exploration ends once each length that could
pay has EXPLORE_SAMPLES timings; it replaces up-front calibration passes, whose output was thrown away.
Once a length is chosen, only its cost gets new samples; so now and then a measured length near it
runs instead (oftener the nearer its estimated rate is to the best's, within REFRESH_BUDGET of
decoding time), and a cost timed in a slow (or lucky) moment does not stand for good.
Costs timed at a context the decoding has since outgrown twice over expire (CONTEXT_SLACK): each
such cell stands at its old cost scaled by how much dearer the cells timed since have become.
Plain decoding, the yardstick, is timed again the same way, by a short stretch of plain rounds
spaced to cost at most PLAIN_REFRESH_BUDGET (1.5%) of decoding time by the measured gain.

While drafting is off the policy probes, PROBE_ROUNDS drafting rounds at the best length by the
estimates, so it can come back: every PROBE_GAP_ROUNDS plain rounds until RECHECK_ROUNDS drafting
rounds are timed (a first decision rests on a few rows), then spaced so that, by the measured
costs and acceptance, probes add at most PROBE_OVERHEAD_BUDGET (1.5%) to plain decoding time, also
when no draft is ever accepted; a probe's cost includes leaving the pipelined plain rounds and
coming back (SWITCH_ROUNDS). Within MIN_GAIN of plain either way, drafting stays on or off as it
was: near break-even timing jitter alone would flip it.

A drafting round times its drafter apart from its verify pass only now and then: the first timed
one at a batch size, then one in DRAFT_TIMING_INTERVAL. Waiting for the drafts idles the device
while the verify pass is built, so such a round costs more than the others and gives the drafter's
cost alone; the others' verify cost is their whole time less k drafter steps at that cost as it
stands whenever the cell is read. A length's cost, its verify cell plus k steps, is then what its
rounds took, whatever the drafter's estimate: an error there moves between the two parts and
cancels. What a drafter estimate cannot cancel in is kept out of its reach: lengths are fitted to
grow as whole rounds, and plain decoding's cost is taken from ratios of whole rounds to it.

A static batch (rows that started together with as many tokens to go, and that no request waits
to join) lasts as long as its last row. Plain decoding ends such rows in the same round; drafting
moves each row by its own accepted drafts, so they finish apart, and the batch's last rounds run
with fewer rows at nearly a full round's cost. The engine measures what each static batch that
drafted lost that way and how far apart its rows drifted (`record_finish`); for such batches each
length's rate is weighed less the loss the last FINISH_SAMPLES of them at that batch size put on
it (deeper drafts spread rows further, see `round_spreads`), in the choice of length and of
drafting at all, as in the probes while drafting is off there. A batch whose rows are replaced as
they leave (a busy server) loses nothing of the kind and decides as before.

The policy object is meant to be owned by the loaded model and reused across requests, so what it
has measured carries over; `to_json` / `from_json` save it per model and machine. What a new process
reads back is a prior, not a verdict: each kept cost stands until this process measures that cell
(then only its own samples count), kept costs not yet re-measured are scaled by how this process's
measurements compare with the kept ones, and a kept decision not to draft is re-checked with a
probe in the first round that would decode plainly, and again every PROBE_GAP_ROUNDS until
RECHECK_ROUNDS drafting rounds are timed (the kept numbers may come from a busy machine). Per-request
overrides (a fixed k, or 0 = off) bypass `decide` with `fixed_decision`, and still `record`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from .errors import InputError

K_MAX = 8
"""Longest draft any round may use: past 8 even a perfect drafter gains little (E(k) <= k + 1 while
verify cost keeps growing), and it bounds the slack the caches keep per step."""

PRIOR_ACCEPTANCE = 0.5
"""Acceptance assumed for draft position 1 before anything is measured: the uninformative middle,
so the first decisions neither rule drafting out nor bet on it."""

PRIOR_WEIGHT = 2.0
"""How many observed rows a prior is worth: a first round at B=1 moves the estimate a third of the
way to what it saw, a round at B=8 mostly replaces it."""

ACCEPTANCE_HALF_LIFE_ROUNDS = 32
"""Rounds after which an observation counts half as much as a new one. Acceptance follows the text
(prose, code, a quoted passage), which changes over tens of tokens; 32 rounds (~100 tokens while
drafting) still averages out the coin flips of single rows."""

_DECAY = 0.5 ** (1.0 / ACCEPTANCE_HALF_LIFE_ROUNDS)

RECHECK_ROUNDS = 4
"""Timed drafting rounds a policy owes before a decision not to draft waits out the probe interval:
until then such a decision probes every PROBE_GAP_ROUNDS plain rounds (a kept policy's first at
once). A kept policy's numbers may come from a busy machine; a new one's first decision rests on
its few exploring rounds, and one round's row is too little to turn drafting back on by. At B = 1
on the demo pair a k = 1 round costs about 1.8 plain rounds, so drafting pays only deep, and is
seen to only once acceptance is known: in bench/policy_sim.py with those costs
(`--round-overhead 0.27`), an exploration that saw 2 of 4 drafts accepted (of a drafter right
81% of the time) held drafting off for whole cells, auto at 0.77x the best fixed k. Exploring
rounds count, so a new policy that drafts owes nothing after its first few rounds; one more probe
in the first 64 tokens costs a few plain rounds once per process."""

PROBE_GAP_ROUNDS = 16
"""Most rounds by which a new observation of draft position 1 ages the ones before it. Probes come
over a hundred plain rounds apart (see PROBE_OVERHEAD_BUDGET); aged by all of those, what came
before a probe would weigh a twentieth of it, and each probe's single row would decide alone
whether drafting comes back. Aged by 16, the estimate spans the last three or four probes."""

COST_SAMPLES = 16
"""Timing samples kept per cost cell, newest first out: verify time drifts as the context grows, so
old samples must go. Sixteen (the chosen length's last 40-60 tokens) let the quantile see past a
burst of slow ones without resting on one or two lucky ones: with eight, a length whose second
lowest sample was lucky looked cheaper than it is, and auto spread its rounds over lengths around
the best (in bench/policy_sim.py auto moved 0.2-0.5% nearer the best fixed k on average with
sixteen, up to 1.6% in a cell; its lowest cell 0.937 -> 0.945 at 25% jitter). The price: a
length timed wholly in a busy moment needs four new samples, not two, before it looks as cheap
as it is (four re-timings, see DraftPolicy._refresh); with slow spells in the simulation the two
balance (on average +0.2%)."""

CONTEXT_SLACK = 256
"""A cost sample expires once the context has grown past twice the one it was timed at, and by at
least this many tokens. Verify passes and drafter steps attend over the context, and not alike: on
the demo pair at a 512-token context, verifying 2 tokens cost about 1.15x what it did at a 32-token
prompt and verifying 6 about 1.3x. Left to the quantile, a cell's COST_SAMPLES samples from the
short context held its cost there for 13 rounds, and a length not run since held its cost for good:
auto went on drafting deep at 512 on costs timed at 32. The slack keeps short contexts, where
reading the weights dominates, from expiring within every answer."""

COST_QUANTILE = 0.25
"""A cell's cost is this low quantile of its samples: timings are noise on top of a floor (another
process taking the cores, a page fault, a GC pause), so the low end is what the work costs; a mean
is dragged up by one busy moment. The quantile rather than the minimum, so one lucky sample does
not rule either."""

DRAFT_STEP_PRIOR = 0.25
"""A drafter step is assumed to cost this fraction of a 1-token target forward until the first
drafting round (or probe) measures it. MTP assistants are a few layers against the target's
dozens, so this overstates them: not free, yet not so dear that drafting is never tried."""

MIN_GAIN = 0.02
"""Drafting must beat plain decoding's expected throughput by this fraction: timings jitter by a few
percent, and a round that drafts adds work the cost model does not see (acceptance, sampling)."""

EXPLORE_SLOPE = 0.5
"""Fraction of the timed drafting lengths' average growth per verified token that each token past
them adds when bounding an untimed length's cost (see DraftPolicy._exploration). Held flat at the
longest timed pass instead, every deep length looked as if it might pay whenever the estimate of
the deep positions' acceptance (a few rows, then borrowed by the positions past them) wobbled up:
on the demo pair at B=4 auto explored k = 5..8 in runs long after its warm-up, at 2-3x the cost of
its usual rounds, and lost up to 10% of such a run. The average over the timed lengths, not the
growth between two neighbours, because costs need not grow smoothly: on this CPU at B=4 verifying
4 tokens costs what 3 do. Half of it, so that the bound stays optimistic where the cost flattens."""

EXPLORE_SAMPLES = 2
"""Timings of a verify length at a batch size before it stops being explored: the low quantile of
two is their minimum, so one slow first pass (a page fault, a kernel built on first use) does not
rule a length out."""

PLAIN_WINDOW = 4
"""Plain rounds whose mean time makes one cost sample (see DraftPolicy._record_plain)."""

PLAIN_SETTLE = 2
"""Plain rounds after a drafting round before one times plain decoding. The first is never steady
(it waits for its own graph); the second still runs slow: on the demo pair at B = 1 the
steady plain rounds of auto's stretches took 4.11, 3.9, 3.8 and 3.48 ms, the first to the fourth,
against 3.54 ms (low quartile) in a plain run. With it in every sample, plain decoding was costed
at 5.1-5.3 ms a round at a 512-token prompt where a plain run's rounds took 4.5-4.9 (median), and
auto drafted where the fixed k ran at 0.80-1.08x plain decoding."""

PLAIN_REFRESH_BUDGET = 0.015
"""Most decoding time that stretches re-timing plain decoding while drafting is on may cost, by
the measured costs (see DraftPolicy._plain_due)."""

SWITCH_ROUNDS = 2.0
"""Plain rounds' worth of time that leaving pipelined plain decoding for a drafting round and coming
back costs beyond the rounds themselves: the drafting round first reads the plain round in flight,
and the first plain round after it waits for its own graph (2-4 steady rounds' worth on the demo
pair). A stretch of plain rounds amid drafting pays it, and so does a probe amid plain rounds."""

ALIGN_ROUNDS = 16
"""Rounds after plain decoding's first timing at a batch size (which precedes every drafting
length's) before it is timed again, once, beside the lengths explored meanwhile: see
CostModel.drift. Enough rounds for the acceptance estimate to say whether drafting pays at all,
so the stretch neither delays that verdict nor comes where drafting is off anyway."""

PAIR_SAMPLES = 4
"""Most verify samples recorded between a plain timing and a drafting length's for the two to make
one sample of their ratio (see CostModel.plain_cost). A drafting round records one, a plain stretch
one every PLAIN_WINDOW rounds (the drafting round right after it one that pairs with nothing, see
DraftPolicy.record), so a pair is a few rounds apart: the same moment of a machine whose
speed moves by the minute. In bench/policy_sim.py 8 let more pairs straddle a change of speed
(auto's worst cell against plain decoding 0.987 -> 0.981 without spells)."""

PAIR_PLAIN_TIMINGS = 3
"""Distinct plain timings a length's ratio samples must span before they set plain decoding's cost
(see CostModel.plain_cost). At 1 the first stretch's one plain sample set every early ratio, and
where it was lucky drafting stayed off for hundreds of rounds where it paid 7% (auto 0.5-1% further
from the best fixed k at B = 4 in bench/policy_sim.py); at 3 auto is where it was without pairs
where drafting pays."""

REFRESH_SPAN = 2
"""Measured draft lengths within this many of the chosen one are re-timed now and then (see
DraftPolicy._refresh). Two, not one: costs need not grow smoothly with the length (on this CPU at
B = 4 the demo pair's k = 2 costs 25-30% more than k = 1 and nearly what k = 3 does), so the best
length's neighbours can both lose while the length beyond one of them is the one that pays."""

REFRESH_BUDGET = 0.005
"""Most decoding time that re-timing the lengths around the chosen one may cost, by the estimated
rates (see DraftPolicy._refresh)."""

REFRESH_INTERVAL = 16
"""Fewest rounds between two re-timings of one length: where the throughput curve is flat they cost
next to nothing, yet a sample every 16 rounds is all a 16-sample cell needs."""

REFRESH_MAX_INTERVAL = 64
"""Most rounds between two re-timings of one length, however much it seems to lose: a length timed
in a busy moment (at 3x its cost, say) looks like a loss for as long as it is not timed again, and
it needs a quarter of its samples new before its cost is what it is (COST_QUANTILE)."""

DRAFT_TIMING_INTERVAL = 32
"""Rounds between drafting rounds that time the drafter apart from the verify pass (see
DraftPolicy.draft_timing_due); the others take its cost as measured and overlap the two. Such a
round costs about a third of a plain round more (its verify pass built unhidden), so at 8 they
took about 3% of decoding time on the demo pair, and a stale drafter cost misleads little: a
length's measured cost does not depend on it (see the module docstring)."""

TAIL_ROUNDS = 16
"""Rounds a batch size smaller than a timed one may run on costs held from it before it times
plain decoding of its own (see DraftPolicy._tail)."""

FINISH_SAMPLES = 8
"""Static batches (see DraftPolicy.record_finish) whose finishing losses make the estimate at their
batch size: the median of their losses per unit of spread, so one batch whose rows happened to
finish far apart does not hold drafting off for the next."""

PROBE_ROUNDS = 3
"""Drafting rounds in a probe, all at the best length by the estimates. The first leaves the
pipelined plain rounds and pays for the switch, so its time pairs with no plain timing (see
DraftPolicy.record); the two after it are steady rounds, timed as any drafting round and paired
with the plain timing before them. While drafting is off they are the only new samples of what
drafting costs and of its ratio to plain decoding: one-round probes gave neither (a switching
round's time only), so a choice made on a few early samples, or on ratios from before drafting
went off, stood for good. With drafting off on timings that said it lost and its rounds then
1.25x plain decoding, one-round probes had it back for 2 rounds of the next 3000, three-round
ones for good after three probes (tests/test_policy.py). In a `mlx-specdec bench` run on the
demo pair drafting was off in 99% of the prose rounds at B = 1, where k = 4 paid 1.27x."""

PROBE_OVERHEAD_BUDGET = 0.015
"""Most time probes may add to plain decoding: the interval between probes is at least
(PROBE_ROUNDS * (a probe round's cost - E(k) plain rounds) + SWITCH_ROUNDS plain rounds) /
(PROBE_OVERHEAD_BUDGET * plain round cost): at least SWITCH_ROUNDS / PROBE_OVERHEAD_BUDGET (134)
plain rounds. Half of what a user would notice: a probe also costs what the model leaves out
(acceptance, sampling)."""


# ---------------------------------------------------------------------------------------------------
# Pure functions


def parse_draft_tokens(text: str) -> int | str:
    """A draft length as a user types it (flags, chat's /draft, bench's modes): "auto", "off"
    (or "plain", "none", "0": plain decoding), or k in 1..K_MAX ("k=3" too)."""
    value = str(text).strip().lower().removeprefix("k=")
    if value == "auto":
        return "auto"
    if value in ("off", "plain", "none"):
        return 0
    try:
        k = int(value)
    except ValueError:
        k = -1
    if not 0 <= k <= K_MAX:
        raise InputError(f"draft length must be auto, off or an integer 1..{K_MAX}, got {text!r}")
    return k


def expected_tokens(acceptance: Sequence[float], k: int) -> float:
    """E(k) = 1 + a_1 + a_1 a_2 + ... + a_1...a_k: tokens per row from a round that drafts k."""
    if not 0 <= k <= len(acceptance):
        raise ValueError(f"k must be in 0..{len(acceptance)} (acceptance has {len(acceptance)} positions), got {k}")
    total, reach = 1.0, 1.0
    for a in acceptance[:k]:
        reach *= a
        total += reach
    return total


def tokens_per_second(
    acceptance: Sequence[float], t_draft: float, t_verify: Sequence[float], batch_size: int
) -> list[float]:
    """Expected throughput B * E(k) / (k * t_draft + t_verify[k]) for k = 0..len(t_verify) - 1,
    where t_verify[k] is the time to verify k + 1 tokens per row and t_draft one drafter step."""
    out, total, reach = [], 1.0, 1.0  # E(k) built up as k grows, not summed again for each k
    for k, t in enumerate(t_verify):
        if k:
            reach *= acceptance[k - 1]
            total += reach
        out.append(batch_size * total / (k * t_draft + t))
    return out


def round_spreads(acceptance: Sequence[float], k_max: int) -> list[float]:
    """For k = 0..k_max: sqrt(Var(X) / E(X)) of X, the tokens a row takes from a round that drafts
    k at these acceptances. Rows that take X a round apart drift apart by sqrt(Var(X) / E(X)) times
    the square root of their tokens, so a static batch's rows finish that far apart (see
    DraftPolicy.record_finish): 0 for plain decoding, more the deeper the drafts."""
    out, mean, square, reach = [0.0], 1.0, 1.0, 1.0  # P(X > j) is a_1 ... a_j
    for j, a in enumerate(acceptance[:k_max], start=1):
        reach *= a
        mean += reach
        square += (2 * j + 1) * reach  # E(X^2) = sum over j of (2j + 1) P(X > j)
        out.append(math.sqrt(max(0.0, square - mean * mean) / mean))
    return out


def token_variance(took: Sequence[int]) -> float:
    """The variance across rows (over n - 1) of the tokens each row took in one round of a static
    batch: summed over its rounds of all rows through the one its first row finished in, what
    `finishing_spread` reads."""
    mean = sum(took) / len(took)
    return sum((n - mean) ** 2 for n in took) / (len(took) - 1)


def finishing_spread(variance: float, rows: int, tokens: int) -> float:
    """`DraftPolicy.record_finish`'s `spread` for a static batch of `rows` rows that decoded
    `tokens` in all, from its summed `token_variance`: the rows' drift per token, as
    `round_spreads` has it for a length."""
    return math.sqrt(variance * rows / tokens)


def loss_per_spread(lost: float, spread: float) -> float:
    """A static batch's `lost` per unit of its `spread` (see DraftPolicy.record_finish): a tail at
    the full batch's pace or quicker lost nothing, and rows that never drifted apart lost nothing
    to drafting (they finish in one round)."""
    return max(0.0, lost) / spread if spread > 0 else 0.0


def finishing_loss(seconds: float, tokens: int, first_seconds: float, first_tokens: int) -> float:
    """`DraftPolicy.record_finish`'s `lost` for a static batch that decoded `tokens` in `seconds`,
    `first_tokens` of them in the `first_seconds` through the round its first row finished in:
    the share of its time that the rounds after that took beyond their tokens at the pace before."""
    if not 0 < first_seconds <= seconds or not 0 < first_tokens <= tokens:
        raise ValueError(f"the first row's finish ({first_seconds} s, {first_tokens} tokens) must lie "
                         f"within the batch's ({seconds} s, {tokens} tokens)")
    pace = first_tokens / first_seconds
    return ((seconds - first_seconds) - (tokens - first_tokens) / pace) / seconds


def position_counts(k: int, accepted: Sequence[int],
                    limits: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Per draft position i = 1..k: rows that reached it (all before accepted) and rows that
    accepted it, from each row's count of accepted drafts this round. With `limits`, row r
    drafted only its first limits[r] positions (rows of one round may draft different lengths):
    positions past them were never tried, so they are not counted as reached."""
    limits = [k] * len(accepted) if limits is None else limits
    for n, limit in zip(accepted, limits):
        if not 0 <= n <= limit <= k:
            raise ValueError(f"accepted drafts per row must be in 0..k={k}, got {list(accepted)}, "
                             f"and within each row's limit {list(limits)}")
    reached = [sum(n >= i and i < limit for n, limit in zip(accepted, limits)) for i in range(k)]
    return reached, [sum(n > i for n in accepted) for i in range(k)]


# ---------------------------------------------------------------------------------------------------
# Acceptance


@dataclass
class AcceptanceEstimate:
    """Decayed running estimate of a_i, the acceptance of draft position i given all before accepted.

    Each position keeps its accepted and reached row counts as of the round it was last observed;
    an observation `age` rounds old weighs 2^(-age / ACCEPTANCE_HALF_LIFE_ROUNDS) against a new one.

    Position 1 is observed in every drafting round and every probe. Its prior (PRIOR_ACCEPTANCE,
    worth PRIOR_WEIGHT rows) ages like an observation made at round 0, and between observations its
    estimate stays put: a long plain stretch neither erases what was learned nor drifts back to the
    prior (which would turn drafting on without a probe), nor ages it by more than PROBE_GAP_ROUNDS
    when the next probe comes (else one row's coin flip would outweigh all that came before).

    A deeper position is observed only when the policy drafts that far, so its evidence fades with
    age toward the estimate of the position before it (worth PRIOR_WEIGHT rows): a position never
    drafted borrows a_{i-1}, and one that was poor during a hard passage is not believed poor forever.
    """

    accepted: list[float]
    reached: list[float]
    last_round: list[int]
    prior_weight: float = PRIOR_WEIGHT  # position 1's prior, aged with its evidence

    @classmethod
    def empty(cls, k_max: int) -> AcceptanceEstimate:
        return cls([0.0] * k_max, [0.0] * k_max, [0] * k_max)

    def update(self, now: int, k: int, accepted: Sequence[int], limits: Sequence[int] | None = None) -> None:
        """Add one round that drafted k tokens (row r only its first limits[r], if given);
        positions beyond the estimate's length are ignored."""
        reached, took = position_counts(k, accepted, limits)
        for i in range(min(k, len(self.reached))):
            if reached[i] == 0:  # no row got this far, nor further
                break
            elapsed = now - self.last_round[i]
            age = _DECAY ** (min(elapsed, PROBE_GAP_ROUNDS) if i == 0 else elapsed)
            self.accepted[i] = self.accepted[i] * age + took[i]
            self.reached[i] = self.reached[i] * age + reached[i]
            if i == 0:
                self.prior_weight *= age
            self.last_round[i] = now

    def rates(self, now: int) -> list[float]:
        """a_1..a_k_max as of round `now`."""
        out: list[float] = []
        for i, (took, reached, last) in enumerate(zip(self.accepted, self.reached, self.last_round)):
            if i == 0:
                weight, total = self.prior_weight, reached + self.prior_weight
                out.append((took + weight * PRIOR_ACCEPTANCE) / total if total > 0 else PRIOR_ACCEPTANCE)
            else:
                age = _DECAY ** (now - last)
                out.append((took * age + PRIOR_WEIGHT * out[-1]) / (reached * age + PRIOR_WEIGHT))
        return out


# ---------------------------------------------------------------------------------------------------
# Costs


def _interpolate(points: dict[int, float], x: int, scale_below: bool, extrapolate: bool = True) -> float | None:
    """Linear interpolation between the measured points around x. Beyond the largest, proportional
    to x (no amortisation: per-token and per-row costs do not grow with size, so this is an upper
    bound). Below the smallest, proportional again if scale_below (a lower bound), else held."""
    if x in points:
        return points[x]
    below, above = [p for p in points if p < x], [p for p in points if p > x]
    if below and above:
        lo, hi = max(below), min(above)
        return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)
    if not extrapolate or not points:
        return None
    if below:
        return points[max(below)] * x / max(below)
    return points[min(above)] * (x / min(above) if scale_below else 1.0)


class CostModel:
    """Measured seconds: t_verify(B, L) per target pass over L tokens in each of B rows, and
    t_draft(B) per drafter step; each cell the COST_QUANTILE of its last COST_SAMPLES samples,
    or its kept prior (see `from_prior`) until this process measures it.

    Each sample carries the context (tokens in the longest row) it was timed at. When a sample
    comes at a context past twice an older one's and CONTEXT_SLACK tokens more, the older samples
    at that batch size expire; a cell left with none becomes a prior at its last cost, as a kept
    one is: it stands, rescaled by the cells re-timed since, until it is timed again.

    An unmeasured (B, L) is estimated, in this order, and never taken as free:
      1. between two measured lengths at this B: linear interpolation in L;
      2. else the same L at other measured batch sizes (each from its own lengths, by 1 or 3):
         linear interpolation in B; above the largest scaled by B/B', below the smallest held;
      3. else from the nearest measured length at this B, proportional to L: cost grows with tokens
         as if nothing amortised. Above the longest measured length that overstates the cost; below
         the shortest it understates plain decoding. Both err against drafting.
    Measured lengths at a B are first fitted to grow with L (see `lengths`), and finally a
    length never costs less than a shorter length measured at this B.

    ``verify`` and ``draft`` hold the current estimate of every cell; ``version`` changes whenever
    one does, or what plain decoding's cost is derived from (`plain_cost`: the ratios of paired
    timings, the lengths' costs when plain decoding was last timed), so a caller can keep what it
    derived from them until then.
    """

    def __init__(self, verify: dict[tuple[int, int], float] | None = None, draft: dict[int, float] | None = None):
        self.verify: dict[tuple[int, int], float] = {}
        self.draft: dict[int, float] = {}
        self._samples: dict[tuple, list[float]] = {}  # ("verify", B, L) or ("draft", B): this process's
        self._contexts: dict[tuple, list[int]] = {}  # the context of each of those samples
        # Drafter steps each verify sample's seconds still hold (see `record_verify`).
        self._steps: dict[tuple, list[int]] = {}
        self._oldest: dict[int, int] = {}  # by B: the shortest context any sample there was timed at
        self._priors: dict[tuple, float] = {}  # kept, or expired (see above), until measured again
        self._read_back: set[tuple] = set()  # the priors from an earlier process, until their cells expire
        self.expiries = 0  # moves whenever cells expire (`explored` turns false for some)
        # By B: the drafting lengths' costs as of plain decoding's last timing there (see `drift`).
        self._yardstick: dict[int, dict[int, float]] = {}
        # (B, L) -> t_verify(B, L) / t_verify(B, 1) from pairs of samples timed PAIR_SAMPLES apart
        # at most (see `plain_cost`), and what pairing needs: the samples recorded so far, and
        # each verify cell's last sample as (its number, seconds). A drafting round's seconds
        # are its whole time where it holds its drafter steps (see `_round_cost`).
        self._ratios: dict[tuple[int, int], list[tuple[float, int]]] = {}
        self._recorded = 0
        self._last: dict[tuple[int, int], tuple[int, float]] = {}
        # `lengths` by B until the next sample: one derivation fits each batch size's row many
        # times over (every length it estimates reads its neighbours' rows).
        self._fits: dict[int, dict[int, float]] = {}
        self.version = 0
        self.firsts = 0  # cells measured for the first time in this process
        self.explorations = 0  # moves whenever `explored` may have changed for some cell
        for (b, n), t in (verify or {}).items():
            self.record_verify(b, n, t)
        for b, t in (draft or {}).items():
            self.record_draft(b, t)

    @classmethod
    def from_prior(cls, verify: dict[tuple[int, int], float], draft: dict[int, float]) -> CostModel:
        """Costs an earlier process measured, each standing until this one measures its cell."""
        costs = cls()
        costs._priors = {("verify", b, n): t for (b, n), t in verify.items()}
        costs._priors.update({("draft", b): t for b, t in draft.items()})
        costs._read_back = set(costs._priors)
        costs.verify, costs.draft = dict(verify), dict(draft)
        return costs

    @property
    def kept(self) -> int:
        """Cells standing on a prior (kept, or whose samples expired) not yet timed again."""
        return sum(key not in self._samples for key in self._priors)

    def record_verify(self, batch_size: int, length: int, seconds: float, context: int = 0,
                      paired: bool = True, draft_steps: int = 0) -> None:
        """``paired=False``: a sample of its cell that makes no ratio (see `_pair`).
        ``draft_steps``: drafter steps that ``seconds`` also holds (a drafting round that did not
        time its drafts apart). The cell takes them off at the drafter's cost as it stands whenever
        it is read (`_value`), not as it stood when the round ran: the first drafter timing at a
        batch size comes from the round that leaves plain decoding, 1.25-1.5x the next ones on the
        demo pair, and every sample until the next timing (up to DRAFT_TIMING_INTERVAL rounds
        later) lost that much too much. Mixed with later ones, one length's ratios to plain
        decoding ran from 1.2 to 2.5 in one process. Ratios and `drift` take the round whole
        (`_round_cost`), which no drafter estimate moves."""
        _check_positive(batch_size=batch_size, length=length, seconds=seconds)
        if not 0 <= draft_steps < length:
            raise ValueError(f"draft_steps must be in 0..{length - 1} for a pass over {length} tokens, got {draft_steps}")
        self._record(("verify", batch_size, length), seconds, context, paired, draft_steps)

    def record_draft(self, batch_size: int, seconds_per_step: float, context: int = 0) -> None:
        _check_positive(batch_size=batch_size, seconds_per_step=seconds_per_step)
        self._record(("draft", batch_size), seconds_per_step, context)

    def _record(self, key: tuple, seconds: float, context: int, paired: bool = True, steps: int = 0) -> None:
        self._fits.clear()  # a new sample moves a fit even where the cell's quantile stays
        if _outgrown(self._oldest.get(key[1], context), context):
            self._expire(key[1], context)
        self._oldest[key[1]] = min(self._oldest.get(key[1], context), context)
        samples, contexts = self._samples.setdefault(key, []), self._contexts.setdefault(key, [])
        drafts = self._steps.setdefault(key, [])
        samples.append(seconds)
        contexts.append(context)
        drafts.append(steps)
        if len(samples) > COST_SAMPLES:
            del samples[0], contexts[0], drafts[0]
        if len(samples) == EXPLORE_SAMPLES:
            self.explorations += 1
        self._set(key, self._value(key))
        if key[0] == "verify":
            self._pair(key[1], key[2], seconds, paired)
        if len(samples) == 1:  # a new cell, or the first timing of one standing on a prior
            self.firsts += 1
            if key in self._priors:
                self._rescale_priors(key[1])
        if key[0] == "verify" and key[2] == 1:
            yardstick = self._timed_lengths(key[1])
            if yardstick != self._yardstick.get(key[1]):  # while drafting is off it stands still
                self._yardstick[key[1]] = yardstick
                self.version += 1

    def _expire(self, batch_size: int, context: int) -> None:
        """Drop the samples at this batch size timed at a context this one has outgrown (see the
        class docstring). Every cell's cost as it stood becomes its prior; the cells that keep
        samples (timed since at longer contexts) show how much dearer the context has made them,
        and the cells left with none are rescaled by that (`_rescale_priors`), and again as each
        is timed anew."""
        here = {key for key in list(self._samples) + list(self._priors) if key[1] == batch_size}
        outgrown = lambda c: _outgrown(c, context)
        timed = {key: self._contexts[key] for key in here & self._samples.keys()}
        self._oldest[batch_size] = min([context] + [c for cs in timed.values() for c in cs if not outgrown(c)])
        if not any(outgrown(c) for cs in timed.values() for c in cs):
            return  # those samples had already left their cells (COST_SAMPLES)
        self._priors.update({key: self._get(key) for key in here})
        self._read_back -= here
        for key, contexts in timed.items():
            kept = [(t, c, n) for t, c, n in zip(self._samples[key], contexts, self._steps[key]) if not outgrown(c)]
            if kept:
                self._samples[key] = [t for t, _, _ in kept]
                self._contexts[key] = [c for _, c, _ in kept]
                self._steps[key] = [n for _, _, n in kept]
                self._set(key, self._value(key))
            else:
                del self._samples[key], self._contexts[key], self._steps[key]
        self._yardstick.pop(batch_size, None)  # its lengths' costs are from the old context
        for cell in [cell for cell in self._ratios if cell[0] == batch_size]:
            del self._ratios[cell]  # and so are their ratios to plain decoding
        self.version += 1
        self.explorations += 1
        self.expiries += 1
        self._rescale_priors(batch_size)

    def _pair(self, batch_size: int, length: int, seconds: float, paired: bool) -> None:
        """One ratio sample (see `plain_cost`) for each pair this verify sample makes: with each
        drafting length's last sample if this one times plain decoding, else with plain decoding's
        last sample; a pair's two samples at most PAIR_SAMPLES apart. An unpaired sample makes
        none, now or later."""
        self._recorded += 1
        if not paired:
            return
        near = lambda cell: self._recorded - self._last[cell][0] <= PAIR_SAMPLES  # noqa: E731
        if length == 1:
            pairs = [(n, self._last[b, n][1] / seconds, self._recorded) for b, n in self._last
                     if b == batch_size and n > 1 and near((b, n))]
        else:
            plain = self._last.get((batch_size, 1))
            pairs = [(length, seconds / plain[1], plain[0])] if plain and near((batch_size, 1)) else []
        for n, ratio, plain_sample in pairs:
            ratios = self._ratios.setdefault((batch_size, n), [])
            ratios.append((ratio, plain_sample))
            if len(ratios) > COST_SAMPLES:
                del ratios[0]
        if pairs:
            self.version += 1
        self._last[batch_size, length] = (self._recorded, seconds)

    def plain_cost(self, batch_size: int, plain: float) -> float:
        """Plain decoding's cost at this batch size as the drafting lengths' costs now put it:
        the cost of the length with the most ratio samples that span PAIR_PLAIN_TIMINGS plain
        timings (the shortest among equals), over the median of those ratios. Before any length
        has them (the first rounds at a batch size, or of a kept policy), ``plain``, its cell,
        moved by `drift`.

        Every choice weighs a drafting length's cost against plain decoding's, and this machine's
        speed moves by the minute. Plain decoding is timed in stretches while drafting is on, a
        drafting length while it runs, so the two cells hold samples from different moments: a
        plain cost from a slow spell beside a length's from a quick one, or the length's cost when
        plain decoding was last timed (`drift`) read from a cell that had not seen the spell yet,
        made drafting look as if it paid where it lost 10-15% (bench/policy_sim.py, drafters
        that only just lose at B = 4 with slow spells: auto at 0.87-0.93x plain decoding). A ratio
        from two timings a few rounds apart holds whatever the machine's speed. Ratios sharing
        one plain timing share its noise: with fewer than three plain timings behind them, a
        lucky one held drafting off where it paid; and each plain timing gets one vote (the
        median of its ratios), else the drafting rounds beside one slow plain timing outvoted
        the two timings after it, and drafting came back for rounds where it lost."""
        counted = [(len(r), -n) for (b, n), r in self._ratios.items()
                   if b == batch_size and (b, n) in self.verify
                   and len({sample for _, sample in r}) >= PAIR_PLAIN_TIMINGS]
        if not counted:
            return plain * self.drift(batch_size)
        length = -max(counted)[1]
        # One vote per plain timing: the median of each one's ratios, then of those.
        by_timing: dict[int, list[float]] = {}
        for ratio, sample in self._ratios[batch_size, length]:
            by_timing.setdefault(sample, []).append(ratio)
        return self._round_cost(batch_size, length) / statistics.median(map(statistics.median, by_timing.values()))

    def _timed(self, batch_size: int):
        """The drafting lengths with EXPLORE_SAMPLES timings in this process at this batch size."""
        return (n for b, n in self.verify
                if b == batch_size and n > 1 and self.samples(("verify", b, n)) >= EXPLORE_SAMPLES)

    def _timed_lengths(self, batch_size: int) -> dict[int, float]:
        """`_timed`, by length, at their current cost as `_round_cost` reads it."""
        return {n: self._round_cost(batch_size, n) for n in self._timed(batch_size)}

    def _round_cost(self, batch_size: int, length: int) -> float:
        """A verify cell with the drafter steps its samples hold (see `record_verify`) put back at
        the drafter's current cost: the low quantile of those rounds' whole times, which no drafter
        estimate moves. Ratios to plain decoding are of whole rounds too (`_pair` takes the
        samples as recorded), and `drift` compares these. A cell whose samples hold no drafting
        (recorded so by a caller) is its verify cost alone."""
        key = ("verify", batch_size, length)
        held = length - 1 if any(self._steps.get(key, ())) else 0
        return self.verify[batch_size, length] + held * (self._step(batch_size))

    def drift(self, batch_size: int) -> float:
        """How much dearer the drafting lengths at this batch size are now than when plain decoding
        was last timed there: the median ratio of their costs now to then (1 when none compares).

        Plain decoding is timed only now and then while drafting is on, its lengths every round:
        on a machine whose speed moves with other processes' load, a plain cost timed in a slow
        moment made drafting look as if it paid, timed in a quick one as if it did not. All
        lengths run the same kernels, so the yardstick moves with them, and only the ratio of the
        two is taken from timings close in time (refreshed by each plain timing). `plain_cost`
        uses this only until ratios from paired timings take over: a cell's cost is a quantile of
        sixteen samples and trails the machine's speed, so a yardstick read from it mixes
        moments too."""
        then, now = self._yardstick.get(batch_size) or {}, self._timed_lengths(batch_size)
        ratios = sorted(now[n] / t for n, t in then.items() if n in now)
        return ratios[len(ratios) // 2] if ratios else 1.0

    def aligned(self, batch_size: int) -> bool | None:
        """Whether plain decoding at this batch size was timed in this process since a drafting
        length had EXPLORE_SAMPLES timings there (so `drift` can follow it); None while no length
        has them yet. Asked every round: the yardstick answers first, without costing a length
        (one is set only from such lengths, and dropped when their samples expire)."""
        if self._yardstick.get(batch_size):
            return True
        return False if next(self._timed(batch_size), None) else None

    def samples(self, key: tuple) -> int:
        """Timings this process has of a cell: ("verify", B, L) or ("draft", B)."""
        return len(self._samples.get(key, ()))

    def _cells(self, key: tuple) -> tuple[dict, object]:
        return (self.verify, key[1:]) if key[0] == "verify" else (self.draft, key[1])

    def _set(self, key: tuple, value: float) -> None:
        cells, cell = self._cells(key)
        if cells.get(cell) != value:
            cells[cell] = value
            self.version += 1
            self._fits.clear()
            if key[0] == "draft":  # verify samples holding drafter steps are read at its new cost
                for held in [cell for cell, steps in self._steps.items() if any(steps)]:
                    self._set(held, self._value(held))

    def _value(self, key: tuple) -> float:
        """A cell's cost from its samples: the COST_QUANTILE of them, each less the drafter steps
        it holds at the drafter's current cost (see `record_verify`)."""
        samples, steps = self._samples[key], self._steps[key]
        if any(steps):
            step = self._step(key[1])
            samples = [_less_drafting(t, n, step) for t, n in zip(samples, steps)]
        return _low(samples)

    def _rescale_priors(self, batch_size: int) -> None:
        """Costs standing on a prior at this batch size (kept, or expired): scaled by the median
        ratio of the cells timed since to their priors, so a prior from a busier or quieter
        machine, or from a shorter context, does not make the cells timed now look dear or cheap
        beside it."""
        here = [key for key in self._priors if key[1] == batch_size]
        ratios = sorted(self._get(key) / self._priors[key] for key in here if key in self._samples)
        if not ratios:  # every cell here expired at once: they stand as they were until timed
            return
        scale = ratios[len(ratios) // 2]
        for key in here:
            if key not in self._samples:
                self._set(key, self._priors[key] * scale)

    def _get(self, key: tuple) -> float:
        cells, cell = self._cells(key)
        return cells[cell]

    def measured(self, batch_size: int, length: int) -> bool:
        """Whether this cell has a timing of its own: from this process, or a kept prior."""
        key = ("verify", batch_size, length)
        return key in self._samples or key in self._priors

    def explored(self, batch_size: int, length: int) -> bool:
        """Whether this cell needs no exploring: EXPLORE_SAMPLES timings in this process (at a
        context none has outgrown), or a kept prior. A cell whose samples expired is explored
        again: it stands at its old cost scaled by the median growth of the cells timed since,
        which are the lengths in use, and the context weighs on a long pass more than on a short
        one. On the demo pair at B = 1 the lengths in use after 32-token prompts were 5-9 tokens,
        and at 512 tokens the cost of verifying 2 stood 35-50% above what k = 1's rounds took:
        auto drafted 4-8 a round at 0.97x plain where k = 1 paid 1.13x."""
        key = ("verify", batch_size, length)
        return self.samples(key) >= EXPLORE_SAMPLES or key in self._read_back

    def lengths(self, batch_size: int) -> dict[int, float]:
        """Measured verify times at this batch size, by length, made to grow with length as rounds
        (each with its drafter steps at the drafter's cost, see `_fit`).

        A longer pass never costs less than a shorter one, but noisy cells can say so. Raising
        each cell to the costliest shorter one would let one slow cell make every longer length
        look as dear, and drafting deeper look as cheap as drafting less, a bias toward long drafts;
        instead the drafting lengths (L >= 2) get their weighted least-squares non-decreasing fit
        (pool adjacent violators, each cell weighted by its samples), and none is below plain
        decoding (L = 1), which is timed its own way (pipelined rounds) and left as measured, moved
        with the drafting lengths since (`drift`). Callers only read what it returns."""
        fit = self._fits.get(batch_size)
        if fit is None:
            fit = self._fits[batch_size] = self._fit(batch_size)
        return fit

    def _fit(self, batch_size: int) -> dict[int, float]:
        row = sorted((n, t) for (b, n), t in self.verify.items() if b == batch_size)
        plain = self.plain_cost(batch_size, row[0][1]) if row and row[0][0] == 1 else 0.0
        # Fitted as rounds: each length with its drafter steps. A drafter step timed apart costs
        # more than one inside a round, where it overlaps the building of the verify pass, so the
        # verify cells left after taking steps off need not grow with the length where the rounds
        # do. In one logged process on the demo pair at B = 1 the drafter took 0.9 ms a step
        # apart, and the k = 2 cell's rounds were 0.25 ms dearer than the k = 1 cell's; pooled as
        # verify passes, k = 2 took k = 1's and was costed 5% above its rounds.
        step = self._step(batch_size)
        blocks: list[list] = []  # [mean, weight, lengths] of pooled rounds, means non-decreasing
        for n, t in row:
            if n == 1:
                continue
            blocks.append([t + (n - 1) * step, max(1, self.samples(("verify", batch_size, n))), [n]])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                (m1, w1, n1), (m2, w2, n2) = blocks.pop(-2), blocks.pop()
                blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
        fitted = {n: max(mean - (n - 1) * step, plain) for mean, _, ns in blocks for n in ns}
        return ({1: plain} if plain else {}) | fitted

    def ratios_below(self, batch_size: int) -> dict[int, float]:
        """By length L: t_verify(B', L) / t_verify(B', 1) at the largest batch size B' below this one
        where both are timed (lengths with none are left out): a lower bound on that ratio here. A
        pass's fixed cost (reading the weights) is shared by its rows, and each row adds the same
        work per token, so the more rows a pass holds the more its extra tokens weigh against it."""
        below: dict[int, int] = {}  # length -> B'
        for b, n in self.verify:
            if 1 < n and below.get(n, 0) < b < batch_size and self.explored(b, n) and self.measured(b, 1):
                below[n] = b
        ratios = {n: self._ratio(b, n) for n, b in below.items()}
        return {n: r for n, r in ratios.items() if r is not None}

    def _ratio(self, batch_size: int, length: int) -> float | None:
        """t_verify(B, L) / t_verify(B, 1) from this batch size's own fit (L within its timed
        lengths); None where either is not timed there."""
        row = self.lengths(batch_size)
        at = _interpolate(row, length, scale_below=True, extrapolate=False)
        return at / row[1] if at is not None and row.get(1) else None

    def verify_time(self, batch_size: int, length: int) -> float | None:
        """Estimated seconds to verify `length` tokens per row at `batch_size`; None if nothing is measured."""
        row = self.lengths(batch_size)
        estimate = self._within(batch_size, row, length)
        if estimate is None:
            others = {b for b, _ in self.verify if b != batch_size}
            column = {b: self._within(b, there, length) or _interpolate(there, length, scale_below=True)
                      for b in others for there in [self.lengths(b)]}
            estimate = _interpolate(column, batch_size, scale_below=False)
        if estimate is None:
            estimate = _interpolate(row, length, scale_below=True)
        if estimate is None:
            return None
        # A round never costs less than a shorter one (see `lengths`: as rounds, drafter steps in).
        step = self._step(batch_size)
        return max([estimate] + [t - (length - n) * step for n, t in row.items() if n < length])

    def _within(self, batch_size: int, row: dict[int, float], length: int) -> float | None:
        """Rule 1 at one batch size (`row`: its `lengths`), plain decoding there by `_plain_by_ratio`
        when only drafting lengths are timed; None when neither applies."""
        estimate = _interpolate(row, length, scale_below=True, extrapolate=False)
        if estimate is None and length == 1 and row:
            estimate = self._plain_by_ratio(batch_size, row)
        return estimate

    def _plain_by_ratio(self, batch_size: int, row: dict[int, float]) -> float | None:
        """Plain decoding at a batch size whose drafting lengths are timed but plain decoding is not
        (a tail, see DraftPolicy._tail): its shortest timed length at plain decoding's ratio to that
        length at the nearest larger batch size timing both (else the nearest smaller). Scaling
        that length down in proportion to tokens (rule 3) put plain decoding at a third below its
        cost on the demo pair, and a tail decoded plainly where drafting paid; the ratio at a larger
        batch size errs the other way only a little, against drafting (extra tokens weigh more with
        more rows, see `ratios_below`)."""
        shortest = min(row)
        timed = sorted({b for b, n in self.verify if n == 1 and b != batch_size},
                       key=lambda b: (b < batch_size, abs(b - batch_size)))
        for b in timed:
            ratio = self._ratio(b, shortest)
            if ratio is not None:
                return row[shortest] / ratio
        return None

    def draft_time(self, batch_size: int) -> float | None:
        """Estimated seconds per drafter step at `batch_size`; None if no drafter step is measured."""
        return _interpolate(self.draft, batch_size, scale_below=False)

    def _step(self, batch_size: int) -> float:
        """`draft_time`, or 0 before any drafter step is measured (then no sample holds steps)."""
        return self.draft_time(batch_size) or 0.0


def _probe_interval(acceptance: Sequence[float], t_draft: float, t_verify: Sequence[float], k: int,
                    lost: float = 0.0) -> int:
    """`DraftPolicy.probe_interval` from the estimates (`DraftPolicy._estimates`); ``lost``: the
    share of a static batch's drafted tokens that its rows finishing apart cost (see `decide`)."""
    worth = (1 - lost) * expected_tokens(acceptance, k)
    extra = PROBE_ROUNDS * (k * t_draft + t_verify[k] - worth * t_verify[0])
    return math.ceil(max(0.0, extra / t_verify[0] + SWITCH_ROUNDS) / PROBE_OVERHEAD_BUDGET)


def _outgrown(timed_at: int, context: int) -> bool:
    """Whether a sample timed at context ``timed_at`` has expired at ``context`` (CONTEXT_SLACK)."""
    return context >= 2 * timed_at and context - timed_at >= CONTEXT_SLACK


def _less_drafting(seconds: float, steps: int, step: float) -> float:
    """A drafting round's seconds less its drafter steps at ``step`` each: its verify pass. Never
    below a millionth of the round, should the drafter's cost have risen past it since (the fit
    then holds the cell at plain decoding's cost, see CostModel.lengths)."""
    return max(seconds - steps * step, seconds * 1e-6)


def _low(samples: list[float]) -> float:
    """A cell's cost: the COST_QUANTILE of its samples."""
    return sorted(samples)[int((len(samples) - 1) * COST_QUANTILE)]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Decision:
    """k drafts for the next round (0 = plain decoding), why, and whether it is a probe."""

    k: int
    reason: str
    probe: bool = False


class _Standing(NamedTuple):
    """A decision that stands without being weighed again (ON_HOLD_ROUNDS, OFF_HOLD_ROUNDS) while
    ``key`` (`DraftPolicy._hold_key`) holds, before round ``until`` and while fewer than
    ``plain_until`` plain rounds in a row have run."""

    key: tuple
    decision: Decision
    until: float
    plain_until: float


def fixed_decision(k: int) -> Decision:
    """The decision for a request that overrides the policy (a fixed k, or 0 = off), so the loop
    records it in the same stats as a decided one."""
    if k < 0:
        raise ValueError(f"a fixed draft length must be >= 0, got {k}")
    return Decision(k, f"k={k} fixed by the request" + (" (drafting off)" if k == 0 else ""))


def _rates_text(acceptance: Sequence[float]) -> str:
    return ", ".join(f"{a:.2f}" for a in acceptance)


class DraftPolicy:
    """Picks k for each round from acceptance and costs measured in this process.

    Use: `decide(B)` before a round, `record(B, k, accepted, t_draft, t_verify, t_other)` after it.
    """

    expected_tokens = staticmethod(expected_tokens)

    def __init__(self, k_max: int = K_MAX, acceptance: AcceptanceEstimate | None = None,
                 costs: CostModel | None = None, rounds: int = 0, plain_rounds: int = 0):
        if k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {k_max}")
        self.k_max = k_max
        self.acceptance = acceptance or AcceptanceEstimate.empty(k_max)
        if len(self.acceptance.reached) != k_max:
            raise ValueError(f"acceptance has {len(self.acceptance.reached)} positions, expected k_max={k_max}")
        self.costs = costs or CostModel()
        self.rounds = rounds  # the clock acceptance ages by: rounds recorded
        self.plain_rounds = plain_rounds  # k=0 rounds since the last drafting round
        # Until this process has timed RECHECK_ROUNDS drafting rounds, a decision not to draft
        # probes every PROBE_GAP_ROUNDS plain rounds; read back from an earlier process (from_json),
        # also at once until it times one.
        self.kept = False
        self.recheck = False
        self.rechecks = RECHECK_ROUNDS
        self._cached: tuple | None = None  # what _estimates last derived, and from what
        self._explored: dict[int, int] = {}  # batch sizes with no length left to explore, as of costs.expiries
        self._floor: tuple | None = None  # _exploration's last (estimates, explorations, explored, floor)
        self._plain: dict[int, tuple[float, int]] = {}  # plain rounds' seconds not yet a sample, by B
        self._plain_timed: dict[int, int] = {}  # round of the last plain sample, by B
        self._started = rounds  # the clock when this process took the policy up
        self._plain_stretch: dict[int, int] = {}  # round the last stretch re-timing plain began, by B
        self._streak = (0, 0)  # (B, rounds recorded in a row at B) as of the last round
        self._drafting: dict[int, bool] = {}  # whether the last choice by rates drafted, by B
        self._drafted: dict[tuple[int, int], int] = {}  # round (B, k) last drafted in this process
        self._drafted_last = -math.inf  # round any length last drafted (see PLAIN_SETTLE)
        self._probing: tuple[int, int, int, str] | None = None  # a probe under way: (B, k, rounds decided, why)
        self._finishes: dict[int, list[float]] = {}  # by B: static batches' shares lost finishing apart, per spread
        self._lost: dict[int, float] = {}  # by B: their median, what `decide` weighs (times a length's spread)
        self._plain_batches: dict[int, int] = {}  # by B: static batches in a row that decoded plainly since then
        self._held: _Standing | None = None  # a decision that stands (ON_HOLD_ROUNDS, OFF_HOLD_ROUNDS)

    # -- measurements

    def record_verify_time(self, batch_size: int, length: int, seconds: float, context: int = 0) -> None:
        """One timed target pass over `length` tokens per row (`record` does this for every round)."""
        self.costs.record_verify(batch_size, length, seconds, context)

    def record_draft_time(self, batch_size: int, seconds_per_step: float, context: int = 0) -> None:
        """One timed drafter step (`record` does this for drafting rounds)."""
        self.costs.record_draft(batch_size, seconds_per_step, context)

    def record(self, batch_size: int, k: int, accepted: Sequence[int], t_draft: float | None, t_verify: float,
               t_other: float = 0.0, limits: Sequence[int] | None = None, steady: bool = True,
               context: int = 0) -> None:
        """One finished round: k drafts per row, `accepted[r]` of them accepted in row r, and the
        seconds spent drafting (all k steps, timed apart: only the drafter's cost is taken from such
        a round; None: not timed apart, t_verify holds them too), verifying, and on everything
        else (t_other is kept by decode.Stats; the decision leaves it out, as in cost(k)). `limits[r]`: row r's own draft
        length when it is below k (a fixed-k request, or one near its max_tokens). `steady`, for a
        plain round: whether it ran inside a pipelined stretch of plain rounds; only those time
        plain decoding (see _record_plain). `context`: tokens in the longest row when the round began
        (costs timed at a context it has outgrown expire, see CostModel)."""
        if len(accepted) != batch_size:
            raise ValueError(f"accepted has {len(accepted)} rows, batch_size is {batch_size}")
        steps = 0
        if t_draft is None and k > 0:
            # Drafting not timed apart (see draft_timing_due): the verify pass is what the round
            # cost beyond its drafting, taken off by the cost model at the drafter's cost as it
            # stands when read (CostModel.record_verify). Unmeasured, nothing is learned.
            steps = k
            if self.costs.draft_time(batch_size) is None:
                t_verify = 0.0
        elif k > 0:
            # Timed apart, the round cost more than drafting rounds do: the verify pass was built
            # while the device idled. Its drafter time is a measurement, its verify time is not
            # one of what a drafting round costs (a k=1 round on the demo pair: 6.4 ms timed apart,
            # 4.7-5 ms in a stretch; exploring on such rounds turned drafting off where it paid).
            if 0 < t_draft < math.inf:
                self.costs.record_draft(batch_size, t_draft / k, context)
            t_verify = 0.0
        # A clock glitch is not a measurement, and 0 says the round's times are not what such a
        # round costs (the engine's first round of a shape also traces it): acceptance only.
        if 0 < t_verify < math.inf and k > 0:
            # The first drafting round after plain rounds also pays for the switch (5-15% over a
            # steady round on the demo pair, more after longer plain stretches), and it is the
            # only drafting round near the plain timings of a stretch or while drafting is off.
            # Paired with those, it made plain decoding look that much cheaper; a slow probe
            # paired with the five plain timings after it (a probe is always such a round)
            # outvoted the steady ratios and held drafting off for 600 rounds where it paid.
            self.costs.record_verify(batch_size, k + 1, t_verify, context, self.plain_rounds == 0, steps)
            self.recheck, self.rechecks = False, max(0, self.rechecks - 1)
        elif 0 < t_verify < math.inf and steady and self.rounds - self._drafted_last > PLAIN_SETTLE:
            self._record_plain(batch_size, t_verify, context)
        if k > 0:
            if self._held is not None and self._held.decision.k == 0:
                self._held = None  # drafting rounds are what a decision not to draft rests on
            self._drafted_last = self.rounds
            self.acceptance.update(self.rounds, k, accepted, limits)
            self._drafted[batch_size, k] = self.rounds
        self.plain_rounds = self.plain_rounds + 1 if k == 0 else 0
        self.rounds += 1
        b, n = self._streak
        self._streak = (batch_size, n + 1 if b == batch_size else 1)

    def record_finish(self, batch_size: int, lost: float, spread: float) -> None:
        """One static batch of `batch_size` rows that drafted: rows that started together with as
        many tokens to go and that nothing joined. Plain decoding ends such rows in the same
        round; drafting moves each row by its own accepted drafts, so they finish apart and the
        batch's last rounds run with fewer rows at nearly a full round's cost each (a pass that
        reads every weight costs nearly as much for one row as for four). `lost`: the share of
        the batch's decoding time that its rounds after its first row finished took beyond what
        their tokens cost at the full batch's pace. The round-by-round estimates cannot see it,
        and it is where drafting that pays round for round lost to plain decoding: the demo pair
        on 512-token slices of one source file at B = 4 (bench/batch_tail.py), k = 1 at 1.05x
        plain round for round and 0.96x in all, 14% of its time after the first row finished.

        ``spread``: how far apart its rows drifted, as `round_spreads` has it for a length, from the
        batch's rounds of all rows through the one its first row finished in: the square root of
        the sum of their variances across rows of the tokens each row took, over the tokens per
        row. Deeper drafts spread rows further and lose more: on 16 code prompts at B = 4
        (bench/workloads_wide.json) fixed k = 1 lost 7% this way, k = 3 16% and k = 5 22%. One
        median over batches that explored deep lengths put 21% on k = 1, and auto decoded plainly
        in 98% of its rounds where k = 1 paid 1.16x. So each batch's loss counts per unit of its
        spread, and a length's loss is that times its own spread."""
        if not lost < 1.0:
            raise ValueError(f"lost must be below 1, got {lost}")
        if not spread >= 0.0:
            raise ValueError(f"spread must be >= 0, got {spread}")
        self._plain_batches[batch_size] = 0
        self._held = None
        samples = self._finishes.setdefault(batch_size, [])
        samples.append(loss_per_spread(lost, spread))
        del samples[:-FINISH_SAMPLES]
        self._lost[batch_size] = statistics.median(samples)

    def record_plain_batch(self, batch_size: int) -> None:
        """One static batch of `batch_size` rows (see `record_finish`) that decoded plainly in most
        of its rounds of all rows: it shows nothing of what drafting loses finishing apart. While
        such losses keep drafting off, such batches are all that come, so the losses would stand
        for good: on 16 code prompts at B = 4 (bench/workloads_wide.json) three batches' 0.16,
        0.34 and 0.34 per unit of spread held drafting off for the 30 batches after them, where
        fixed k = 1 paid 1.06x. After FINISH_SAMPLES of them in a row the next static batch is
        weighed round for round (see `decide`), so it drafts where that pays and is measured."""
        self._plain_batches[batch_size] = self._plain_batches.get(batch_size, 0) + 1
        self._held = None

    def drafting_seconds(self, batch_size: int, k: int) -> float | None:
        """What k drafter steps cost at this batch size by the measured drafter cost (None before
        one is measured): the drafting share of a round that did not time it apart."""
        step = self.costs.draft_time(batch_size)
        return None if step is None else k * step

    def draft_timing_due(self, batch_size: int) -> bool:
        """Whether a drafting round at this batch size should wait for its drafts before verifying,
        to time the drafter apart. That wait idles the device while the verify pass is built, so
        only the first timed drafting round at a batch size in this process does it (the others'
        verify cost is their time less the drafting at this cost), and then one round in
        DRAFT_TIMING_INTERVAL: the drafter's cost moves with the context and the machine's load."""
        return (self.costs.samples(("draft", batch_size)) < 1
                or self.rounds % DRAFT_TIMING_INTERVAL == DRAFT_TIMING_INTERVAL // 2)

    def _record_plain(self, batch_size: int, seconds: float, context: int) -> None:
        """Plain rounds run pipelined (each launched before the last is read), so one round's time
        is the interval between two reads, which jitters around the true cost: some intervals are
        near zero, and a low quantile of them would make plain decoding look cheaper than it is.
        Their mean over PLAIN_WINDOW rounds is one sample. Only steady rounds count: the first
        round of a plain stretch (the first of all, one between drafting rounds, one forced by a
        row's last token) also waits for its own graph to be built, twice a steady interval on a
        small model, and taken as the cost of plain decoding it sent the policy drafting, and
        drafting deep, where plain decoding was faster; the last round's interval is only a tail.
        After drafting rounds the caller leaves out the second too (PLAIN_SETTLE)."""
        total, count = self._plain.get(batch_size, (0.0, 0))
        total, count = total + seconds, count + 1
        if count == PLAIN_WINDOW:
            self.costs.record_verify(batch_size, 1, total / count, context)
            self._plain_timed[batch_size] = self.rounds
            total, count = 0.0, 0
        self._plain[batch_size] = (total, count)

    # -- decisions

    def _estimates(self, batch_size: int) -> tuple[list[float], float, list[float], dict[int, float]] | None:
        """(a_1..a_k_max, t_draft, [t_verify(B, 1..k_max+1)], CostModel.ratios_below(B)), or None
        before any verify is timed."""
        cached, costs = self._cached, self.costs
        if (cached is None or cached[1:3] != (batch_size, costs) or cached[3] != costs.firsts
                or (cached[0] != costs.version and self.rounds - cached[6] >= REDERIVE_ROUNDS)):
            plain = self.costs.verify_time(batch_size, 1)
            if plain is None:
                return None
            t_draft = self.costs.draft_time(batch_size)
            if t_draft is None:
                t_draft = DRAFT_STEP_PRIOR * plain
            t_verify = [self.costs.verify_time(batch_size, n) for n in range(1, self.k_max + 2)]
            # Rederiving every round would cost a tenth of a small model's round; costs move
            # slowly (each cell a quantile), so a few rounds' lag changes no decision.
            cached = self._cached = (costs.version, batch_size, costs, costs.firsts, t_draft, t_verify, self.rounds,
                                     costs.ratios_below(batch_size))
        return self.acceptance.rates(self.rounds), cached[4], cached[5], cached[7]

    def probe_interval(self, batch_size: int, k: int) -> int:
        """Plain rounds before the next probe of k drafts (`decide` probes at the best length by
        the estimates), spaced so that probes add at most PROBE_OVERHEAD_BUDGET to plain decoding time
        at the measured acceptance. A probe costs what its PROBE_ROUNDS rounds cost beyond the
        plain rounds their accepted tokens save, plus SWITCH_ROUNDS for breaking the pipelined
        plain rounds: the most when they accept nothing (a drafter that never agrees drives the
        estimate there, and probes apart), least where drafting only just loses, so there they come
        oftenest, to see the day it pays again. Counted without the switch, probes every 16 rounds
        cost the never-agreeing drafter of bench/policy_bench.py 3-5% of plain decoding."""
        estimates = self._estimates(batch_size)
        if estimates is None:  # no plain timing yet, so no probe is due before one
            return math.ceil(SWITCH_ROUNDS / PROBE_OVERHEAD_BUDGET)
        return _probe_interval(*estimates[:3], k)

    def decide(self, batch_size: int, static: bool = False) -> Decision:
        """The k with the highest expected throughput at this batch size, an exploration of a
        length that might beat it, or a probe while off; a decision may stand for a few rounds
        without being weighed again (ON_HOLD_ROUNDS, OFF_HOLD_ROUNDS). ``static``: the rows are a
        static batch (see `record_finish`) that nothing waits to join, so each length weighs what
        such batches lose finishing apart at its spread."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.k_max == 0:
            return Decision(0, "k=0: k_max is 0")
        standing = self._held
        if (standing is not None and standing.key == self._hold_key(batch_size, static)
                and self.rounds < standing.until and self.plain_rounds < standing.plain_until):
            return standing.decision
        # A probe under way goes on only while nothing else was chosen in between.
        probing, self._probing = self._probing, None
        probe_goes_on = (probing is not None and probing[0] == batch_size and probing[2] < PROBE_ROUNDS
                         and self.plain_rounds == 0)
        tail = self._tail(batch_size)
        if not tail and not self.costs.measured(batch_size, 1):
            # Plain rounds time plain decoding at this batch size first, losing nothing: every
            # choice is weighed against it, and a neighbour's cost scaled to B rows overstates it.
            return Decision(0, f"k=0: timing plain decoding at B={batch_size} first")
        acceptance, t_draft, t_verify, ratios = self._estimates(batch_size)  # cached: the hot path re-derives nothing
        rates = tokens_per_second(acceptance, t_draft, t_verify, batch_size)
        # A static batch's rows finish apart, the further the deeper it drafts (see `record_finish`):
        # its lengths are weighed at what they pay after that.
        held = self._lost.get(batch_size, 0.0) if static else 0.0
        # After FINISH_SAMPLES static batches in a row that did not draft, those losses are measured
        # again rather than believed (see `record_plain_batch`).
        remeasure = held > 0 and self._plain_batches.get(batch_size, 0) >= FINISH_SAMPLES
        per_spread = 0.0 if remeasure else held
        losses = [min(1.0, per_spread * g) for g in round_spreads(acceptance, len(rates) - 1)] if per_spread else None
        paying = rates if losses is None else [r * (1 - lost) for r, lost in zip(rates, losses)]
        best = max(range(1, len(rates)), key=lambda k: (paying[k], -k))
        compared = (f"k={best} {rates[best]:.1f} tok/s (E={expected_tokens(acceptance, best):.2f} at "
                    f"acceptance {_rates_text(acceptance[:best])})")
        suffix = f" (B={batch_size})"
        # A probe's rounds are not cut short by exploring: its first round alone leaves the plain
        # rounds and pays for the switch, so only its steady rounds time drafting while it is off.
        # A probe whose first round accepted every draft made a deeper length look worth a try;
        # that one untimed round ended the probe, and in bench/policy_sim.py (Q&A at B = 1, the
        # demo pair's costs) drafting then stayed off for 200 more plain rounds where it paid 1.27x.
        explore = (None if tail or probe_goes_on
                   else self._exploration(batch_size, acceptance, t_draft, t_verify, ratios, max(rates)))
        if explore is not None:
            k, bound = explore
            return Decision(k, f"explore k={k}: {bound:.1f} tok/s if verifying {k + 1} tokens costs no more than "
                               f"the longest pass timed, against {max(rates):.1f}{suffix}")
        # Within MIN_GAIN of plain either way, the last choice stands: switching costs what the
        # rates leave out (the first plain round after drafting waits for its own graph), and
        # near break-even the timings' jitter alone would flip it back and forth.
        on = self._drafting.get(batch_size, False)
        # The losses weigh on or off and the choice between lengths only: the spacing of plain
        # timings and refreshes stay by the round-by-round rates (those weighed down too timed
        # plain decoding oftener where drafting paid, and lost 0.2-0.9% there in bench/policy_sim.py).
        lost = losses[best] if losses else 0.0
        paid = paying[best]
        if lost:
            compared += f", {paid:.1f} with {lost:.1%} lost to rows finishing apart"
        elif remeasure:
            compared += f" (losses to rows finishing apart measured again after {FINISH_SAMPLES} plain batches)"
        if paid > rates[0] * (1 + MIN_GAIN) or (on and paid * (1 + MIN_GAIN) > rates[0]):
            self._drafting[batch_size] = True
            verb = "beats" if paid > rates[0] else f"is within {MIN_GAIN:.0%} of"
            reason = f"{compared} {verb} plain {rates[0]:.1f} tok/s{suffix}"
            timing = math.inf if tail else self._plain_due(batch_size, rates[best] / rates[0] - 1)
            if timing <= self.rounds:
                return Decision(0, f"k=0: re-timing plain decoding; {reason}")
            refresh, refreshing = self._refresh(batch_size, best, rates)
            if refresh is not None:
                return Decision(refresh, f"refresh k={refresh}: re-timing a length near the best; {reason}")
            decision = Decision(best, reason)
            if not tail and self.acceptance.reached[0] >= ON_HOLD_EVIDENCE:
                until = min(self.rounds + ON_HOLD_ROUNDS, timing, refreshing)
                self._held = _Standing(self._hold_key(batch_size, static), decision, until, math.inf)
            return decision
        self._drafting[batch_size] = False
        verb = "beats" if rates[0] >= paid else f"is within {MIN_GAIN:.0%} of"
        reason = f"k=0: plain {rates[0]:.1f} tok/s {verb} {compared}{suffix}"
        if probe_goes_on:
            _, k, done, why = probing
        elif self.recheck or (self.rechecks and self.plain_rounds >= PROBE_GAP_ROUNDS):
            k, done, why = best, 0, "re-checking the kept policy" if self.kept else "re-checking an early decision"
        elif self.plain_rounds >= (interval := _probe_interval(acceptance, t_draft, t_verify, best, lost)):
            k, done, why = best, 0, f"after {self.plain_rounds} plain rounds"  # by the estimates in hand
        else:
            decision = Decision(0, reason)
            if not tail:  # a tail's few rounds decide by other batch sizes' costs; it holds nothing
                due = min(interval, PROBE_GAP_ROUNDS) if self.rechecks else interval
                self._held = _Standing(self._hold_key(batch_size, static), decision, self.rounds + OFF_HOLD_ROUNDS, due)
            return decision
        self._probing = (batch_size, k, done + 1, why)
        return Decision(k, f"probe k={k}, round {done + 1} of {PROBE_ROUNDS}, {why}; {reason}", True)

    def _hold_key(self, batch_size: int, static: bool) -> tuple:
        """What a decision that stands (ON_HOLD_ROUNDS, OFF_HOLD_ROUNDS) was weighed for: the batch,
        and the costs' new, explored and expired cells (which move what explores); the events that
        end it otherwise (`record`, `record_finish`, `record_plain_batch`) drop it themselves."""
        return batch_size, static, self.costs.firsts, self.costs.expiries, self.costs.explorations

    def _tail(self, batch_size: int) -> bool:
        """Whether this batch size has no plain timing of its own but a larger one has, and the
        rounds before this one ran fewer than TAIL_ROUNDS in a row at it: rows that finished left a
        batch. It decides by costs held from the batch sizes around it, neither timing plain
        decoding first nor exploring: a tail of a few rounds would spend them all on that (and,
        never a steady plain stretch, would never finish timing plain decoding), only to choose as
        the larger batch did. Rounds in a row, not in all: a batch whose rows end a few rounds
        apart has a short tail at every request, and counting them all made each smaller batch
        size time plain decoding and explore in the end. The lengths it runs are timed as any
        round is, and a batch size that stays is a tail no more."""
        b, n = self._streak
        return ((n if b == batch_size else 0) < TAIL_ROUNDS and not self.costs.measured(batch_size, 1)
                and any(n == 1 and b > batch_size for b, n in self.costs.verify))

    def _plain_due(self, batch_size: int, margin: float) -> float:
        """The round from which rounds belong to a stretch of plain rounds that times plain decoding
        again while drafting is on (this one or an earlier one: this round does; a later one: when
        the next stretch begins). Plain decoding is the yardstick of every choice, and it is timed
        only while the policy decodes plainly: one early sample from a busy moment would otherwise
        stand for good, and drafting that does not pay would look as if it did. A stretch is
        PLAIN_WINDOW + PLAIN_SETTLE + 1 rounds (its first PLAIN_SETTLE and its last time
        nothing) that each forgo ``margin``,
        drafting's expected gain over plain, plus SWITCH_ROUNDS for leaving the drafting
        rounds and coming back; stretches are spaced to cost at most PLAIN_REFRESH_BUDGET of
        decoding time: often where drafting only just pays and the
        yardstick decides, rarely where it pays well. A plain cost kept from an earlier process counts
        as timed when this one began (and is rescaled with the cells this process times)."""
        stretch = PLAIN_WINDOW + PLAIN_SETTLE + 1
        start = self._plain_stretch.get(batch_size, -math.inf)
        if self.rounds - start < stretch:
            return start
        last = max(start, self._plain_timed.get(batch_size, self._started))
        due = last + (stretch * margin + SWITCH_ROUNDS) / PLAIN_REFRESH_BUDGET
        # Plain decoding is timed first at a batch size, before any drafting length: timed once
        # more after ALIGN_ROUNDS with lengths explored, so that `drift` has lengths to follow it by.
        if start < last and self.costs.aligned(batch_size) is False:
            due = min(due, last + ALIGN_ROUNDS)
        if due <= self.rounds:
            self._plain_stretch[batch_size] = due = self.rounds
        return due

    def _refresh(self, batch_size: int, best: int, rates: list[float]) -> tuple[int | None, float]:
        """(A measured draft length within REFRESH_SPAN of ``best`` that is due to be timed again, the
        one with the highest estimated rate if several are, or None; the round the first of them
        comes due at): only chosen lengths get new samples, so
        without this a length timed during a slow moment would never be chosen again, nor a lucky
        one ever left, while the context grows and the machine's load moves. Each is due
        REFRESH_INTERVAL to REFRESH_MAX_INTERVAL rounds after it last drafted, spaced so that
        together they cost at most REFRESH_BUDGET of decoding time by the estimated rates. Fixed
        turns of the two next to the best, one round in eight, cost auto 0.6-1.4% at B = 4 in
        bench/policy_sim.py with the demo pair's costs, where k = 2 sits in a trough between
        k = 1 and k = 3, and never re-timed a k = 3 timed in a slow moment while auto ran k = 1."""
        near = [k for k in range(max(1, best - REFRESH_SPAN), min(self.k_max, best + REFRESH_SPAN) + 1)
                if k != best and self.costs.measured(batch_size, k + 1)]
        due, soonest = None, math.inf
        for k in near:
            loss = max(0.0, 1.0 - rates[k] / rates[best])
            interval = min(REFRESH_MAX_INTERVAL, max(REFRESH_INTERVAL, len(near) * loss / REFRESH_BUDGET))
            # A length not drafted in this process yet (its cost kept, or timed on the side) starts
            # its clock when it first comes near the best.
            at = self._drafted.setdefault((batch_size, k), self.rounds) + interval
            if self.rounds >= at and (due is None or rates[k] > rates[due]):
                due = k
            soonest = min(soonest, at)
        return due, soonest

    def _exploration_floor(self, batch_size: int, t_verify: list[float],
                           ratios: dict[int, float]) -> tuple[list[bool] | None, list[float] | None]:
        """(which verify lengths 1..k_max+1 are explored, each drafting length's lowest plausible
        verify cost) for `_exploration`, or (None, None) once every length is explored."""
        explored = [self.costs.explored(batch_size, n) for n in range(1, self.k_max + 2)]
        if all(explored[1:]):
            self._explored[batch_size] = self.costs.expiries  # checked again only once cells expire
            return None, None
        # Past the longest timed shorter length, each token adds EXPLORE_SLOPE of the timed drafting
        # lengths' average growth per token (never more than a timed longer length costs).
        timed = [n for n in range(1, self.k_max + 1) if explored[n]]
        slope = (EXPLORE_SLOPE * max(0.0, t_verify[timed[-1]] - t_verify[timed[0]]) / (timed[-1] - timed[0])
                 if len(timed) >= 2 else 0.0)
        floor, longest, below = [], t_verify[0], None  # below: the longest timed drafting length so far
        for n in range(self.k_max + 1):
            bound = longest
            if slope and below is not None and not explored[n]:
                above = min([t_verify[j] for j in timed if j > n], default=math.inf)
                bound = max(bound, min(above, t_verify[below] + (n - below) * slope))
            if n:
                bound = max(bound, ratios.get(n + 1, 0.0) * t_verify[0])
            floor.append(bound)
            if explored[n]:
                longest = max(longest, t_verify[n])
                below = n or below
        return explored, floor

    def _exploration(self, batch_size: int, acceptance: list[float], t_draft: float, t_verify: list[float],
                     ratios: dict[int, float], best: float) -> tuple[int, float] | None:
        """(k, its optimistic tokens/s) for the shortest unexplored verify length at this batch
        size whose optimistic rate beats ``best`` (the best estimated rate), or None.
        Optimistic: verifying k + 1 tokens costs what the longest explored shorter length costs
        (a pass never costs less than a shorter one) plus EXPLORE_SLOPE of the explored drafting
        lengths' average growth for each token past it, and no less, relative to plain decoding,
        than at a smaller batch size (``ratios``: `CostModel.ratios_below`), so only a length that could pay is
        tried: a batch size a server meets for the first time does not explore deep drafts that
        already lost at a smaller one. Shortest first, because each length timed raises the bound
        of every longer one, and only of those: the deepest length's bound is usually the highest
        (its cost held flat while E(k) grows), so trying the most promising first went from the
        deepest down and timed nearly every length, where climbing stops once the timed lengths
        show that the deeper ones cannot pay (in bench/policy_sim.py those deep explorations cost
        auto up to 2% against the best fixed k at B = 4)."""
        if self._explored.get(batch_size) == self.costs.expiries:
            return None
        # The floor moves only with the derived costs and with which cells are explored, not with
        # acceptance: derived once for those, it spares every round that explores nothing the
        # most expensive part of a decision (a drafter whose deep lengths never pay leaves them
        # unexplored, and this runs every round).
        # The estimates are derived for one batch size, so they key the batch size too.
        if self._floor is None or self._floor[0] is not self._cached or self._floor[1] != self.costs.explorations:
            self._floor = (self._cached, self.costs.explorations, *self._exploration_floor(batch_size, t_verify, ratios))
        _, _, explored, floor = self._floor
        if explored is None:
            return None
        bounds = tokens_per_second(acceptance, t_draft, floor, batch_size)
        k = next((k for k in range(1, self.k_max + 1) if not explored[k] and bounds[k] > best * (1 + MIN_GAIN)), None)
        return None if k is None else (k, bounds[k])

    # -- persistence

    def to_json(self) -> str:
        """What was learned, for this model on this machine: costs, acceptance, clock."""
        a = self.acceptance
        return json.dumps({
            "format": POLICY_FORMAT,
            "k_max": self.k_max,
            "rounds": self.rounds,
            "plain_rounds": self.plain_rounds,
            "verify": [[b, n, t * self.costs.drift(b) if n == 1 else t]
                       for (b, n), t in sorted(self.costs.verify.items())],
            "draft": [[b, t] for b, t in sorted(self.costs.draft.items())],
            "acceptance": {"accepted": a.accepted, "reached": a.reached, "last_round": a.last_round,
                           "prior_weight": a.prior_weight},
        })

    @classmethod
    def from_json(cls, text: str) -> DraftPolicy:
        """A kept policy, as a prior for this process (see the module docstring); PolicyFileError
        says what is wrong with anything but a well-formed file of this version and k_max."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise PolicyFileError(f"not JSON ({e})") from None
        _check(isinstance(data, dict), f"expected a JSON object, found {type(data).__name__}")
        _check(data.get("format") == POLICY_FORMAT,
               f"unknown draft policy format {data.get('format')!r}, expected {POLICY_FORMAT}")
        keys = {"format", "k_max", "rounds", "plain_rounds", "verify", "draft", "acceptance"}
        _check(set(data) == keys, f"expected the keys {sorted(keys)}, found {sorted(data)}")
        _check(data["k_max"] == K_MAX and _is_int(data["k_max"]), f"k_max must be {K_MAX}, found {data['k_max']!r}")
        rounds, plain_rounds = data["rounds"], data["plain_rounds"]
        _check(_is_int(rounds) and rounds >= 0, f"rounds must be an integer >= 0, found {rounds!r}")
        _check(_is_int(plain_rounds) and 0 <= plain_rounds <= rounds,
               f"plain_rounds must be an integer in 0..rounds, found {plain_rounds!r}")
        verify, draft = {}, {}
        _check(isinstance(data["verify"], list) and isinstance(data["draft"], list), "verify and draft must be lists")
        for cell in data["verify"]:
            _check(isinstance(cell, list) and len(cell) == 3, f"a verify cost must be [B, L, seconds], found {cell!r}")
            b, n, t = cell
            _check(_is_int(b) and 1 <= b <= MAX_BATCH and _is_int(n) and 1 <= n <= K_MAX + 1 and (b, n) not in verify,
                   f"a verify cost needs B in 1..{MAX_BATCH} and L in 1..{K_MAX + 1}, once each, found {cell!r}")
            verify[b, n] = _seconds(t)
        for cell in data["draft"]:
            _check(isinstance(cell, list) and len(cell) == 2, f"a draft cost must be [B, seconds], found {cell!r}")
            b, t = cell
            _check(_is_int(b) and 1 <= b <= MAX_BATCH and b not in draft,
                   f"a draft cost needs B in 1..{MAX_BATCH}, once each, found {cell!r}")
            draft[b] = _seconds(t)
        a = data["acceptance"]
        _check(isinstance(a, dict) and set(a) == {"accepted", "reached", "last_round", "prior_weight"},
               "acceptance must hold accepted, reached, last_round and prior_weight")
        for name in ("accepted", "reached", "last_round"):
            _check(isinstance(a[name], list) and len(a[name]) == K_MAX, f"acceptance.{name} must list {K_MAX} numbers")
        accepted, reached = [_count(x) for x in a["accepted"]], [_count(x) for x in a["reached"]]
        _check(all(x <= y for x, y in zip(accepted, reached)), "acceptance.accepted exceeds acceptance.reached")
        last_round = a["last_round"]
        _check(all(_is_int(x) and 0 <= x <= rounds for x in last_round), "acceptance.last_round must be in 0..rounds")
        acceptance = AcceptanceEstimate(accepted, reached, list(last_round), _count(a["prior_weight"]))
        policy = cls(K_MAX, acceptance, CostModel.from_prior(verify, draft), rounds, plain_rounds)
        policy.kept = policy.recheck = True  # and it owes RECHECK_ROUNDS, as every new policy does
        return policy


REDERIVE_ROUNDS = 4
"""Rounds the derived costs may lag behind new samples of cells already measured (a new cell is
used at once; see DraftPolicy._estimates)."""

ON_HOLD_ROUNDS = 4
"""Rounds a decision to draft the best length by the rates stands without being weighed again (as
OFF_HOLD_ROUNDS; it ends where a re-timing of plain decoding or a refresh comes due), once the
acceptance estimate holds ON_HOLD_EVIDENCE rows at draft position 1: its rates then move by a few
percent in as many rounds, a lag like REDERIVE_ROUNDS' for the costs. Before that each round moves
them most, and a drafter that never agrees is dropped within its first rounds. Weighing every
round cost 57 us of host time a round here, and auto ran 0.8-1.2% faster at B = 1 on the demo
pair with it standing (30 us a round); in bench/policy_sim.py (no host time) auto's choices ran
-1.0% to +0.7% against those weighed every round, -0.1% on average."""

ON_HOLD_EVIDENCE = 32.0
"""Rows at draft position 1 (aged, see AcceptanceEstimate) before a decision to draft may stand."""

OFF_HOLD_ROUNDS = 16
"""Rounds a decision not to draft stands without being weighed again, while nothing it rests on
moves but the plain timings and the aging of acceptance (a drafting round, a finished static
batch, a new cell or an expired one, or a probe coming due ends it at once). Weighing it every
round cost 40-70 us of host time a round here (10 us alone: the round's arrays crowd the caches
out), 1-2% of a plain round of the demo target at B = 1, and plain rounds while off ran about that
much slower than plain decoding where drafting only just lost. Standing, 8 us a round, with the
same rounds decided for a drafter that never agrees; in bench/policy_sim.py (no host time) auto's
cells moved by -0.3% to +0.8%. Probes come at least 134 plain rounds apart, so a new plain timing
that says drafting pays now waits 16 rounds at most."""

POLICY_FORMAT = 2
"""Version of the kept file; 2: costs are low quantiles (1 kept running means, which a busy period
could poison, so its files are not read)."""

MAX_BATCH = 4096
"""Largest batch size a kept cost may name."""


class PolicyFileError(ValueError):
    """A kept policy file that is not one this version wrote."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PolicyFileError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _seconds(t) -> float:
    _check(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 3600 and math.isfinite(t),
           f"a cost must be a finite number of seconds in (0, 3600), found {t!r}")
    return float(t)


def _count(x) -> float:
    _check(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0,
           f"acceptance counts must be finite and >= 0, found {x!r}")
    return float(x)
