"""draft_tokens="auto" in the real loop: exact whatever it picks, measured by real rounds only
(no side passes) and remembered across requests, and off when nothing is accepted.
(The decision itself is unit-tested with synthetic costs in test_policy.py.)"""

from mlx_specdec import generate, generate_batch, load
from mlx_specdec.loading import SpecModel
from mlx_specdec.policy import K_MAX
from tests.helpers import prompt


class _Counting:
    """The target, counting its passes."""

    def __init__(self, inner):
        self.inner, self.passes = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, tokens, step, cache):
        self.passes += 1
        return self.inner(tokens, step, cache)


def test_auto_is_exact_and_every_target_pass_is_a_prefill_or_a_round(checkpoints):
    target = checkpoints.target("e2b")
    spec = load(target, drafter=checkpoints.assistant(target, centroids=True))
    counting = _Counting(spec.target)
    counted = SpecModel(**{**vars(spec), "target": counting})
    ids = prompt(20, 4)
    auto = generate(counted, ids, max_tokens=30)
    assert auto.tokens == generate(spec, ids, max_tokens=30, draft_tokens=0).tokens
    assert sum(auto.stats.k_histogram.values()) == auto.stats.rounds
    # Nothing is timed on the side: two prefill passes (the prompt, then its last token) and one
    # verify pass per round. The first round times plain decoding.
    assert counting.passes == 2 + auto.stats.rounds and auto.stats.k_histogram.get(0, 0) >= 1
    # A second request starts from what the first measured.
    timed = dict(spec.policy.costs.verify)
    again = generate(counted, ids, max_tokens=30)
    assert again.tokens == auto.tokens and set(timed) <= set(spec.policy.costs.verify)
    # A new batch size is measured by its own rounds, exactly.
    prompts = [prompt(n, n) for n in (3, 11, 7)]
    results = generate_batch(spec, prompts, max_tokens=12)
    assert [r.tokens for r in results] == [generate(spec, p, max_tokens=12, draft_tokens=0).tokens for p in prompts]
    assert 1 in spec.policy.costs.lengths(3)


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
    # Their rounds still teach the policy their costs (only the lengths they verified).
    assert spec.policy.costs.explored(1, 4) and not spec.policy.costs.explored(1, K_MAX + 1)
    assert spec.policy.rounds == off.stats.rounds + fixed.stats.rounds


def test_what_the_policy_learned_is_kept_per_model_and_machine(checkpoints, tmp_path, monkeypatch):
    target = checkpoints.target("dense")
    drafter = checkpoints.assistant(target)
    spec = load(target, drafter=drafter, policy_cache=tmp_path)
    assert spec.policy.costs.verify == {}
    generate(spec, prompt(6, 1), max_tokens=12)
    kept = list((tmp_path / "policy").glob("*.json"))
    assert kept == [spec.policy_file]
    # A new process (here: a new load) starts from what the last one measured.
    again = load(target, drafter=drafter, policy_cache=tmp_path)
    assert again.policy.costs.verify == spec.policy.costs.verify != {}
    assert again.policy.acceptance == spec.policy.acceptance
    # Another model (the same weights cast otherwise) measures its own.
    assert load(target, drafter=drafter, dtype="float16", policy_cache=tmp_path).policy.costs.verify == {}
    # A torn file is measured again, not an error.
    spec.policy_file.write_text('{"format": 1, "k_max"')
    assert load(target, drafter=drafter, policy_cache=tmp_path).policy.costs.verify == {}
    # Off: nothing is read or written; by default the folder comes from $MLX_SPECDEC_CACHE.
    assert load(target, drafter=drafter, policy_cache=False).policy_file is None
    monkeypatch.setenv("MLX_SPECDEC_CACHE", str(tmp_path / "env"))
    assert load(target, drafter=drafter).policy_file.parent == tmp_path / "env" / "policy"
    monkeypatch.setenv("MLX_SPECDEC_CACHE", "off")
    assert load(target, drafter=drafter).policy_file is None
