"""Self-tests of the torch reference oracle (tests/oracle.py): the checkpoints it builds and
the reference outputs it computes, checked against transformers itself."""

import json
import shutil

import numpy as np
import pytest

import torch
from safetensors.numpy import load_file

from tests import oracle

PROMPT = [oracle.BOS_ID] + [int(x) for x in np.random.default_rng(7).integers(3, 96, 19)]  # 20 > sliding window


def _weights(path):
    return load_file(str(path / "model.safetensors"))


# --- configs and checkpoints ------------------------------------------------------------------


@pytest.mark.parametrize("geometry", oracle.GEOMETRIES)
def test_text_config_geometry(geometry):
    config = oracle.text_config_class(geometry)(**oracle.text_config(geometry))
    assert config.model_type == ("gemma4_unified_text" if geometry in oracle.UNIFIED_GEOMETRIES else "gemma4_text")
    assert config.layer_types[-1] == oracle.FULL and oracle.SLIDING in config.layer_types
    full = config.per_layer_config[config.layer_types.index(oracle.FULL)]
    sliding = config.per_layer_config[config.layer_types.index(oracle.SLIDING)]
    assert (sliding.head_dim, full.head_dim) == (8, 16)
    expected_full_kv = 1 if geometry in oracle.K_EQ_V else 2
    assert (sliding.num_key_value_heads, full.num_key_value_heads) == (2, expected_full_kv)
    assert config.vocab_size % oracle.NUM_CENTROIDS == 0
    if geometry in oracle.KV_SHARED:
        assert config.kv_sharing_modes[-2:] == ["reuse", "reuse"]
        assert {config.layer_types[i] for i in (-1, -2)} == {oracle.SLIDING, oracle.FULL}


def test_text_config_overrides_regenerate_layer_types():
    cfg = oracle.text_config("dense", num_hidden_layers=7, sliding_window=4)
    assert len(cfg["layer_types"]) == 7 and cfg["layer_types"][-1] == oracle.FULL
    assert cfg["sliding_window"] == 4
    with pytest.raises(ValueError, match="unknown geometry"):
        oracle.text_config("70b")


@pytest.mark.parametrize("geometry", oracle.GEOMETRIES)
def test_save_target_is_random_deterministic_and_loads_strictly(tmp_path, geometry):
    a = _weights(oracle.save_target(tmp_path / "a", geometry, seed=3))
    b = _weights(oracle.save_target(tmp_path / "b", geometry, seed=3))
    c = _weights(oracle.save_target(tmp_path / "c", geometry, seed=4))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert "lm_head.weight" not in a  # tied to model.embed_tokens
    # Nothing keeps its trivial init: norms, scalars and router scales are all random.
    for name, value in a.items():
        assert value.dtype == np.float32, name
        assert len(np.unique(value)) > 1 or value.size == 1, name
        assert not np.allclose(value, 1.0) and not np.allclose(value, 0.0), name
    assert any(k.endswith("layer_scalar") for k in a)
    if geometry == "26b":
        assert {"model.layers.0.router.scale", "model.layers.0.router.per_expert_scale"} <= a.keys()
        assert a["model.layers.0.experts.gate_up_proj"].shape == (4, 32, 48)
    if geometry in oracle.KV_SHARED:
        assert "model.layers.5.self_attn.k_proj.weight" not in a  # KV-shared layer
        assert a["model.layers.5.mlp.gate_proj.weight"].shape == (160, 48)  # double-wide
        assert a["model.layers.3.mlp.gate_proj.weight"].shape == (80, 48)  # only the shared ones
    if geometry == "e2b":
        assert a["model.embed_tokens_per_layer.weight"].shape == (96, 6 * 8)
    if geometry in oracle.UNIFIED_GEOMETRIES:  # a Gemma 2 style layer: no per-layer inputs, no MoE
        assert not any("per_layer" in k or "router" in k or "experts" in k for k in a)
    if geometry in oracle.K_EQ_V:
        assert "model.layers.2.self_attn.v_proj.weight" not in a  # k_eq_v on full layers
        assert a["model.layers.2.self_attn.k_proj.weight"].shape == (16, 48)
    oracle.load_model(tmp_path / "a")  # raises on missing / unexpected keys


