"""A draft policy kept on disk is untrusted input: validated fully, replaced when invalid, never
able to break exactness (k is clamped at the loop whatever a policy says), and treated as a prior
that the new process re-checks early."""

import json
import math

import pytest

from mlx_specdec import generate, load
from mlx_specdec.loading import load_policy
from mlx_specdec.policy import (
    K_MAX,
    PLAIN_SETTLE,
    PLAIN_WINDOW,
    PROBE_GAP_ROUNDS,
    PROBE_ROUNDS,
    RECHECK_ROUNDS,
    Decision,
    DraftPolicy,
    PolicyFileError,
)
from tests.helpers import prompt, record_round
from tests.test_exactness import _plain, _spec, standin

T1 = 0.02


def kept_text(**changes) -> str:
    """A valid kept file (what to_json writes after some rounds), with top-level changes."""
    policy = DraftPolicy()
    for n in (1, 2, 3, 5, 9):
        policy.record_verify_time(1, n, T1 * (1 + 0.1 * n))
    policy.record_draft_time(1, 0.1 * T1)
    for _ in range(5):
        policy.record(1, 2, [1], 0.2 * T1, 1.3 * T1)
    data = json.loads(policy.to_json())
    data.update(changes)
    return json.dumps(data)


BAD = {
    "k_max past the rings": kept_text(k_max=20),
    "a list": "[]",
    "null": "null",
    "a string": '"policy"',
    "torn": kept_text()[:40],
    "older format": kept_text(format=1),
    "NaN cost": kept_text(verify=[[1, 1, math.nan]]),
    "infinite cost": kept_text(verify=[[1, 1, math.inf]]),
    "zero cost": kept_text(verify=[[1, 1, 0.0]]),
    "negative cost": kept_text(verify=[[1, 1, -0.01]]),
    "negative draft cost": kept_text(draft=[[1, -1.0]]),
    "string cost": kept_text(draft=[[1, "0.1"]]),
    "length past k_max + 1": kept_text(verify=[[1, 12, 0.01]]),
    "batch size 0": kept_text(verify=[[0, 1, 0.01]]),
    "duplicate cell": kept_text(verify=[[1, 1, 0.01], [1, 1, 0.02]]),
    "cells not lists": kept_text(verify={"1": 0.01}),
    "acceptance too short": kept_text(acceptance={"accepted": [1], "reached": [1], "last_round": [0],
                                                   "prior_weight": 2.0}),
    "accepted above reached": kept_text(acceptance={"accepted": [5.0] * K_MAX, "reached": [1.0] * K_MAX,
                                                    "last_round": [0] * K_MAX, "prior_weight": 2.0}),
    "negative rounds": kept_text(rounds=-3),
    "missing key": json.dumps({k: v for k, v in json.loads(kept_text()).items() if k != "draft"}),
    "extra key": kept_text(extra=1),
    "boolean k_max": kept_text(k_max=True),
}


def test_a_valid_kept_file_round_trips():
    policy = DraftPolicy.from_json(kept_text())
    assert policy.kept and policy.k_max == K_MAX
    assert DraftPolicy.from_json(policy.to_json()).to_json() == policy.to_json()


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_invalid_kept_file_is_refused_by_the_parser(case):
    with pytest.raises(PolicyFileError):
        DraftPolicy.from_json(BAD[case])


@pytest.mark.parametrize("case", ["k_max past the rings", "a list", "null", "NaN cost", "zero cost",
                                  "negative cost", "older format"])
def test_an_invalid_kept_file_is_ignored_with_one_line_naming_it_and_replaced(case, tmp_path, capsys):
    path = tmp_path / "policy" / "pair.json"
    path.parent.mkdir()
    path.write_text(BAD[case])
    policy = load_policy(path)
    assert not policy.kept and policy.k_max == K_MAX and policy.costs.verify == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and err.startswith("warning:")
    # Replaced by a valid fresh file: the next process reads it silently.
    again = load_policy(path)
    assert capsys.readouterr().err == ""
    assert again.kept and again.costs.verify == {}


