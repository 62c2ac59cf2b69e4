"""Tests for mlx_specdec.policy: the draft-length choice from synthetic measured acceptance and costs.

Costs are written in units of a 1-token target forward T1; rounds are simulated by recording what a
loop would, with every row accepting all or none of its drafts, so each test is deterministic."""

import math
import random

import pytest

from mlx_specdec.policy import (
    ACCEPTANCE_HALF_LIFE_ROUNDS,
    ALIGN_ROUNDS,
    COST_QUANTILE,
    CONTEXT_SLACK,
    COST_SAMPLES,
    DRAFT_TIMING_INTERVAL,
    EXPLORE_SAMPLES,
    FINISH_SAMPLES,
    MIN_GAIN,
    PAIR_SAMPLES,
    PLAIN_REFRESH_BUDGET,
    PLAIN_SETTLE,
    PLAIN_WINDOW,
    PROBE_GAP_ROUNDS,
    PROBE_OVERHEAD_BUDGET,
    PROBE_ROUNDS,
    REFRESH_INTERVAL,
    REFRESH_MAX_INTERVAL,
    SWITCH_ROUNDS,
    TAIL_ROUNDS,
    AcceptanceEstimate,
    CostModel,
    Decision,
    DraftPolicy,
    expected_tokens,
    finishing_loss,
    fixed_decision,
    position_counts,
    round_spreads,
)
from mlx_specdec import policy as policy_module
from tests.helpers import record_round

T1 = 0.020  # seconds for a 1-token forward
APPLE = {1: 1.0, 2: 1.7, 4: 3.1, 9: 6.1}  # measured multiples of T1 for verifying L tokens on Apple GPUs


def calibrated(profile, batch_size=1, draft=0.1, k_max=8):
    """A policy whose verify times at batch_size are T1 * profile(L) for every L (each timed enough
    that nothing is left to explore), drafter step draft * T1."""
    policy = DraftPolicy(k_max)
    for length in [*range(2, k_max + 2), 1]:  # plain last: timed alongside the lengths (see CostModel.drift)
        for _ in range(EXPLORE_SAMPLES):
            policy.record_verify_time(batch_size, length, T1 * profile(length))
    policy.record_draft_time(batch_size, draft * T1)
    return policy


def cheap(length):
    return 1 + 0.05 * (length - 1)


def feed(policy, rate, rounds, batch_size=1, k=None):
    """Record rounds drafting k (default k_max) where a fraction `rate` of the rows accept every
    draft and the rest accept none (a_1 = rate, deeper positions 1), timed as the policy expects."""
    k = policy.k_max if k is None else k
    full = round(rate * batch_size)
    t_draft, t_verify = k * policy.costs.draft_time(batch_size), policy.costs.verify_time(batch_size, k + 1)
    for _ in range(rounds):
        record_round(policy, batch_size, k, [k] * full + [0] * (batch_size - full), t_draft, t_verify)


def run(policy, rounds, accepts, batch_size=1, profile=cheap, draft=0.1):
    """Decide and record `rounds` rounds; accepts(i) says whether round i's drafts are all accepted."""
    decisions = []
    for i in range(rounds):
        d = policy.decide(batch_size)
        decisions.append(d)
        n = d.k if accepts(i) else 0
        record_round(policy, batch_size, d.k, [n] * batch_size, draft * T1 * d.k, T1 * profile(d.k + 1))
    return decisions


# --- pure functions


