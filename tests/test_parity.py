"""Our MLX port against transformers on tiny random checkpoints, fp32."""

import numpy as np
import pytest

from mlx_specdec import load
from tests import oracle
from tests.helpers import first_drafts, forward_in_steps, prompt

TOL = 1e-4
WINDOW = 8  # the oracle's sliding window


@pytest.mark.parametrize("geometry", oracle.GEOMETRIES)
@pytest.mark.parametrize("layout", ["text", "multimodal", "published", "published-multimodal"])
def test_target_logits_and_hidden_match_transformers(checkpoints, geometry, layout):
    path = checkpoints.target(geometry, multimodal="multimodal" in layout, published="published" in layout)
    spec = load(path, drafter=False)
    ids = prompt(4 * WINDOW + 3, seed=1)
    ref = oracle.reference_forward(path, ids)
    # One prefill, then the tail in verify-sized steps: exercises the ring after it wrapped.
    for steps in ([len(ids)], [5, 9, 1, 9, 3, 8]):
        logits, hidden = forward_in_steps(spec.target, ids, steps)
        np.testing.assert_allclose(logits, ref["logits"], atol=TOL, rtol=0)
        # The hidden state is large (the oracle's final norm scales it 3-5x) and
        # the norms of small vectors amplify fp32 summation-order noise, so it is
        # held to 1e-3; the logits it produces are held to 1e-4 above.
        np.testing.assert_allclose(hidden, ref["hidden"], atol=1e-3, rtol=0)


@pytest.mark.parametrize("geometry", oracle.GEOMETRIES)
@pytest.mark.parametrize("centroids", [False, True])
# The published style: both config.json files as Google writes them, the target multimodal.
@pytest.mark.parametrize(("length", "published"), [(5, False), (3 * WINDOW + 1, False), (3 * WINDOW + 1, True)])
def test_drafter_first_steps_match_transformers(checkpoints, geometry, centroids, length, published):
    target = checkpoints.target(geometry, multimodal=published, published=published)
    drafter = checkpoints.assistant(target, centroids=centroids, published=published)
    assert_first_drafts_match(load(target, drafter=drafter), target, drafter, prompt(length, seed=length), centroids)


def assert_first_drafts_match(spec, target, drafter, ids, centroids):
    """The drafter's first 3 steps after ``ids``: tokens, hidden states and logits as transformers'."""
    ref = oracle.reference_draft(target, drafter, ids, steps=3)
    drafts = first_drafts(spec, ids, 3)
    assert [int(d.greedy_tokens().item()) for d in drafts] == ref["tokens"]
    for i, d in enumerate(drafts):
        np.testing.assert_allclose(np.array(d.hidden[0, 0]), ref["hidden"][i], atol=TOL, rtol=0)
        logits = np.array(d.logits[0])
        if centroids:
            # Only the selected tokens are scored: the same set, the same values.
            selected = np.array(d.candidates[0])
            assert sorted(selected.tolist()) == sorted(ref["selected"][i].tolist())
            assert len(selected) < spec.target.config.vocab_size
            np.testing.assert_allclose(logits, ref["logits"][i][selected], atol=TOL, rtol=0)
        else:
            np.testing.assert_allclose(logits, ref["logits"][i], atol=TOL, rtol=0)


# The two unified geometries above take k=v and KV sharing one at a time, and double-wide MLPs
# only together with KV sharing. These variants cover the other combinations: k=v with KV-shared
# (double-wide) layers, and KV-shared layers whose MLP is not widened.
UNIFIED_VARIANTS = {
    "k=v+kv-shared+double-wide": ("unified", {"num_kv_shared_layers": 2, "use_double_wide_mlp": True}),
    "kv-shared-single-wide": ("unified-shared", {"use_double_wide_mlp": False}),
}


@pytest.mark.parametrize("variant", list(UNIFIED_VARIANTS))
@pytest.mark.parametrize("layout", ["text", "published-multimodal"])
def test_unified_variants_match_transformers(checkpoints, variant, layout):
    geometry, overrides = UNIFIED_VARIANTS[variant]
    published = layout == "published-multimodal"
    target = checkpoints.target(geometry, multimodal=published, published=published, **overrides)
    spec = load(target, drafter=False)
    shared = spec.target.config.num_kv_shared_layers
    widths = [layer.mlp.gate_proj.weight.shape[0] for layer in spec.target.model.layers]
    # The variant is what it says: shared layers, and their MLP widened only when asked.
    assert shared == 2 and spec.target.config.attention_k_eq_v == (geometry == "unified")
    assert widths[-1] == (2 if overrides["use_double_wide_mlp"] else 1) * widths[0]
    ids = prompt(4 * WINDOW + 3, seed=2)
    ref = oracle.reference_forward(target, ids)
    for steps in ([len(ids)], [5, 9, 1, 9, 3, 8]):
        logits, _ = forward_in_steps(spec.target, ids, steps)
        np.testing.assert_allclose(logits, ref["logits"], atol=TOL, rtol=0)
    for centroids in (False, True):
        drafter = checkpoints.assistant(target, centroids=centroids, published=published)
        assert_first_drafts_match(load(target, drafter=drafter), target, drafter, prompt(3 * WINDOW + 1, seed=5),
                                  centroids)
