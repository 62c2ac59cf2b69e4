"""Acceptance per round against transformers' assisted generation, on tiny pairs whose
drafter was trained (distilled against its target), so that there is acceptance to compare:
with the same drafter, our loop must accept at least as much per round as transformers."""

import pytest

from mlx_specdec import generate, load
from mlx_specdec.commands import distill as D
from mlx_specdec.loading import SpecModel
from tests import oracle
from tests.helpers import prompt

WINDOW = 8  # the oracle's sliding window
K = 4
NEW_TOKENS = 24
SETTINGS = D.Settings(steps=50, lr=1e-2, batch_size=8, seq_len=32, draft_steps=K, warmup=5, eval_every=60,
                      checkpoint_every=60, eval_sequences=2, eval_prompts=2, eval_prompt_len=10, eval_new_tokens=8)


@pytest.fixture(scope="module", params=["dense", "unified-shared"])
def trained(checkpoints, tmp_path_factory, request):
    """A tiny target and a one-layer drafter distilled against it on the target's own greedy
    continuations of random prompts (the text the loop will see)."""
    target = checkpoints.target(request.param)
    spec = load(target, drafter=False, policy_cache=False)
    docs = [p + generate(spec, p, max_tokens=40, draft_tokens=0).tokens for p in (prompt(8, s) for s in range(40))]
    data = D.Data.from_documents(docs, oracle.EOS_ID, SETTINGS)
    # As wide as the target: its head starts as the target's own (tied) output head.
    drafter, config = D.start_drafter(spec, None, hidden_size=48, layers=1, seed=0)
    out = tmp_path_factory.mktemp("trained") / "drafter"
    list(D.distill(spec, drafter, config, data, SETTINGS, out, save_dtype="float32", evaluate_before=False))
    return target, out


@pytest.mark.slow
def test_acceptance_per_round_is_at_least_transformers(trained):
    target, drafter = trained
    spec = load(target, drafter=drafter, policy_cache=False)
    # No EOS, as in the reference: both run every prompt to NEW_TOKENS.
    spec = SpecModel(target=spec.target, drafter=spec.drafter, tokenizer=None)
    ours, theirs = [0, 0], [0, 0]  # accepted, rounds
    for seed in range(6):
        ids = prompt(2 * WINDOW + 3, 100 + seed)
        result = generate(spec, ids, max_tokens=NEW_TOKENS, draft_tokens=K)
        reference = oracle.reference_assisted(target, ids, NEW_TOKENS, drafter, num_assistant_tokens=K)
        assert result.tokens == reference["tokens"]
        ours[0] += result.stats.accepted
        ours[1] += result.stats.rounds
        theirs[0] += sum(r["accepted"] for r in reference["rounds"])
        theirs[1] += len(reference["rounds"])
    print(f"accepted per round: ours {ours[0] / ours[1]:.3f}, transformers {theirs[0] / theirs[1]:.3f}")
    # The same drafter untrained accepted 0.02 (dense) and 0.01 (unified-shared) per round.
    assert theirs[0] / theirs[1] > 0.25, "the drafter is not trained enough for the comparison to mean anything"
    assert ours[0] / ours[1] >= theirs[0] / theirs[1]