@pytest.mark.parametrize("a", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("k", [0, 1, 2, 5, 8])
def test_expected_tokens_constant_rate_matches_closed_form(a, k):
    assert expected_tokens([a] * 8, k) == pytest.approx((1 - a ** (k + 1)) / (1 - a))


def test_expected_tokens_literal_values():
    assert expected_tokens([0.5] * 3, 3) == 1.875
    assert expected_tokens([0.9, 0.5], 2) == pytest.approx(1 + 0.9 + 0.45)
    assert expected_tokens([0.9, 0.5], 0) == 1.0
    assert DraftPolicy.expected_tokens([1.0] * 4, 4) == 5.0
    with pytest.raises(ValueError, match="k must be in 0..2"):
        expected_tokens([0.5, 0.5], 3)


def test_position_counts_are_conditional():
    # rows accepted 0, 3 and 1 of 3 drafts: all reached position 1, two took it, ...
    assert position_counts(3, [0, 3, 1]) == ([3, 2, 1], [2, 1, 1])
    assert position_counts(0, [0, 0]) == ([], [])
    with pytest.raises(ValueError, match=r"in 0..k=2, got \[3\]"):
        position_counts(2, [3])
    # A row that drafted only 1 of 3 (its own k) and accepted it never tried position 2.
    assert position_counts(3, [1, 3], limits=[1, 3]) == ([2, 1, 1], [2, 1, 1])


# --- choosing k


def test_high_acceptance_and_cheap_verify_drafts_long():
    policy = calibrated(cheap, batch_size=10)
    feed(policy, rate=0.9, rounds=200, batch_size=10)
    d = policy.decide(10)
    assert d.k >= 3 and not d.probe
    assert d.reason.startswith(f"k={d.k} ") and "beats plain" in d.reason


def test_moderate_acceptance_and_cheap_verify_drafts():
    policy = calibrated(cheap, batch_size=10)
    feed(policy, rate=0.6, rounds=200, batch_size=10, k=1)
    assert policy.decide(10).k > 0


def test_acceptance_below_break_even_turns_drafting_off_and_says_why():
    # k=1 costs 1.15 T1 here, so it pays only above a_1 = 0.15.
    policy = calibrated(cheap, batch_size=10)
    feed(policy, rate=0.1, rounds=200, batch_size=10, k=1)
    d = policy.decide(10)
    assert d.k == 0 and not d.probe
    assert d.reason.startswith("k=0: plain 500.0 tok/s beats k=1 ")
    assert "acceptance 0.10" in d.reason and "(B=10)" in d.reason


def apple(length):
    """APPLE's multiples, linear between the measured lengths."""
    lo = max(n for n in APPLE if n <= length)
    hi = min(n for n in APPLE if n >= length)
    return APPLE[lo] if lo == hi else APPLE[lo] + (APPLE[hi] - APPLE[lo]) * (length - lo) / (hi - lo)


def test_apple_verify_costs_need_very_high_acceptance():
    # Verifying 2 tokens costs 1.7 T1: even a_1 = 0.8 (then 1.0 at every later position) does not pay.
    policy = DraftPolicy(8)
    for length, multiple in APPLE.items():
        for _ in range(EXPLORE_SAMPLES):
            policy.record_verify_time(10, length, T1 * multiple)
    policy.record_draft_time(10, 0.2 * T1)
    feed(policy, rate=0.8, rounds=200, batch_size=10)
    # Lengths 3 and 5..8 are untimed: a draft length would pay if its pass cost no more than the
    # longest shorter one timed, so it is tried; timed, none pays, and drafting goes off.
    first = policy.decide(10)
    assert first.k in (2, 4, 5, 6, 7) and first.reason.startswith(f"explore k={first.k}: ") and not first.probe
    decisions = run(policy, 20, accepts=lambda i: i % 5 != 0, batch_size=10, profile=apple, draft=0.2)
    # Each untimed length at most twice, and once more where a round times the drafter apart.
    assert sum(d.reason.startswith("explore") for d in decisions) <= 5 * EXPLORE_SAMPLES + 1
    d = policy.decide(10)
    assert d.k == 0 and "plain" in d.reason


def test_moe_like_costs_turn_drafting_off_at_batch_1_only():
    # B=1: each extra token wakes other experts, L tokens cost L forwards. B=8: nearly flat.
    policy = DraftPolicy(8)
    for length in [*range(2, 10), 1]:  # plain last: timed alongside the lengths (see CostModel.drift)
        for _ in range(EXPLORE_SAMPLES):
            policy.record_verify_time(1, length, T1 * length)
            policy.record_verify_time(8, length, 3 * T1 * cheap(length))
    policy.record_draft_time(1, 0.1 * T1)
    policy.record_draft_time(8, 0.3 * T1)
    feed(policy, rate=0.75, rounds=200, batch_size=8)
    at_1, at_8 = policy.decide(1), policy.decide(8)
    assert at_1.k == 0 and "(B=1)" in at_1.reason
    assert at_8.k > 0 and "(B=8)" in at_8.reason


def test_a_static_batch_drafts_only_where_drafting_pays_after_its_rows_finish_apart():
    # Drafting pays 1.21x round for round (k=8 at a_1 = 0.75); static batches at B=4 that drafted
    # 8 lost half their time to the rounds after their first row finished
    # (DraftPolicy.record_finish), and shorter drafts, whose rows drift apart less, lose too much too.
    policy = calibrated(lambda n: 1 + 0.5 * (n - 1), batch_size=4)
    feed(policy, rate=0.75, rounds=100, batch_size=4)
    assert policy.decide(4, static=True).k == 8  # nothing lost yet
    spread = round_spreads(policy.acceptance.rates(policy.rounds), 8)[8]
    for lost in (0.6, 0.5, -0.05):  # a batch whose tail kept the full batch's pace lost nothing
        policy.record_finish(4, lost, spread)
    d = policy.decide(4, static=True)
    assert d.k == 0 and "lost to rows finishing apart" in d.reason
    # Its probes are spaced by what they cost with that loss, not at once: round for round they pay.
    for _ in range(20):
        assert policy.decide(4, static=True).k == 0
        record_round(policy, 4, 0, [0] * 4, 0.0, T1)
    # A batch that rows join as others leave, and a batch size with no such record, draft on.
    assert policy.decide(4).k > 0
    policy.record_finish(2, 0.5, spread)
    assert policy.decide(4).k > 0
    with pytest.raises(ValueError):
        policy.record_finish(4, 1.0, spread)
    with pytest.raises(ValueError):
        policy.record_finish(4, 0.1, -1.0)


def test_losses_that_hold_a_static_batch_off_are_measured_again_after_plain_batches():
    # While what static batches lose finishing apart keeps drafting off, no batch drafts to say
    # otherwise (DraftPolicy.record_plain_batch): three losses held the 16 code prompts plain at
    # B = 4 for 30 batches where k = 1 paid 1.06x.
    policy = calibrated(lambda n: 1 + 0.5 * (n - 1), batch_size=4)
    feed(policy, rate=0.75, rounds=100, batch_size=4)
    spread = round_spreads(policy.acceptance.rates(policy.rounds), 8)[8]
    for lost in (0.6, 0.5, 0.55):
        policy.record_finish(4, lost, spread)
    for _ in range(FINISH_SAMPLES):
        assert policy.decide(4, static=True).k == 0
        policy.record_plain_batch(4)
        policy.record_plain_batch(2)  # another batch size's count is its own
    d = policy.decide(4, static=True)
    assert d.k == 8 and f"measured again after {FINISH_SAMPLES} plain batches" in d.reason
    # The batch that drafted tells what it lost, and the losses weigh again.
    policy.record_finish(4, 0.6, spread)
    assert policy.decide(4, static=True).k == 0
    policy.record_plain_batch(4)
    assert policy.decide(4, static=True).k == 0


def test_a_static_batchs_finishing_loss_grows_with_how_far_apart_a_length_spreads_its_rows():
    # Batches that drafted 8 lost 20% finishing apart. Shorter drafts spread rows less and lose
    # less: one median put 20% on every length and kept drafting off where k = 1 paid 1.16x
    # (16 code prompts at B = 4, bench/workloads_wide.json).
    policy = calibrated(lambda n: 1 + 0.5 * (n - 1), batch_size=4)
    feed(policy, rate=0.75, rounds=100, batch_size=4)
    spreads = round_spreads(policy.acceptance.rates(policy.rounds), 8)
    for _ in range(3):
        policy.record_finish(4, 0.2, spreads[8])
    d = policy.decide(4, static=True)
    assert 0 < d.k < 8  # drafts, shorter than round for round
    assert f"with {0.2 * spreads[d.k] / spreads[8]:.1%} lost to rows finishing apart" in d.reason
    assert policy.decide(4).k == 8  # a batch that rows join as others leave loses nothing of the kind
    # Rows that never drifted apart lost nothing to drafting, whatever their tail took.
    fresh = calibrated(lambda n: 1 + 0.5 * (n - 1), batch_size=4)
    feed(fresh, rate=0.75, rounds=100, batch_size=4)
    for _ in range(3):
        fresh.record_finish(4, 0.3, 0.0)
    assert fresh.decide(4, static=True).k == 8


def test_round_spreads_are_the_spread_of_the_tokens_a_round_takes():
    acceptance = [0.9, 0.7, 0.5, 0.8]
    for k, got in enumerate(round_spreads(acceptance, 4)):
        # X = 1 + accepted drafts: P(X = j + 1) = a_1 ... a_j (1 - a_{j+1}), the last one all k accepted.
        probs, reach = [], 1.0
        for j in range(k + 1):
            probs.append(reach * (1 - acceptance[j] if j < k else 1.0))
            reach *= acceptance[j] if j < k else 1.0
        mean = sum((j + 1) * p for j, p in enumerate(probs))
        variance = sum((j + 1 - mean) ** 2 * p for j, p in enumerate(probs))
        assert got == pytest.approx(math.sqrt(variance / mean))
    assert round_spreads(acceptance, 4)[0] == 0.0 and round_spreads([1.0] * 3, 3) == [0.0] * 4


def test_finishing_loss_is_the_tails_time_beyond_its_tokens_at_the_full_batchs_pace():
    # 90 tokens in 8 s until the first row finished, then 10 tokens in 2 s where 8/9 s would do.
    assert finishing_loss(10.0, 100, 8.0, 90) == pytest.approx((2 - 10 / 11.25) / 10)
    assert finishing_loss(10.0, 100, 10.0, 100) == 0.0
    with pytest.raises(ValueError):
        finishing_loss(10.0, 100, 11.0, 90)


# --- probing


def test_probing_costs_at_most_the_documented_bound_when_nothing_is_accepted():
    profile = lambda n: 1 + 0.7 * (n - 1)  # Apple-like: a probe verifying 2 tokens costs 1.7 T1
    policy = calibrated(profile, draft=0.2)
    decisions = run(policy, 3000, accepts=lambda i: False, profile=profile, draft=0.2)
    first_off = next(i for i, d in enumerate(decisions) if d.k == 0)
    probes = probe_stretches(decisions, first_off)
    assert all(decisions[i].probe and decisions[i].k == 1 for start in probes for i in start)
    # Each round costs a drafter step plus verifying 2 tokens instead of 1, for the same 1 token,
    # and each probe breaks the pipelined plain rounds (SWITCH_ROUNDS). Counted once a_1's estimate
    # has come down from its prior (the first intervals are shorter), over whole intervals.
    settled = probes[3:]
    extra = (len(settled) - 1) * (PROBE_ROUNDS * (0.2 + profile(2) - profile(1)) + SWITCH_ROUNDS) * T1
    plain = (settled[-1][0] - settled[0][0]) * T1
    assert len(settled) >= 5 and extra <= PROBE_OVERHEAD_BUDGET * plain
    interval = (PROBE_ROUNDS * 0.9 + SWITCH_ROUNDS) / PROBE_OVERHEAD_BUDGET  # 0.9 T1 a round, and the switch
    assert abs(policy.probe_interval(1, 1) - interval) <= 1  # float rounding, and a_1 is near 0, not 0


def probe_stretches(decisions, after):
    """The probes after round `after`, each as its rounds' indices: PROBE_ROUNDS in a row (the last
    one may be cut off by the end of the run), each a probe at the first's length."""
    rounds = [i for i, d in enumerate(decisions) if d.k > 0 and i > after]
    starts = [i for i in rounds if i - 1 not in rounds]
    stretches = [[i for i in range(start, start + PROBE_ROUNDS) if i < len(decisions)] for start in starts]
    assert sum(stretches, []) == rounds  # nothing else drafts
    for stretch in stretches:
        first = decisions[stretch[0]]
        assert "round 1 of" in first.reason and all(decisions[i].probe and decisions[i].k == first.k for i in stretch)
    return stretches


def test_cheap_probes_still_pay_for_leaving_the_pipelined_plain_rounds():
    # Verifying 2 tokens costs what 1 does, so a probe's own round costs a drafter step more; the
    # switch in and out of pipelined plain rounds is what spaces them (16 rounds cost 3-5%).
    policy = calibrated(cheap)
    decisions = run(policy, 1000, accepts=lambda i: False)
    interval = policy.probe_interval(1, 1)
    round_extra = 0.1 + cheap(2) - cheap(1)
    # a_1's estimate is near 0 after 1000 rounds, not 0: a few rounds short of the limit
    assert 0 <= math.ceil((SWITCH_ROUNDS + PROBE_ROUNDS * round_extra) / PROBE_OVERHEAD_BUDGET) - interval <= 3
    first_off = next(i for i, d in enumerate(decisions) if d.k == 0)
    probes = [stretch[0] for stretch in probe_stretches(decisions, first_off)]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert len(probes) >= 4 and all(gap > SWITCH_ROUNDS / PROBE_OVERHEAD_BUDGET for gap in gaps)


def test_where_drafting_only_just_loses_probes_come_oftenest():
    # k=1 costs 1.55 T1 for 1.5 tokens at a_1 = 0.5: 3% short of plain. A probe's round then costs
    # 0.05 T1 more than the plain rounds it replaces, not the 0.55 T1 of one that accepts nothing,
    # so probes (the only new samples of drafting's costs while off) come oftener.
    profile = lambda n: 1 + 0.45 * (n - 1)
    policy = calibrated(profile, batch_size=2)
    feed(policy, rate=0.5, rounds=200, batch_size=2, k=1)
    assert policy.decide(2).k == 0
    assert policy.probe_interval(2, 1) == math.ceil((PROBE_ROUNDS * 0.05 + SWITCH_ROUNDS) / PROBE_OVERHEAD_BUDGET)
    never = calibrated(profile, batch_size=2)
    feed(never, rate=0.0, rounds=200, batch_size=2, k=1)
    assert never.probe_interval(2, 1) == math.ceil((PROBE_ROUNDS * 0.55 + SWITCH_ROUNDS) / PROBE_OVERHEAD_BUDGET)


def weighings(monkeypatch):
    """A counter of the decisions weighed in full (each weighs every length's rate once)."""
    count = [0]
    weigh = policy_module.tokens_per_second

    def counted(*args):
        count[0] += 1
        return weigh(*args)

    monkeypatch.setattr(policy_module, "tokens_per_second", counted)
    return count


def test_a_decision_stands_a_few_rounds_and_probes_and_refreshes_come_as_if_weighed_every_round(monkeypatch):
    # Weighing every round cost 60-70 us of host time a round on this machine, 1-2% of a round of
    # the demo pair at B = 1. A decision not to draft stands until a probe is due (OFF_HOLD_ROUNDS
    # at most), one to draft the best length until a refresh or a re-timing of plain decoding is.
    profile = lambda n: 1 + 0.05 * (n - 1) ** 2  # k = 3 best with every draft accepted, k = 2 and 4 near it
    rounds, sequences, weighed = 1500, {}, {}
    for hold in (True, False):
        if not hold:
            monkeypatch.setattr(policy_module, "ON_HOLD_ROUNDS", 0)
            monkeypatch.setattr(policy_module, "OFF_HOLD_ROUNDS", 0)
        count = weighings(monkeypatch)
        never, always = calibrated(profile, draft=0.2), calibrated(profile)
        off = run(never, rounds, accepts=lambda i: False, profile=profile, draft=0.2)
        weighed[hold, "off"], count[0] = count[0], 0
        on = run(always, rounds, accepts=lambda i: True, profile=profile)
        weighed[hold, "on"] = count[0]
        sequences[hold] = [(d.k, d.probe) for d in off], [(d.k, d.reason.split(" ")[0]) for d in on]
    assert sequences[True] == sequences[False]
    assert weighed[False, "off"] == weighed[False, "on"] == rounds
    assert sum(d == (0, False) for d in sequences[True][0]) > 0.9 * rounds
    assert weighed[True, "off"] < rounds / 8
    on = sequences[True][1]
    assert {"refresh", "k=0:"} <= {why for _, why in on} and sum(k == 3 for k, _ in on) > 0.8 * rounds
    assert weighed[True, "on"] < rounds / 2


def test_one_probe_after_a_long_plain_stretch_does_not_outweigh_the_ones_before():
    # Probes come over a hundred plain rounds apart; aged by all of those, what came before weighed
    # a twentieth of the next probe's one row, which alone turned drafting on or off.
    estimate = AcceptanceEstimate.empty(8)
    for r in range(4):  # four probes, 150 rounds apart, a draft accepted once
        estimate.update(150 * r, 1, [int(r == 0)])
    estimate.update(600, 1, [1])
    assert estimate.rates(600)[0] < 0.6
    assert PROBE_GAP_ROUNDS < ACCEPTANCE_HALF_LIFE_ROUNDS


def test_a_probe_runs_all_its_rounds_before_a_deeper_length_is_explored():
    # k=1 rounds cost 1.6 T1 and 2 drafts in 5 are accepted: drafting goes off, k=2 unexplored.
    # The probe's first round accepts, which makes k=2 worth a try; exploring it then (one round,
    # untimed as its shape's first) ended the probe, whose steady rounds are the only timings of
    # drafting while it is off. The probe goes on, and k=2 is explored after it.
    policy, decisions, last, probed = DraftPolicy(k_max=2), [], 0, False
    cost = {1: 1.6, 2: 1.7}
    for i in range(400):
        d = policy.decide(1)
        decisions.append(d)
        if probed and not d.probe:
            break
        if d.k:
            probed = probed or d.probe
            accepted = d.k if probed or i % 5 in (1, 3) else 0
            record_round(policy, 1, d.k, [accepted], 0.1 * T1 * d.k, (cost[d.k] - 0.1 * d.k) * T1)
        else:
            policy.record(1, 0, [0], None, T1, steady=last == 0)
        last = d.k
    first = next(i for i, d in enumerate(decisions) if d.probe)
    assert [d.probe and d.k == 1 for d in decisions[first:first + PROBE_ROUNDS]] == [True] * PROBE_ROUNDS
    after = decisions[first + PROBE_ROUNDS]
    assert after.k == 2 and after.reason.startswith("explore k=2"), after.reason


def test_drafting_turned_off_by_paired_timings_comes_back_once_its_rounds_pay():
    # k=2 rounds cost 3 T1 and k=1 rounds 2 T1 beside plain rounds of T1, timed side by side (the
    # ratios set plain decoding's cost): at a_1 = 0.75 drafting loses and goes off. Then drafting
    # gets cheaper (1.5 and 2 T1: k=2 pays 1.25x). One-round probes made no ratio and timed only
    # the round that pays for the switch, so the old ratios stood: drafting was back for two rounds
    # and off for 2300. A probe's steady rounds pair with the plain timing before them.
    policy = DraftPolicy(k_max=2)
    cost, last, decisions = {1: 2.0, 2: 3.0}, 0, []
    for i in range(3300):
        if i == 300:
            cost = {1: 1.5, 2: 2.0}
        d = policy.decide(1)
        if d.k:
            record_round(policy, 1, d.k, [d.k if i % 4 else 0], 0.2 * T1 * d.k, (cost[d.k] - 0.2 * d.k) * T1)
        else:
            policy.record(1, 0, [0], None, T1, steady=last == 0)
        last = d.k
        decisions.append(d)
    assert sum(d.k == 0 for d in decisions[50:300]) > 200
    interval = policy.probe_interval(1, 1) + PROBE_ROUNDS
    drafting = [d.k > 0 and not d.probe for d in decisions[300 + 4 * interval:]]
    assert sum(drafting) > 0.9 * len(drafting)


def test_an_early_decision_not_to_draft_is_rechecked_before_probes_are_spaced_by_cost():
    # A k=1 round costs 1.8 plain rounds (as on the demo pair at B = 1), so drafting pays only
    # deep, once acceptance is known. The exploring rounds see 2 of 4 drafts accepted of a drafter
    # that is right 5 times in 6: drafting goes off, and with probes spaced by their cost (over
    # 160 plain rounds) it drafted in 4 of 300 rounds. Re-checked after PROBE_GAP_ROUNDS, the
    # early decision gives way to exploring the deeper lengths.
    profile = lambda n: 1.0 if n == 1 else 1.2 + 0.25 * n  # noqa: E731
    policy, drafted, decisions = DraftPolicy(), 0, []
    for i in range(300):
        d = policy.decide(1)
        if d.k:
            accepted = drafted % 2 == 1 if drafted < 4 else drafted % 6 != 3
            drafted += 1
            record_round(policy, 1, d.k, [d.k if accepted else 0], 0.1 * T1 * d.k, profile(d.k + 1) * T1)
        else:
            policy.record(1, 0, [0], None, T1, steady=bool(decisions) and decisions[-1].k == 0)
        decisions.append(d)
    first_off = next(i for i, d in enumerate(decisions) if d.k == 0 and i > 4)
    recheck = next(i for i, d in enumerate(decisions) if d.probe)
    assert recheck == first_off + PROBE_GAP_ROUNDS and "re-checking an early decision" in decisions[recheck].reason
    assert sum(d.k > 0 for d in decisions) > 0.9 * len(decisions)


def test_drafting_comes_back_within_three_probe_intervals_once_text_is_predictable():
    profile = lambda n: 1 + 0.3 * (n - 1)  # k=1 pays above a_1 ~ 0.43
    policy = calibrated(profile)
    hard = run(policy, 500, accepts=lambda i: False, profile=profile)
    assert hard[-1].k == 0 or hard[-1].probe
    interval = policy.probe_interval(1, 1)
    easy = run(policy, 3 * (interval + 1), accepts=lambda i: True, profile=profile)
    back = [i for i, d in enumerate(easy) if d.k > 0 and not d.probe]
    assert back, [d.reason for d in easy]
    assert all(d.k > 0 and not d.probe for d in easy[back[0]:])


# --- costs are never free


def test_before_any_timing_the_policy_decodes_plainly_then_explores_with_real_rounds():
    policy = DraftPolicy(8)
    for _ in range(PLAIN_WINDOW):  # steady plain rounds: their mean is plain decoding's cost
        assert policy.decide(1) == Decision(0, "k=0: timing plain decoding at B=1 first")
        policy.record(1, 0, [0], 0.0, T1)
    # Nothing else timed: at the prior acceptance (0.5) one draft might pay, so a real round tries it.
    d = policy.decide(1)
    assert d.k == 1 and d.reason.startswith("explore k=1: ") and not d.probe


def test_only_steady_plain_rounds_time_plain_decoding():
    # The first plain round of a stretch also waits for its own graph (about 2 T1 on a small
    # model); taken as plain decoding's cost, it sent the policy drafting where plain was faster.
    policy = DraftPolicy(8)
    policy.record(1, 0, [0], 0.0, 2 * T1, steady=False)
    assert policy.decide(1) == Decision(0, "k=0: timing plain decoding at B=1 first")
    for _ in range(PLAIN_WINDOW):
        policy.record(1, 0, [0], 0.0, T1)
    policy.record(1, 0, [0], 0.0, 0.01 * T1, steady=False)  # a tail: the last round of a stretch
    assert policy.costs.verify_time(1, 1) == pytest.approx(T1)


def test_the_second_plain_round_after_drafting_does_not_time_plain_decoding():
    # After drafting rounds the first steady plain round still runs slow (10-15% on the demo pair
    # at B = 1); in every sample, it made plain decoding look dearer than drafting at a 512-token
    # prompt where every fixed k lost. The first PLAIN_SETTLE rounds after drafting time nothing.
    policy = calibrated(cheap)
    feed(policy, rate=1.0, rounds=4, k=3)
    policy.record(1, 0, [0], 0.0, 2 * T1, steady=False)  # waits for its own graph
    for _ in range(PLAIN_SETTLE - 1):
        policy.record(1, 0, [0], 0.0, 1.5 * T1)  # steady, but still slow
    for _ in range(PLAIN_WINDOW):
        policy.record(1, 0, [0], 0.0, 0.9 * T1)
    assert policy.costs.samples(("verify", 1, 1)) == EXPLORE_SAMPLES + 1
    assert policy.costs._samples["verify", 1, 1][-1] == pytest.approx(0.9 * T1)


def test_a_new_batch_size_times_plain_decoding_before_it_drafts():
    # A neighbour's plain cost scaled by rows (2 T1 at B=2 from T1 at B=1) would overstate plain
    # decoding where batching is nearly free, and every draft length would look cheap beside it.
    policy = calibrated(cheap)
    feed(policy, rate=1.0, rounds=10, k=3)
    assert policy.decide(1).k > 0
    for _ in range(PLAIN_SETTLE + PLAIN_WINDOW):  # after drafting rounds, the first PLAIN_SETTLE time nothing
        assert policy.decide(2) == Decision(0, "k=0: timing plain decoding at B=2 first")
        policy.record(2, 0, [0, 0], 0.0, 1.1 * T1)
    assert policy.decide(2).k > 0


def test_rows_leaving_a_batch_decide_as_it_did_until_their_batch_size_stays():
    # A batch of 4 whose rows finish one by one runs a round or two at B=3, 2 and 1. Timing plain
    # decoding there first, and exploring, would spend those rounds, and never finish timing
    # (no steady plain stretch), only to choose what B=4 chose.
    policy = calibrated(cheap, batch_size=4)
    feed(policy, rate=1.0, rounds=10, batch_size=4, k=3)
    chosen = policy.decide(4).k
    assert chosen > 0
    for b in (3, 2, 1):
        d = policy.decide(b)
        assert d.k == chosen and not d.reason.startswith(("k=0", "explore")), d.reason
    # A batch size that stays is no tail: it times plain decoding of its own.
    run(policy, TAIL_ROUNDS, accepts=lambda i: True, batch_size=3)
    assert policy.decide(3) == Decision(0, "k=0: timing plain decoding at B=3 first")
    # A larger batch (rows joining) is none either: it times plain decoding first.
    assert policy.decide(8) == Decision(0, "k=0: timing plain decoding at B=8 first")


def test_short_tails_at_every_request_never_make_a_smaller_batch_size_time_plain_decoding():
    # Requests of a batch of 4 end a few rounds apart, again and again: a round at B=3, 2 and 1
    # each time. Counted over all requests, those tails once passed TAIL_ROUNDS, and each smaller
    # batch size then stopped to time plain decoding, a round or two at a time, for good.
    profile = lambda n: 1 + 0.2 * (n - 1)
    policy = calibrated(profile, batch_size=4)
    feed(policy, rate=1.0, rounds=10, batch_size=4, k=3)
    chosen = policy.decide(4).k
    for _ in range(3 * TAIL_ROUNDS):
        run(policy, 12, accepts=lambda i: True, batch_size=4, profile=profile)
        for b in (3, 2, 1):
            tail = run(policy, 1, accepts=lambda i: True, batch_size=b, profile=profile)[0]
            assert tail.k > 0 and not tail.reason.startswith(("k=0", "explore")), tail.reason
    assert policy.decide(4).k == chosen


def test_a_tails_plain_decoding_is_its_timed_length_at_the_larger_batch_sizes_ratio():
    # B=4 times plain decoding and 2-token passes; a tail at B=2 times only its 2-token passes.
    # Scaled down in proportion to tokens (half of 2 tokens) B=2's plain decoding looked a third
    # cheaper than it is, and drafting that paid there looked as if it lost.
    costs = CostModel({(4, 1): 1.4 * T1, (4, 2): 1.8 * T1, (2, 2): 1.4 * T1})
    assert costs.verify_time(2, 1) == pytest.approx(1.4 * T1 * 1.4 / 1.8)
    # A batch size with nothing timed holds the smallest estimate below it, plain decoding included.
    assert costs.verify_time(1, 1) == pytest.approx(1.4 * T1 * 1.4 / 1.8)
    assert costs.verify_time(1, 2) == pytest.approx(1.4 * T1)


def test_a_drafter_that_never_agrees_is_explored_for_a_round_or_two_only():
    # No side passes to time: every exploration is a real round that yields its token anyway.
    # With nothing accepted the optimistic bound soon falls below plain decoding, so what the
    # exploration costs stays within a couple of plain rounds.
    policy = DraftPolicy(8)
    decisions = run(policy, 200, accepts=lambda i: False)
    drafting = [(i, d) for i, d in enumerate(decisions) if d.k > 0]
    explored = [d for _, d in drafting if d.reason.startswith("explore")]
    # Drafting stops once plain beats it by MIN_GAIN (within it the last choice stands): by round 10.
    assert 1 <= len(explored) <= 3 and all(i < 10 for i, d in drafting if not d.probe)
    extra = sum(0.1 * d.k + cheap(d.k + 1) - 1 for d in explored)
    assert extra <= 2.0  # in T1: under two plain rounds' worth, once per batch size
    assert all(d.probe for d in decisions[10:] if d.k > 0)


def test_exploration_climbs_from_short_drafts_and_stops_where_the_timed_ones_rule_out_the_rest():
    # Acceptance 0.6 per position, each extra verified token 0.4 T1: deep drafts cannot pay, which
    # only the timings of the lengths below them can show (an untimed length's bound builds on
    # the timed shorter ones). Exploring the most promising first began
    # with the deepest and timed k = 5 and 6 as well.
    policy, rng = DraftPolicy(8), random.Random(0)
    explored = []
    for _ in range(300):
        d = policy.decide(1)
        explored += [d.k] if d.reason.startswith("explore") else []
        n = 0
        while n < d.k and rng.random() < 0.6:
            n += 1
        policy.record(1, d.k, [n], 0.1 * T1 * d.k, T1 * (1 + 0.4 * d.k))
    assert explored == sorted(explored) and max(explored) <= 4, explored


def test_an_untimed_length_past_the_timed_ones_is_bounded_by_their_growth_not_held_flat():
    # Verify costs that zigzag, as the demo pair's at B=4 on this CPU (a pass of 16 row-tokens costs
    # what one of 12 does): L = 1..5 timed at 1, 1.5, 2.3, 2.3, 3 T1, a drafter step 0.2 T1, and
    # acceptance 0.9 at every position. k=3 is best. Held at 3 T1 (the longest timed pass), verifying
    # 7 tokens would make k=6 look 5% better, and every wobble of the deep positions' acceptance
    # explored another deep length: in bench runs those rounds cost auto up to 10% of a run. Past
    # the timed lengths each token adds half their average growth (0.25 T1 here): none can pay.
    def timed(costs):
        """L = 1..5 timed at costs[L] T1 (k = 5..8 untimed), acceptance 0.9 at every position."""
        policy = DraftPolicy(8)
        for length in [2, 3, 4, 5, 1]:
            for _ in range(EXPLORE_SAMPLES):
                policy.record_verify_time(1, length, T1 * costs[length])
        policy.record_draft_time(1, 0.2 * T1)
        policy.acceptance = AcceptanceEstimate([900.0] * 4 + [0.0] * 4, [1000.0] * 4 + [0.0] * 4, [0] * 8)
        return policy

    d = timed({1: 1.0, 2: 1.5, 3: 2.3, 4: 2.3, 5: 3.0}).decide(1)
    assert d.k == 3 and not d.reason.startswith("explore"), d.reason
    # Where the timed lengths grow slowly, deep lengths are still worth a try.
    assert timed({1: 1.0, 2: 1.1, 3: 1.2, 4: 1.2, 5: 1.3}).decide(1).reason.startswith("explore k=5: ")


def test_a_drafter_that_always_agrees_climbs_to_long_drafts_within_a_few_rounds():
    policy = DraftPolicy(8)
    decisions = run(policy, 40, accepts=lambda i: True)
    # Four plain rounds time plain decoding, each length is run twice, and two rounds (the first
    # drafting one, then one in DRAFT_TIMING_INTERVAL) time the drafter apart, not the round.
    assert max(d.k for d in decisions[:22]) == 8
    assert decisions[-1].k >= 6 and not decisions[-1].reason.startswith("explore")


def test_only_plain_decoding_timed_is_not_taken_as_free_verification():
    policy = DraftPolicy(8)
    policy.record_verify_time(1, 1, T1)
    policy.record_draft_time(1, 0.01 * T1)
    feed(policy, rate=1.0, rounds=5, k=8)  # records t_verify(1, 9) too: forget it
    policy.costs = CostModel({(1, 1): T1}, {1: 0.01 * T1})
    assert policy.costs.verify_time(1, 9) == pytest.approx(9 * T1)  # as if nothing amortised
    # The estimate is pessimistic; what the policy does is time the lengths that might pay for
    # real, and verification that costs as much as it looks (L forwards) turns drafting off.
    d = policy.decide(1)
    assert d.k > 0 and d.reason.startswith("explore")
    decisions = run(policy, 30, accepts=lambda i: True, profile=lambda n: n, draft=0.01)
    assert decisions[-1].k == 0 and "plain" in decisions[-1].reason


def test_unmeasured_lengths_interpolate_between_and_grow_beyond_measured_ones():
    costs = CostModel()
    costs.record_verify(1, 1, 1.0)
    costs.record_verify(1, 3, 2.0)
    assert costs.verify_time(1, 2) == pytest.approx(1.5)
    assert costs.verify_time(1, 9) == pytest.approx(6.0)  # 2.0 * 9 / 3
    costs.record_verify(1, 5, 1.5)  # noisy: less than L=3
    # Not raised to L=3's cost (one slow cell would price every longer length alike): the two are
    # pooled, as the least-squares fit that grows with L has them, weighted by their samples.
    assert costs.verify_time(1, 3) == costs.verify_time(1, 5) == pytest.approx(1.75)
    assert costs.verify_time(1, 4) == pytest.approx(1.75)
    for _ in range(2):
        costs.record_verify(1, 5, 1.5)
    assert costs.verify_time(1, 5) == pytest.approx((2.0 + 3 * 1.5) / 4)
    costs.record_verify(1, 2, 0.5)  # below plain decoding: raised to it, which stays as timed
    assert costs.verify_time(1, 2) == costs.verify_time(1, 1) == 1.0
    assert costs.verify_time(2, 1) == pytest.approx(2.0)  # other batch sizes: scaled by rows
    assert costs.verify_time(1, 1) == 1.0


def test_unmeasured_batch_sizes_come_from_measured_neighbours():
    costs = CostModel()
    for length in (1, 9):
        costs.record_verify(4, length, 1.0 * length)
        costs.record_verify(8, length, 2.0 * length)
    assert costs.verify_time(6, 9) == pytest.approx(13.5)  # halfway between 9 and 18
    assert costs.verify_time(16, 1) == pytest.approx(4.0)  # twice the rows of B=8
    assert costs.verify_time(2, 1) == pytest.approx(1.0)  # held at B=4
    # B=6 has its own L=1 timing now; L=9 still comes from its neighbours.
    costs.record_verify(6, 1, 1.6)
    assert costs.verify_time(6, 9) == pytest.approx(13.5)
    assert costs.draft_time(6) is None


def test_cost_cells_are_a_low_quantile_of_recent_samples():
    costs = CostModel()
    costs.record_verify(1, 1, 1.0)
    costs.record_verify(1, 1, 2.0)
    assert costs.verify_time(1, 1) == pytest.approx(1.0)
    # A busy burst (three slow samples in eight) does not move it; a lasting change does.
    for t in (1.0, 9.0, 1.1, 8.0, 1.0, 7.0):
        costs.record_verify(1, 1, t)
    assert costs.verify_time(1, 1) == pytest.approx(1.0)
    for _ in range(COST_SAMPLES):
        costs.record_verify(1, 1, 3.0)
    assert costs.verify_time(1, 1) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="seconds must be positive"):
        costs.record_verify(1, 1, 0.0)