@pytest.mark.parametrize(
    ("geometry", "model_type", "towers"),
    [
        ("e2b", "gemma4", ("vision_tower", "audio_tower", "embed_vision")),
        # The 12B is encoder-free: a patch embedder (saved as vision_embedder + embed_vision's
        # projection) and an audio projection, no towers.
        ("unified-shared", "gemma4_unified", ("vision_embedder", "embed_vision", "embed_audio")),
    ],
)
def test_multimodal_target_holds_towers_and_the_same_language_model(checkpoints, geometry, model_type, towers):
    text = checkpoints.target(geometry)
    multi = checkpoints.target(geometry, multimodal=True)
    config = json.loads((multi / "config.json").read_text())
    assert config["model_type"] == model_type and config["text_config"]["model_type"] == f"{model_type}_text"
    weights, text_weights = _weights(multi), _weights(text)
    for tower in towers:
        assert any(k.startswith(f"model.{tower}.") for k in weights), tower
    for name, value in text_weights.items():
        np.testing.assert_array_equal(weights[name.replace("model.", "model.language_model.", 1)], value)
    multi_ref, text_ref = oracle.reference_forward(multi, PROMPT), oracle.reference_forward(text, PROMPT)
    for key in ("logits", "hidden"):
        np.testing.assert_allclose(multi_ref[key], text_ref[key], atol=1e-5)


@pytest.mark.parametrize(
    ("geometry", "multimodal"),
    [("dense", False), ("e2b", True), ("31b", False), ("26b", True), ("unified", True), ("unified-shared", False)],
)
def test_published_config_loads_to_the_identical_model(checkpoints, tmp_path, geometry, multimodal):
    saved = checkpoints.target(geometry, multimodal=multimodal)
    published = tmp_path / "published"
    shutil.copytree(saved, published)
    oracle.rewrite_config_as_published(published)
    oracle.rewrite_config_as_published(published)  # idempotent
    config = json.loads((published / "config.json").read_text())
    text = config.get("text_config", config)
    assert "per_layer_config" not in text
    assert text["global_head_dim"] == 16
    assert text["num_global_key_value_heads"] == (1 if geometry in oracle.K_EQ_V else None)

    before, after = oracle.load_config(saved), oracle.load_config(published)
    layers = range(before.get_text_config().num_hidden_layers)
    for i in layers:
        for attr in ("head_dim", "num_key_value_heads"):
            assert getattr(before.get_text_config().per_layer_config[i], attr) == getattr(
                after.get_text_config().per_layer_config[i], attr
            )
    np.testing.assert_array_equal(
        oracle.reference_forward(published, PROMPT)["logits"], oracle.reference_forward(saved, PROMPT)["logits"]
    )


def test_published_assistant_config_loads_to_the_identical_model(checkpoints, tmp_path):
    target = checkpoints.target("26b")
    saved = checkpoints.assistant(target, centroids=True)
    published = tmp_path / "published"
    shutil.copytree(saved, published)
    oracle.rewrite_config_as_published(published)
    text = json.loads((published / "config.json").read_text())["text_config"]
    assert "per_layer_config" not in text and text["num_global_key_value_heads"] == 1
    reference = oracle.reference_draft(target, saved, PROMPT, 2)
    rewritten = oracle.reference_draft(target, published, PROMPT, 2)
    np.testing.assert_array_equal(reference["logits"], rewritten["logits"])


# --- reference computations -------------------------------------------------------------------


def _softcap(x, cap=30.0):
    return np.tanh(x / cap) * cap