class Reckless(DraftPolicy):
    """A policy that asks for more drafts than any cache ring holds."""

    def decide(self, batch_size: int, static: bool = False) -> Decision:
        return Decision(20, "k=20 from a corrupt policy")


def test_k_is_clamped_at_the_loop_whatever_the_policy_says(checkpoints):
    # The oracle's sliding window is 8: a 21-token step would overwrite keys still in the window.
    spec = _spec(checkpoints.target("dense"), None)
    for seed, length in ((1, 5), (2, 30)):
        ids = prompt(length, seed)
        expected = _plain(spec, ids, 40)
        pair = standin(spec, [ids], 40)
        pair.policy = Reckless()
        result = generate(pair, ids, max_tokens=40)
        assert result.tokens == expected
        assert max(result.stats.k_histogram) <= K_MAX


def kept_from_a_busy_period() -> tuple[DraftPolicy, DraftPolicy]:
    """A policy that timed drafting rounds 5x dearer than they are, and its kept copy."""
    busy = DraftPolicy()
    for n in range(1, K_MAX + 2):
        busy.record_verify_time(1, n, T1 * (1 + 0.05 * (n - 1)) * (1 if n == 1 else 5))
    busy.record_draft_time(1, 0.5 * T1)
    return busy, DraftPolicy.from_json(busy.to_json())


def test_a_kept_decision_not_to_draft_is_rechecked_at_once():
    # Kept costs from a busy period: a drafting round looked 5x dearer than it is.
    busy, kept = kept_from_a_busy_period()
    assert all(kept.costs.explored(1, n) for n in range(1, K_MAX + 2))  # kept cells need no exploring
    first = kept.decide(1)
    k = first.k
    assert k >= 1 and first.probe and "round 1 of" in first.reason
    assert "re-checking the kept policy" in first.reason
    # The probe measures this process. Its first timed drafting round times the drafter apart,
    # which is no measure of what a round costs (the verify pass is built while the device idles):
    # the drafter's cost only.
    kept.record(1, k, [k], 0.1 * T1 * k, 1.5 * T1)
    assert kept.costs.draft[1] == pytest.approx(0.1 * T1)
    assert kept.costs.samples(("verify", 1, k + 1)) == 0 and kept.recheck  # (kept cells rescale by the drafter)
    # The probe's next round, overlapped, gives its whole time; its cell replaces the kept one,
    # the others are rescaled.
    second = kept.decide(1)
    assert second.probe and second.k == k and "round 2 of" in second.reason and not kept.draft_timing_due(1)
    kept.record(1, k, [k], None, 0.1 * T1 * k + (1 + 0.05 * k) * T1)
    assert kept.costs.verify[1, k + 1] == pytest.approx((1 + 0.05 * k) * T1)
    assert kept.costs.verify[1, k + 2] < busy.costs.verify[1, k + 2] / 3
    # And plain rounds measure plain decoding (their mean: one sample), past the first PLAIN_SETTLE.
    for _ in range(PLAIN_SETTLE + PLAIN_WINDOW):
        kept.record(1, 0, [0], 0.0, T1)
    assert kept.decide(1).k > 1
    # Once it has drafted, a decision not to draft waits out the probe interval as usual.
    assert not kept.recheck