def test_costs_timed_at_a_context_since_outgrown_expire_and_stand_as_rescaled_priors():
    # Timed at a 32-token prompt; the drafter step and verifying 5 tokens never again.
    costs = CostModel()
    for n in (1, 2, 5):
        for _ in range(COST_SAMPLES):
            costs.record_verify(1, n, float(n), context=32)
    costs.record_draft(1, 0.5, context=32)
    costs.record_verify(2, 2, 7.0, context=32)
    # Grown past twice 32, but by fewer than CONTEXT_SLACK tokens: every sample stands.
    costs.record_verify(1, 2, 3.0, context=32 + CONTEXT_SLACK - 1)
    assert costs.verify_time(1, 2) == pytest.approx(2.0) and costs.samples(("verify", 1, 2)) == COST_SAMPLES
    # At 512 the old samples expire: one new timing of verifying 2 tokens is that cell's cost
    # (16 old ones held its low quantile down for 13 rounds), and the cells not timed since stand
    # as priors at the ratio it moved by (3.0 / 2.0; the timing at 287 tokens is not 32's).
    costs.record_verify(1, 2, 3.0, context=512)
    assert costs.samples(("verify", 1, 2)) == 2 and costs.verify_time(1, 2) == pytest.approx(3.0)
    assert costs.samples(("verify", 1, 1)) == costs.samples(("verify", 1, 5)) == 0
    assert costs.verify_time(1, 1) == pytest.approx(1.5) and costs.verify_time(1, 5) == pytest.approx(7.5)
    assert costs.draft_time(1) == pytest.approx(0.75)
    # Standing on a cost rescaled by other cells' growth, a cell is explored again at the new context.
    assert costs.measured(1, 5) and not costs.explored(1, 5) and costs.kept == 3
    assert costs.verify_time(2, 2) == pytest.approx(7.0)  # another batch size: its own contexts
    # Plain decoding timed again at the new context, at 2x the old cost: the cells timed since
    # (1.5x and 2x; of two ratios, the higher) now scale the rest.
    costs.record_verify(1, 1, 2.0, context=520)
    assert costs.verify_time(1, 1) == pytest.approx(2.0) and costs.verify_time(1, 5) == pytest.approx(10.0)
    assert costs.kept == 2
    # A shorter context again (a new request) expires nothing: its cheaper samples take the low
    # quantile within a quarter of the cell.
    costs.record_verify(1, 2, 2.5, context=40)
    assert costs.samples(("verify", 1, 2)) == 3 and costs.verify_time(1, 2) == pytest.approx(2.5)



