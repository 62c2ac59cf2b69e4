"""draft_tokens="auto" in the real loop: exact whatever it picks, calibrated once
per batch size and remembered across requests, and off when nothing is accepted.
(The decision itself is unit-tested with synthetic costs in test_policy.py.)"""

from mlx_specdec import generate, generate_batch, load
from mlx_specdec.policy import calibration_lengths, K_MAX
from tests.helpers import prompt


def test_auto_is_exact_and_calibrates_each_batch_size_once(checkpoints):
    target = checkpoints.target("e2b")
    spec = load(target, drafter=checkpoints.assistant(target, centroids=True))
    ids = prompt(20, 4)
    assert spec.policy.needs_calibration(1) == calibration_lengths(K_MAX)
    auto = generate(spec, ids, max_tokens=30)
    assert auto.tokens == generate(spec, ids, max_tokens=30, draft_tokens=0).tokens
    assert spec.policy.needs_calibration(1) == []
    assert sum(auto.stats.k_histogram.values()) == auto.stats.rounds
    # A second request reuses what the first measured: nothing left to calibrate.
    timed = dict(spec.policy.costs.verify)
    generate(spec, ids, max_tokens=5)
    assert set(spec.policy.costs.verify) == set(timed)
    # A new batch size is calibrated on its own.
    prompts = [prompt(n, n) for n in (3, 11, 7)]
    results = generate_batch(spec, prompts, max_tokens=12)
    assert [r.tokens for r in results] == [generate(spec, p, max_tokens=12, draft_tokens=0).tokens for p in prompts]
    assert spec.policy.needs_calibration(3) == []


def test_auto_turns_drafting_off_when_nothing_is_accepted(checkpoints):
    target = checkpoints.target("dense", seed=9)
    spec = load(target, drafter=checkpoints.assistant(target, seed=9))
    ids = prompt(8, 2)
    result = generate(spec, ids, max_tokens=200)
    s = result.stats
    assert s.accepted <= 0.05 * max(s.drafted, 1), "a random drafter should almost never agree"
    drafting_rounds = s.rounds - s.k_histogram.get(0, 0)
    # A few early rounds try the prior; after that only sparse probes (<= 1 per 16 plain rounds).
    assert drafting_rounds <= 8 + s.rounds / 16
    assert s.off_reason is not None and "plain" in s.off_reason


def test_fixed_and_off_overrides_bypass_the_policy(checkpoints):
    target = checkpoints.target("dense")
    spec = load(target, drafter=checkpoints.assistant(target))
    ids = prompt(6, 1)
    off = generate(spec, ids, max_tokens=10, draft_tokens=0)
    assert set(off.stats.k_histogram) == {0} and off.stats.drafted == 0
    assert off.stats.off_reason == "k=0 fixed by the request (drafting off)"
    fixed = generate(spec, ids, max_tokens=25, draft_tokens=3)
    assert max(fixed.stats.k_histogram) == 3
    # Their rounds still teach the policy their costs, but nothing was calibrated.
    assert {5, 9} <= set(spec.policy.needs_calibration(1))
    assert spec.policy.rounds == off.stats.rounds + fixed.stats.rounds


def test_a_batch_that_shrinks_is_not_recalibrated_mid_request(checkpoints, monkeypatch):
    from mlx_specdec import decode

    target = checkpoints.target("dense")
    spec = load(target, drafter=checkpoints.assistant(target))
    prompts = [prompt(n, n) for n in (5, 9, 13)]
    plain = [r.tokens for r in generate_batch(spec, prompts, max_tokens=12, draft_tokens=0)]
    # Row 0 stops early at a token the other rows never produce, so the batch shrinks to 2.
    stop = next(t for t in plain[0][1:8] if all(t not in other for other in plain[1:]))
    spec.eos_token_ids = frozenset({stop})
    timed = []
    real = decode._calibrate
    monkeypatch.setattr(decode, "_calibrate", lambda s, lengths, rows: (timed.append(len(rows.pos)),
                                                                       real(s, lengths, rows)))
    for _ in range(2):  # the second request starts at a batch size already calibrated
        results = generate_batch(spec, prompts, max_tokens=12)
        assert results[0].finish_reason == "stop" and results[0].tokens == plain[0][: plain[0].index(stop)]
        assert [r.tokens for r in results[1:]] == plain[1:]
    # B = 3 was calibrated in the first request's first round; B = 2 is estimated from it and
    # refined by its own rounds, never timed in the middle of a request.
    assert timed == [3]


def test_what_the_policy_learned_is_kept_per_model_and_machine(checkpoints, tmp_path, monkeypatch):
    target = checkpoints.target("dense")
    drafter = checkpoints.assistant(target)
    fresh = calibration_lengths(K_MAX)
    spec = load(target, drafter=drafter, policy_cache=tmp_path)
    assert spec.policy.needs_calibration(1) == fresh
    generate(spec, prompt(6, 1), max_tokens=12)
    kept = list((tmp_path / "policy").glob("*.json"))
    assert kept == [spec.policy_file]
    # A new process (here: a new load) starts from what the last one measured.
    again = load(target, drafter=drafter, policy_cache=tmp_path)
    assert again.policy.needs_calibration(1) == []
    assert again.policy.costs.verify == spec.policy.costs.verify
    assert again.policy.acceptance == spec.policy.acceptance
    # Another model (the same weights cast otherwise) measures its own.
    assert load(target, drafter=drafter, dtype="float16", policy_cache=tmp_path).policy.needs_calibration(1) == fresh
    # A torn file is measured again, not an error.
    spec.policy_file.write_text('{"format": 1, "k_max"')
    assert load(target, drafter=drafter, policy_cache=tmp_path).policy.needs_calibration(1) == fresh
    # Off: nothing is read or written; by default the folder comes from $MLX_SPECDEC_CACHE.
    assert load(target, drafter=drafter, policy_cache=False).policy_file is None
    monkeypatch.setenv("MLX_SPECDEC_CACHE", str(tmp_path / "env"))
    assert load(target, drafter=drafter).policy_file.parent == tmp_path / "env" / "policy"
    monkeypatch.setenv("MLX_SPECDEC_CACHE", "off")
    assert load(target, drafter=drafter).policy_file is None