@pytest.mark.parametrize("geometry", oracle.GEOMETRIES)
def test_reference_forward_shapes_and_post_norm_hidden(checkpoints, geometry):
    target = checkpoints.target(geometry)
    ref = oracle.reference_forward(target, PROMPT)
    n = len(PROMPT)
    assert ref["logits"].shape == (n, 96) and ref["hidden"].shape == (n, 48)
    full_kv = 1 if geometry in oracle.K_EQ_V else 2
    shapes = {kind: (k.shape, v.shape) for kind, (k, v) in ref["shared_kv"].items()}
    assert shapes == {
        oracle.SLIDING: ((2, n, 8), (2, n, 8)),
        oracle.FULL: ((full_kv, n, 16), (full_kv, n, 16)),
    }
    # hidden_states[-1] is post-norm: it is exactly the input of the tied, soft-capped lm_head.
    embed = _weights(target)["model.embed_tokens.weight"]
    np.testing.assert_allclose(_softcap(ref["hidden"] @ embed.T), ref["logits"], atol=1e-4)
    # The softcap and the logit scale are large enough for a port bug there to show.
    assert np.abs(ref["logits"] - ref["hidden"] @ embed.T).max() > 1e-2
    exact = oracle.reference_forward(target, PROMPT, dtype=torch.float64)
    assert exact["logits"].dtype == np.float64
    np.testing.assert_allclose(ref["hidden"], exact["hidden"], atol=2e-4)


@pytest.mark.parametrize("centroids", [False, True])
def test_reference_draft_shapes(checkpoints, centroids):
    target = checkpoints.target("31b")
    assistant = checkpoints.assistant(target, centroids=centroids)
    ref = oracle.reference_draft(target, assistant, PROMPT, 3)
    assert ref["first_token"] == int(oracle.reference_forward(target, PROMPT)["logits"][-1].argmax())
    assert ref["hidden"].shape == (3, 48) and ref["logits"].shape == (3, 96)
    assert ref["inner_hidden"].shape == (3, 32)
    assert ref["tokens"] == [int(t) for t in ref["logits"].argmax(-1)]
    if not centroids:
        assert "selected" not in ref
        return
    per_step = 96 // oracle.NUM_CENTROIDS * oracle.CENTROID_TOP_K
    for token, selected, logits in zip(ref["tokens"], ref["selected"], ref["logits"]):
        assert selected.shape == (per_step,) and len(set(selected.tolist())) == per_step
        assert token in selected
        rest = np.setdiff1d(np.arange(96), selected)
        np.testing.assert_array_equal(logits[rest], logits[selected].min() - 1.0)


@pytest.mark.parametrize(
    ("geometry", "centroids", "multimodal"), [("dense", False, False), ("e2b", True, False), ("26b", False, True)]
)
def test_reference_draft_is_the_first_round_of_generate(checkpoints, geometry, centroids, multimodal):
    target = checkpoints.target(geometry, multimodal=multimodal)
    assistant = checkpoints.assistant(target, centroids=centroids)
    draft = oracle.reference_draft(target, assistant, PROMPT, 4)
    assisted = oracle.reference_assisted(target, PROMPT, 6, assistant, num_assistant_tokens=4)
    assert assisted["tokens"][0] == draft["first_token"]
    assert assisted["rounds"][0]["drafted"] == draft["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("geometry", "centroids", "multimodal"),
    [("dense", False, False), ("e2b", True, False), ("31b", False, True), ("26b", True, False)],
)
def test_assisted_greedy_equals_plain_greedy(checkpoints, geometry, centroids, multimodal):
    target = checkpoints.target(geometry, multimodal=multimodal)
    assistant = checkpoints.assistant(target, centroids=centroids)
    plain = oracle.reference_greedy(target, PROMPT, 16)
    assert len(plain) == 16 and len(set(plain)) > 3  # not a degenerate repeat of one token
    assisted = oracle.reference_assisted(target, PROMPT, 16, assistant, num_assistant_tokens=3)
    assert assisted["tokens"] == plain
    assert oracle.reference_greedy(target, PROMPT, 16, assistant_path=assistant, num_assistant_tokens=3) == plain
    rounds = assisted["rounds"]
    assert rounds and all(0 <= r["accepted"] <= len(r["drafted"]) <= 3 for r in rounds)
    # Every round emits its accepted drafts plus one target token; the prefill emits one.
    assert 1 + sum(r["accepted"] + 1 for r in rounds) == 16