def test_a_length_whose_costs_expired_is_explored_again_at_the_new_context():
    # Timed at a 32-token prompt, every length cheap; at 600 tokens plain decoding costs what it
    # did and the long passes three times as much: the short pass's expired cost, scaled by the
    # median growth of the cells timed since, looks dear, so it is timed again before it is judged.
    policy = DraftPolicy(8)
    for n in [*range(2, 10), 1]:
        for _ in range(EXPLORE_SAMPLES):
            policy.record_verify_time(1, n, T1 * cheap(n), context=32)
    policy.record_draft_time(1, 0.1 * T1, context=32)
    feed(policy, rate=1.0, rounds=20)
    for n in [1, *range(5, 10)]:
        for _ in range(EXPLORE_SAMPLES):
            policy.record_verify_time(1, n, T1 * (1 if n == 1 else 3 * cheap(n)), context=600)
    policy.record_draft_time(1, 0.1 * T1, context=600)
    assert not policy.costs.explored(1, 2)
    assert policy.decide(1).reason.startswith("explore k=1: ")


def test_a_length_timed_in_a_slow_moment_is_timed_again_and_chosen_once_it_pays():
    # Only the chosen length gets new samples: lengths near it run now and then, or a length
    # timed during a busy burst would never be chosen again.
    profile = lambda n: 1 + 0.05 * (n - 1) ** 2  # with every draft accepted, k=3 is best
    policy = calibrated(profile)
    feed(policy, rate=1.0, rounds=10, k=8)
    for _ in range(COST_SAMPLES):
        policy.record_verify_time(1, 4, 3 * T1 * profile(4))  # k=3 timed while the machine was busy
    # The quantile drops once enough of k=3's samples are new. At 3x its cost k=3 looks like a
    # loss, so it runs only every REFRESH_MAX_INTERVAL rounds; then an interval more to see it settled.
    renewed = int((COST_SAMPLES - 1) * COST_QUANTILE) + 1
    decisions = run(policy, REFRESH_MAX_INTERVAL * (renewed + 1), accepts=lambda i: True, profile=profile)
    assert decisions[0].k == 2  # a pass never costs less than a shorter one: k >= 3 all look slow
    refreshed = [(i, d.k) for i, d in enumerate(decisions) if d.reason.startswith("refresh")]
    assert {k for _, k in refreshed} >= {1, 3}
    for k in {k for _, k in refreshed}:  # no length re-timed oftener than every REFRESH_INTERVAL rounds
        rounds = [i for i, n in refreshed if n == k]
        assert all(b - a >= REFRESH_INTERVAL for a, b in zip(rounds, rounds[1:]))
    settled = [d.k for d in decisions[-REFRESH_MAX_INTERVAL:] if not d.reason.startswith("refresh")]
    assert settled == [3] * len(settled) and len(settled) >= REFRESH_MAX_INTERVAL - 16


