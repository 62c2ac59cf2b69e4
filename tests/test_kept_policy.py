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
    PLAIN_WINDOW,
    PROBE_GAP_ROUNDS,
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

    def decide(self, batch_size: int) -> Decision:
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
    assert first.k == 1 and first.probe and "re-checking the kept policy" in first.reason
    # The probe measures this process. Its first timed drafting round times the drafter apart,
    # which is no measure of what a round costs (the verify pass is built while the device idles):
    # the drafter's cost only, so the next plain decision probes again.
    kept.record(1, 1, [1], 0.1 * T1, 1.5 * T1)
    assert kept.costs.draft[1] == pytest.approx(0.1 * T1)
    assert kept.costs.samples(("verify", 1, 2)) == 0 and kept.recheck  # (kept cells rescale by the drafter)
    # The next, overlapped, gives its whole time; its cells replace the kept ones, the others are rescaled.
    assert kept.decide(1).probe and not kept.draft_timing_due(1)
    kept.record(1, 1, [1], None, 0.1 * T1 + 1.05 * T1)
    assert kept.costs.verify[1, 2] == pytest.approx(1.05 * T1)
    assert kept.costs.verify[1, 3] < busy.costs.verify[1, 3] / 3
    for _ in range(PLAIN_WINDOW):  # and plain rounds measure plain decoding (their mean: one sample)
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
    assert kept.decide(1).probe
    kept.record(1, 1, [1], 0.0, 0.0)
    assert kept.recheck and kept.costs.verify[1, 2] == pytest.approx(5 * T1)
    for t_draft, t_verify in ((0.1 * T1, 1.5 * T1), (None, 0.1 * T1 + 1.05 * T1)):  # apart, then overlapped
        again = kept.decide(1)
        assert again.probe and "re-checking the kept policy" in again.reason
        kept.record(1, 1, [1], t_draft, t_verify)
    assert not kept.recheck and kept.costs.verify[1, 2] == pytest.approx(1.05 * T1)


def test_a_kept_decision_not_to_draft_is_rechecked_by_a_few_probes_early_on():
    # One probe's single row is too little to turn drafting back on by: a kept policy probes every
    # PROBE_GAP_ROUNDS plain rounds until RECHECK_ROUNDS probes are timed (the first at once), so a
    # process after a loaded one learns within its first 64 tokens; then probes are spaced by cost.
    _, kept = kept_from_a_busy_period()
    probes = []
    for i in range(400):
        d = kept.decide(1)
        if d.k:
            probes.append(i)
            record_round(kept, 1, d.k, [0], 0.5 * T1, 5.25 * T1)  # nothing accepted: it stays off
        else:
            kept.record(1, 0, [0], 0.0, T1)
    # The first probe times the drafter apart, so the second follows at once (see
    # test_a_kept_decision_not_to_draft_is_rechecked_at_once).
    rechecks = probes[:RECHECK_ROUNDS + 1]
    assert rechecks == [0] + [1 + i * (PROBE_GAP_ROUNDS + 1) for i in range(RECHECK_ROUNDS)]
    assert rechecks[-1] < 64 and not kept.rechecks
    assert all(b - a > 100 for a, b in zip(probes[RECHECK_ROUNDS:], probes[RECHECK_ROUNDS + 1:]))
    assert DraftPolicy().rechecks == 0  # a fresh policy has nothing kept to re-check


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