@pytest.mark.parametrize(
    ("geometry", "centroids"),
    [("dense", False), ("e2b", True), ("26b", False), ("unified-shared", True)],
)
def test_our_rounds_follow_transformers_round_by_round(checkpoints, geometry, centroids):
    """Fixed k = 3: the same number of rounds, each accepting as many drafts and emitting as
    many tokens as transformers' assisted generate, and the first round's drafts identical.
    (From the second round on transformers hands the drafter sliding K/V that still hold the
    rejected drafts, see `oracle.reference_assisted`, so later drafts may differ by design.)"""
    import dataclasses

    from mlx_specdec import load
    from mlx_specdec.api import Settings
    from mlx_specdec.decode import decode

    target = checkpoints.target(geometry)
    assistant = checkpoints.assistant(target, centroids=centroids)
    reference = oracle.reference_assisted(target, PROMPT, 16, assistant, num_assistant_tokens=3)

    class Recording:  # the drafter, its greedy drafts recorded call by call
        def __init__(self, inner):
            self.inner, self.drafts = inner, []
            self.sliding_window, self.masks = inner.sliding_window, inner.masks

        def __call__(self, *args):
            draft = self.inner(*args)
            self.drafts.append(draft.greedy_tokens().item())
            return draft

    spec = load(target, drafter=assistant)
    recording = Recording(spec.drafter)
    updates = list(decode(dataclasses.replace(spec, drafter=recording), [PROMPT],
                          Settings(max_tokens=16, draft_tokens=3).options()))
    rounds = updates[1:]  # the first update is the prefill's token
    assert [len(u.tokens.get(0, [])) for u in rounds] == [r["accepted"] + 1 for r in reference["rounds"]]
    assert rounds[-1].stats[0].rounds == len(reference["rounds"])
    assert rounds[-1].stats[0].accepted == sum(r["accepted"] for r in reference["rounds"])
    assert rounds[-1].stats[0].drafted == sum(len(r["drafted"]) for r in reference["rounds"]) == len(recording.drafts)
    assert recording.drafts[:3] == reference["rounds"][0]["drafted"]
    assert [t for u in updates for t in u.tokens.get(0, [])] == reference["tokens"]


def test_greedy_stops_at_eos(checkpoints):
    target = checkpoints.target("dense")
    plain = oracle.reference_greedy(target, PROMPT, 12)
    eos = plain[5]
    stop = plain.index(eos)
    assert oracle.reference_greedy(target, PROMPT, 12, eos_token_id=eos) == plain[: stop + 1]


def test_assistant_fits_target(checkpoints):
    target = checkpoints.target("e2b")
    config = oracle.load_config(checkpoints.assistant(target, centroids=True))
    text = config.get_text_config()
    assert config.backbone_hidden_size == 48 and text.hidden_size == 32
    assert text.num_kv_shared_layers == text.num_hidden_layers == 2
    assert text.layer_types == [oracle.SLIDING, oracle.FULL]
    assert (text.per_layer_config[0].head_dim, text.per_layer_config[1].head_dim) == (8, 16)
    assert text.sliding_window == 8 and config.num_centroids == oracle.NUM_CENTROIDS
    ordering = _weights(checkpoints.assistant(target, centroids=True))["masked_embedding.token_ordering"]
    assert sorted(ordering.tolist()) == list(range(96))


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_loads_in_transformers_and_mlx_lm(tmp_path):
    from transformers import AutoTokenizer

    path = oracle.save_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 96
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    ids = tok("the cat sat on the mat.").input_ids
    assert ids[0] == oracle.BOS_ID and max(ids) < 96
    assert tok.decode(ids, skip_special_tokens=True) == "the cat sat on the mat."
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"

    from mlx_lm import tokenizer_utils

    wrapper = tokenizer_utils.load(path)
    assert wrapper.eos_token_ids == {oracle.EOS_ID}
    detok = wrapper.detokenizer
    detok.reset()
    for token in wrapper.encode("hello world.", add_special_tokens=False):
        detok.add_token(token)
    detok.finalize()
    assert detok.text == "hello world."