def test_lengths_near_the_best_are_re_timed_as_often_as_their_estimated_loss_allows():
    # Costs that do not grow smoothly (the demo pair's at B=4 on this CPU): verifying 3 tokens costs
    # nearly what 4 do, so with every draft accepted k=1 and k=3 nearly tie and k=2 loses in between.
    costs = {1: 1.0, 2: 1.3, 3: 1.9, 4: 1.95, 5: 2.45}
    profile = costs.__getitem__
    policy = calibrated(profile, k_max=4)
    for _ in range(COST_SAMPLES):
        policy.record_verify_time(1, 4, 2 * T1 * profile(4))  # k=3 timed while the machine was busy
    feed(policy, rate=1.0, rounds=10, k=1)
    decisions = run(policy, 8 * REFRESH_MAX_INTERVAL, accepts=lambda i: True, profile=profile)
    assert decisions[0].k == 1
    # k=3, two lengths past the best, is re-timed and chosen (its neighbour k=2 never is the best).
    first = next(i for i, d in enumerate(decisions) if d.k == 3 and not d.reason.startswith("refresh"))
    assert first < 6 * REFRESH_MAX_INTERVAL
    # Once k=3 is chosen, k=2 (20% below it) runs every REFRESH_MAX_INTERVAL rounds, k=4 (1% below)
    # every REFRESH_INTERVAL.
    after = decisions[first:]
    twos, fours = ([i for i, d in enumerate(after) if d.k == k] for k in (2, 4))
    assert 1 <= len(twos) <= len(after) // REFRESH_MAX_INTERVAL + 1
    assert len(fours) >= len(after) // REFRESH_INTERVAL - 2 and len(fours) >= 3 * len(twos)