def test_a_recheck_probe_that_could_not_be_timed_probes_again():
    # The engine passes no times for a process's first round of a shape (it also traces the
    # compiled layers): such a probe re-checks acceptance only, so the next plain decision probes
    # again, and that one's times re-check the kept costs.
    busy = DraftPolicy()
    for n in range(1, K_MAX + 2):
        busy.record_verify_time(1, n, T1 * (1 if n == 1 else 5))
    kept = DraftPolicy.from_json(busy.to_json())
    for _ in range(PROBE_ROUNDS):  # a whole probe, none of it timed, nothing accepted
        d = kept.decide(1)
        assert d.probe and "re-checking the kept policy" in d.reason
        kept.record(1, d.k, [0], 0.0, 0.0)
    assert kept.recheck and all(kept.costs.verify[1, n] == pytest.approx(5 * T1) for n in range(2, K_MAX + 2))
    for n in (1, 2):  # the next decision probes again at once: drafts timed apart, then overlapped
        again = kept.decide(1)
        assert again.probe and f"round {n} of" in again.reason and "re-checking the kept policy" in again.reason
        k = again.k
        kept.record(1, k, [k], *((0.1 * T1 * k, 1.5 * T1) if n == 1 else (None, 0.1 * T1 * k + 1.05 * T1)))
    assert not kept.recheck and kept.costs.verify[1, k + 1] == pytest.approx(1.05 * T1)


def test_a_kept_decision_not_to_draft_is_rechecked_by_a_few_probes_early_on():
    # One round's single row is too little to turn drafting back on by: a kept policy probes every
    # PROBE_GAP_ROUNDS plain rounds until RECHECK_ROUNDS drafting rounds are timed (the first probe
    # at once), so a process after a loaded one learns within its first 64 tokens; then probes are
    # spaced by cost.
    _, kept = kept_from_a_busy_period()
    drafted = []
    for i in range(2500):
        d = kept.decide(1)
        if d.k:
            assert d.probe
            drafted.append(i)
            record_round(kept, 1, d.k, [0], 0.5 * T1, 5.25 * T1)  # nothing accepted: it stays off
        else:
            kept.record(1, 0, [0], 0.0, T1)
    starts = [i for i in drafted if i - 1 not in drafted]
    assert all(i + n in drafted for i in starts for n in range(PROBE_ROUNDS))  # whole probes
    # The first probe's first round times the drafter apart (no verify sample, see
    # test_a_kept_decision_not_to_draft_is_rechecked_at_once): two timed rounds, then a second probe.
    assert starts[:2] == [0, PROBE_ROUNDS + PROBE_GAP_ROUNDS] and RECHECK_ROUNDS <= 2 * PROBE_ROUNDS - 1
    assert starts[1] + PROBE_ROUNDS < 64 and not kept.rechecks
    assert len(starts) >= 3 and all(b - a > 100 for a, b in zip(starts[1:], starts[2:]))
    fresh = DraftPolicy()  # a new policy owes as many, but has nothing kept to probe at once for
    assert fresh.rechecks == RECHECK_ROUNDS and not fresh.recheck


def test_kept_costs_are_priors_scaled_by_what_this_process_measures():
    policy = DraftPolicy()
    for n in (1, 2, 3):
        policy.record_verify_time(1, n, float(n))
    kept = DraftPolicy.from_json(policy.to_json())
    assert kept.costs.kept == 3
    kept.record_verify_time(1, 1, 2.0)  # this machine is twice as slow now
    assert kept.costs.verify[1, 1] == 2.0
    assert kept.costs.verify[1, 2] == pytest.approx(4.0) and kept.costs.verify[1, 3] == pytest.approx(6.0)
    assert kept.costs.kept == 2


def test_the_stats_say_whether_the_policy_was_kept(checkpoints, tmp_path):
    target = checkpoints.target("dense")
    drafter = checkpoints.assistant(target)
    ids = prompt(6, 3)
    first = generate(load(target, drafter=drafter, policy_cache=tmp_path), ids, max_tokens=6)
    assert first.stats.policy_kept is False and first.stats.as_dict()["policy_kept"] is False
    again = generate(load(target, drafter=drafter, policy_cache=tmp_path), ids, max_tokens=6)
    assert again.stats.policy_kept is True
    assert generate(load(target, drafter=drafter, policy_cache=tmp_path), ids, max_tokens=6,
                    draft_tokens=2).stats.policy_kept is None