def slow_plain_then_lengths(profile, plain_last: bool) -> DraftPolicy:
    """Plain decoding timed while the machine was busy (1.3 T1), the lengths at their cost, and
    plain decoding timed first (as the policy does at a new batch size) or last."""
    policy = DraftPolicy(8)
    if not plain_last:
        for _ in range(PLAIN_WINDOW):
            policy.record(1, 0, [0], 0.0, 1.3 * T1)
    for length in range(2, 10):
        for _ in range(EXPLORE_SAMPLES):
            policy.record_verify_time(1, length, T1 * profile(length))
    if plain_last:
        for _ in range(PLAIN_WINDOW):
            policy.record(1, 0, [0], 0.0, 1.3 * T1)
    policy.record_draft_time(1, 0.1 * T1)
    return policy


def one_stretch(decisions) -> list[int]:
    stretch = [i for i, d in enumerate(decisions) if d.reason.startswith("k=0: re-timing plain decoding")]
    # One stretch, consecutive rounds, ending as soon as plain decoding's new timing wins.
    assert PLAIN_WINDOW <= len(stretch) <= PLAIN_WINDOW + 2
    assert stretch == list(range(stretch[0], stretch[0] + len(stretch)))
    assert all(d.k == 0 or d.probe for d in decisions[stretch[-1] + 1:])
    return stretch


def test_plain_decoding_timed_in_a_slow_moment_is_timed_again_while_drafting():
    # Plain decoding is timed only while the policy decodes plainly. Timed once while the machine
    # was busy (1.3 T1), it made k=1 look 14% faster than plain, where it is 12% slower.
    profile = lambda n: 1 + 0.6 * (n - 1)
    decisions = run(slow_plain_then_lengths(profile, plain_last=True), 250, accepts=lambda i: i % 2 == 0,
                    profile=profile)
    assert decisions[0].k == 1
    # Spaced so that forgoing the expected gain (about 14%), and switching, cost at most
    # PLAIN_REFRESH_BUDGET.
    stretch = one_stretch(decisions)
    assert stretch[0] >= ((PLAIN_WINDOW + 2) * 0.14 + SWITCH_ROUNDS) / PLAIN_REFRESH_BUDGET - 1


def test_plain_decoding_timed_before_the_lengths_is_timed_again_beside_them_soon():
    # At a new batch size plain decoding is timed before any length is: nothing timed beside it
    # yet tells how the machine's speed has moved since (CostModel.drift), so it is timed once
    # more, ALIGN_ROUNDS later, and not one budget interval later.
    profile = lambda n: 1 + 0.6 * (n - 1)
    policy = slow_plain_then_lengths(profile, plain_last=False)
    assert policy.costs.aligned(1) is False
    decisions = run(policy, 250, accepts=lambda i: i % 2 == 0, profile=profile)
    assert decisions[0].k == 1
    assert one_stretch(decisions)[0] <= ALIGN_ROUNDS  # rounds after the plain timing, which came first
    assert policy.costs.aligned(1)


def test_plain_decodings_cost_moves_with_the_lengths_timed_since():
    # Plain decoding timed beside the lengths; then the machine gets 30% quicker (another process
    # stopped) and only the lengths are timed again, as they are while drafting: the yardstick
    # follows them, and the choice stays as it was rather than flip to drafting on a stale timing.
    policy = calibrated(cheap)
    before = policy.costs.verify_time(1, 1)
    for _ in range(COST_SAMPLES):
        for length in range(2, 10):
            policy.record_verify_time(1, length, 0.7 * T1 * cheap(length))
    assert policy.costs.drift(1) == pytest.approx(0.7)
    assert policy.costs.verify_time(1, 1) == pytest.approx(0.7 * before)
    # The kept file holds the yardstick as it stands now.
    kept = DraftPolicy.from_json(policy.to_json())
    assert kept.costs.verify_time(1, 1) == pytest.approx(0.7 * before)


def test_plain_decoding_is_costed_by_its_ratio_to_a_length_timed_beside_it():
    # Both timed side by side in three quick and three slow moments; then plain decoding on alone
    # through a slow spell (drafting off) and verifying 2 tokens alone in a quick one (drafting
    # on). The cells, each a low quantile of its own moments, say verifying 2 tokens costs what
    # plain decoding does; the timings a few samples apart say 1.4x, and the ratio is what counts.
    costs = CostModel()
    for speed in [1.0] * 3 + [1.4] * 3:
        costs.record_verify(4, 2, 1.4 * T1 * speed)
        costs.record_verify(4, 1, T1 * speed)
    for _ in range(7):
        costs.record_verify(4, 1, 1.4 * T1)
    for _ in range(COST_SAMPLES):
        costs.record_verify(4, 2, 1.4 * T1)
    assert costs.verify[4, 2] / costs.verify[4, 1] == pytest.approx(1.0)
    row = costs.lengths(4)
    assert row[2] / row[1] == pytest.approx(1.4)
    assert row[1] == pytest.approx(T1)


def test_a_drafting_round_after_plain_rounds_is_a_sample_of_its_length_but_no_ratio():
    # The first drafting round after plain rounds also pays for the switch, and a probe is always
    # one. Paired with the plain timings after it, one slow probe outvoted the steady ratios: on
    # the demo pair two of them put plain decoding at 0.6x its cost and held drafting off for 600
    # rounds where it paid. Here k=1 rounds and plain stretches take turns (ratio 1.4), then a
    # probe takes 5x and plain decoding runs on.
    policy = DraftPolicy(k_max=1)
    policy.record_draft_time(1, 0.1 * T1)
    plain = lambda windows: [policy.record(1, 0, [0], None, T1) for _ in range(PLAIN_WINDOW * windows)]  # noqa: E731
    for _ in range(3):
        for _ in range(2):
            policy.record(1, 1, [1], None, 1.5 * T1)
        plain(1)
    assert policy.costs.verify_time(1, 1) == pytest.approx(T1)
    samples = policy.costs.samples(("verify", 1, 2))
    policy.record(1, 1, [0], None, 5.1 * T1)
    plain(PAIR_SAMPLES + 1)
    assert policy.costs.samples(("verify", 1, 2)) == samples + 1
    assert policy.costs.verify_time(1, 1) == pytest.approx(T1)


def test_a_new_drafter_timing_moves_neither_what_drafting_rounds_cost_nor_plain_decoding():
    # Every k=2 round takes 8 T1 whole and every plain round 4 T1. The drafter is first timed on
    # the round that leaves plain decoding, at 1.9 T1 a step, later at 0.9 (on the demo pair the
    # first timing is 1.25-1.5x the next). Taken off at the cost of the moment, the early rounds'
    # verify samples were 2 T1 cheaper than the later ones: the cell's low quantile took them,
    # and their ratios to plain decoding set its cost apart from the rounds'.
    policy = DraftPolicy(k_max=2)
    plain = lambda: [policy.record(1, 0, [0], None, 4 * T1) for _ in range(PLAIN_WINDOW)]  # noqa: E731
    drafting = lambda: [policy.record(1, 2, [2], None, 8 * T1) for _ in range(3)]  # noqa: E731
    plain()
    policy.record(1, 2, [2], 3.8 * T1, 6 * T1)  # timed apart
    drafting(), plain(), drafting()
    policy.record(1, 2, [2], 1.8 * T1, 6 * T1)  # timed apart again
    drafting(), plain(), drafting(), plain()
    costs = policy.costs
    assert costs.draft_time(1) == pytest.approx(0.9 * T1)
    assert 2 * costs.draft_time(1) + costs.verify_time(1, 3) == pytest.approx(8 * T1)
    assert costs.verify_time(1, 1) == pytest.approx(4 * T1)


def test_lengths_grow_as_rounds_where_a_drafter_step_timed_apart_costs_more_than_inside_one():
    # A drafter step timed apart costs 1 T1; inside a round it overlaps the verify pass, so k=2
    # rounds (6.6 T1) are dearer than k=1 rounds (6.4) by less than a step. Less their steps the
    # verify passes shrink with length (5.4 against 4.6); fitted to grow as passes they pooled,
    # and k=2 was costed at 7 T1, k=1 at 6.
    policy = DraftPolicy(k_max=2)
    for _ in range(PLAIN_WINDOW):
        policy.record(1, 0, [0], None, 4 * T1)
    policy.record(1, 1, [1], 1 * T1, 6 * T1)  # timed apart
    for k, seconds in [(1, 6.4 * T1), (2, 6.6 * T1)]:
        for _ in range(4):
            policy.record(1, k, [k], None, seconds)
    costs = policy.costs
    assert costs.draft_time(1) + costs.verify_time(1, 2) == pytest.approx(6.4 * T1)
    assert 2 * costs.draft_time(1) + costs.verify_time(1, 3) == pytest.approx(6.6 * T1)


def test_ratios_behind_fewer_than_three_plain_timings_leave_plain_decoding_as_timed():
    # Every ratio from one plain timing shares its noise: a lucky one would hold drafting off. Here
    # both are timed side by side twice in a slow moment (ratio 2), then verifying 2 tokens alone
    # in a quick one, so the cells alone say 1x.
    costs = CostModel()
    apart = lambda: [costs.record_verify(2, 1, T1) for _ in range(PAIR_SAMPLES)]  # noqa: E731
    for _ in range(2):
        costs.record_verify(1, 1, 2 * T1)
        costs.record_verify(1, 2, 4 * T1)
        apart()
    for _ in range(4):
        costs.record_verify(1, 2, 2 * T1)
        apart()
    assert costs.lengths(1)[2] / costs.lengths(1)[1] == pytest.approx(1.0)
    costs.record_verify(1, 1, 2 * T1)  # a third pair, slow again: the cells still say 1x
    costs.record_verify(1, 2, 4 * T1)
    assert costs.lengths(1)[2] / costs.lengths(1)[1] == pytest.approx(2.0)


def test_plain_decodings_cost_moving_with_its_ratios_alone_moves_the_version():
    # A policy keeps what it derived from the costs until `version` changes. Plain decoding's cost
    # also follows the ratios of paired timings, which move while every cell's low quantile stays
    # put: here four dear drafting rounds beside plain timings. Unseen, the stale plain cost had
    # auto drafting k = 1 for ten rounds at B = 4 on a 512-token prompt where every k lost.
    costs = CostModel()
    for _ in range(3):
        costs.record_verify(1, 1, T1)
        costs.record_verify(1, 2, 1.5 * T1)
    cells, version, plain = dict(costs.verify), costs.version, costs.verify_time(1, 1)
    for _ in range(4):
        costs.record_verify(1, 1, T1)
        costs.record_verify(1, 2, 3 * T1)
    assert costs.verify == cells
    assert costs.verify_time(1, 1) < 0.8 * plain
    assert costs.version != version


def test_json_round_trip_keeps_what_was_learned():
    policy = calibrated(cheap, batch_size=4)
    policy.record_verify_time(1, 1, T1)
    feed(policy, rate=0.5, rounds=30, batch_size=4, k=3)
    run(policy, 40, accepts=lambda i: i % 3 == 0, batch_size=4)
    text = policy.to_json()
    again = DraftPolicy.from_json(text)
    assert again.to_json() == text
    again.recheck = False  # (a kept policy's first off decision probes: test_kept_policy.py)
    for b in (1, 2, 4):  # the same choices (the original's may stand from a round before: ON_HOLD_ROUNDS)
        restored, kept = again.decide(b), policy.decide(b)
        assert (restored.k, restored.probe) == (kept.k, kept.probe)
    assert again.acceptance.rates(again.rounds) == policy.acceptance.rates(policy.rounds)
    with pytest.raises(ValueError, match="unknown draft policy format 7"):
        DraftPolicy.from_json('{"format": 7}')


def test_record_rejects_inconsistent_rounds():
    policy = calibrated(cheap)
    with pytest.raises(ValueError, match="accepted has 2 rows, batch_size is 1"):
        policy.record(1, 2, [0, 1], 0.1, 0.1)
    with pytest.raises(ValueError, match=r"in 0..k=2, got \[3\]"):
        policy.record(1, 2, [3], 0.1, 0.1)


def test_fixed_decision_says_it_was_the_request():
    assert fixed_decision(0).reason == "k=0 fixed by the request (drafting off)"
    assert fixed_decision(3).k == 3


def test_fixed_k_rounds_still_teach_the_policy():
    policy = calibrated(cheap)
    d = fixed_decision(2)
    for _ in range(50):
        policy.record(1, d.k, [2], 0.2 * T1, T1 * cheap(3))
    assert policy.acceptance.rates(policy.rounds)[:2] == pytest.approx([1.0, 1.0], abs=0.05)


def test_pipelined_plain_rounds_are_costed_by_their_mean_not_their_luckiest_interval():
    # Plain rounds are read one round late, so their times are intervals between reads that
    # jitter around the true cost: here 0.1 and 1.9 T1 in turn, a mean of T1.
    policy = DraftPolicy(8)
    for i in range(4 * COST_SAMPLES + 1):
        policy.record(1, 0, [0], 0.0, (0.1 if i % 2 else 1.9) * T1)
    assert policy.costs.verify_time(1, 1) == pytest.approx(T1)


def test_a_round_whose_drafts_were_not_timed_apart_charges_its_verify_with_the_rest():
    # Most drafting rounds overlap drafting with building the verify pass and time only the
    # whole round: the verify cell gets the whole less k steps at the drafter's measured cost.
    policy = calibrated(cheap, draft=0.1)
    for _ in range(COST_SAMPLES):
        policy.record(1, 3, [3], None, 3 * 0.1 * T1 + 1.5 * T1)
    assert policy.costs.verify[1, 4] == pytest.approx(1.5 * T1)
    assert policy.costs.draft_time(1) == pytest.approx(0.1 * T1)
    # With no drafter cost measured there is nothing to take off: acceptance only.
    fresh = DraftPolicy(4)
    fresh.record(1, 2, [2], None, T1)
    assert not fresh.costs.measured(1, 3)
    assert fresh.acceptance.reached[:2] == [1, 1]


def test_the_drafter_is_timed_apart_at_first_and_then_once_in_an_interval():
    policy = DraftPolicy(4)
    assert policy.draft_timing_due(1)
    policy.record(1, 2, [2], 0.0, 0.0)  # a shape's first round (untimed: it also traces) leaves it due
    assert policy.draft_timing_due(1)
    policy.record(1, 2, [2], 0.2 * T1, 1.5 * T1)
    # A round timed apart built its verify pass while the device idled: it costs more than a
    # drafting round does, so it gives the drafter's cost and no verify sample.
    assert policy.costs.draft_time(1) == pytest.approx(0.1 * T1)
    assert policy.costs.samples(("verify", 1, 3)) == 0
    assert not policy.draft_timing_due(1) and policy.draft_timing_due(2)  # each batch size on its own
    due = []
    for _ in range(4 * DRAFT_TIMING_INTERVAL):
        due.append(policy.draft_timing_due(1))
        policy.record(1, 2, [2], 0.2 * T1 if due[-1] else None, 1.2 * T1)
    assert sum(due) == 4
    assert policy.costs.samples(("draft", 1)) == 1 + 4
    assert policy.costs.samples(("verify", 1, 3)) == COST_SAMPLES  # its last ones, all overlapped
    assert policy.costs.verify[1, 3] == pytest.approx(1.0 * T1)


def test_near_break_even_the_last_choice_stands_within_min_gain():
    # Timings jitter by a few percent and every switch costs what the rates leave out, so drafting
    # turns on above MIN_GAIN over plain, off below MIN_GAIN under it, and in between stays as it was.
    policy = calibrated(cheap, batch_size=2, k_max=1)
    feed(policy, rate=0.5, rounds=100, batch_size=2, k=1)

    def decide_at(gain):  # k=1's expected rate over plain's, by setting its verify cost
        a = policy.acceptance.rates(policy.rounds)[0]
        for _ in range(COST_SAMPLES):  # each beside a plain timing: their ratio is what counts
            policy.record_verify_time(2, 2, T1 * ((1 + a) / gain - 0.1))
            for _ in range(PLAIN_WINDOW):  # plain rounds at plain's cost move the clock on
                policy.record(2, 0, [0, 0], 0.0, T1)
        return policy.decide(2)

    assert MIN_GAIN == 0.02
    decisions = [decide_at(g) for g in (1.05, 0.99, 0.97, 1.01, 1.03)]
    assert [0 if d.probe else d.k for d in decisions] == [1, 1, 0, 0, 1]  # a probe is a look while off
    assert "within 2% of plain" in decisions[1].reason and "is within 2% of k=1" in decisions[3].reason


def test_a_new_batch_size_does_not_explore_lengths_that_lost_relative_to_plain_at_a_smaller_one():
    # Apple-like costs at B=2, measured: every extra token per row costs 0.7 T1, and at 60%
    # acceptance no length pays. A server then meets B=8 for the first time and times plain
    # decoding there. Its lengths are unmeasured, but each extra token weighs at least as much
    # against plain decoding with 8 rows as with 2: none could pay, so none is explored (each such
    # round at B=8 verifies up to 72 tokens).
    profile = lambda n: 1 + 0.7 * (n - 1)
    policy = calibrated(profile, batch_size=2)
    feed(policy, rate=0.6, rounds=50, batch_size=2, k=1)
    assert policy.decide(2).k == 0 or policy.decide(2).probe
    for _ in range(PLAIN_SETTLE + PLAIN_WINDOW + 1):
        policy.record(8, 0, [0] * 8, 0.0, 2 * T1)
    decisions = [policy.decide(8) for _ in range(20)]
    assert not any(d.reason.startswith("explore") for d in decisions), decisions[0].reason
    # Where the same acceptance pays at B=2 (cheap extra tokens), B=8 still explores.
    policy = calibrated(cheap, batch_size=2)
    feed(policy, rate=0.6, rounds=50, batch_size=2, k=1)
    for _ in range(PLAIN_SETTLE + PLAIN_WINDOW + 1):
        policy.record(8, 0, [0] * 8, 0.0, 2 * T1)
    assert policy.decide(8).reason.startswith("explore")
