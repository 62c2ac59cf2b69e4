"""Loading layouts, the one shared embedding, and clear errors for bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_specdec import (
    ConfigError,
    DrafterMismatchError,
    InputError,
    LoadError,
    generate,
    generate_batch,
    load,
)
from mlx_specdec.cache import Step
from tests.helpers import forward_in_steps, prompt


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _arrays(module):
    return {id(a): a for _, a in tree_flatten(module.parameters())}


@pytest.mark.parametrize("geometry", ["e2b", "unified-shared"])
def test_drafter_holds_the_targets_embedding_not_a_copy(checkpoints, geometry):
    target = checkpoints.target(geometry)
    spec = load(target, drafter=checkpoints.assistant(target))
    table = spec.target.model.embed_tokens.weight
    assert spec.drafter.input_embedding.weight is table
    # Nothing the drafter owns is a table of the target's shape (V x target width).
    drafter_arrays = _arrays(spec.drafter)
    assert all(a.shape != table.shape for a in drafter_arrays.values())
    # No array is held by both models.
    assert not set(_arrays(spec.target)) & set(drafter_arrays)
    # The drafter reads through the target's embedding: changing the table changes its input
    # (a copy would keep the old one).
    tokens = mx.array([5])
    before = spec.drafter.embed(tokens)
    assert mx.allclose(before, spec.target.embed(tokens[None])[0])
    spec.target.model.embed_tokens.weight = table + 1.0
    after = spec.drafter.embed(tokens)
    assert not mx.allclose(after, before) and mx.allclose(after, spec.target.embed(tokens[None])[0])


@pytest.mark.parametrize("geometry", ["e2b", "unified-shared"])
def test_loading_the_drafter_adds_its_own_weights_and_no_second_table(checkpoints, geometry):
    import gc

    def active():
        gc.collect()
        mx.clear_cache()
        return mx.get_active_memory()

    target = checkpoints.target(geometry)
    drafter = checkpoints.assistant(target)
    base = active()
    alone = load(target, drafter=False, policy_cache=False)
    target_only = active() - base
    del alone
    base = active()
    spec = load(target, drafter=drafter, policy_cache=False)
    growth = active() - base - target_only
    own = sum(a.nbytes for a in _arrays(spec.drafter).values())
    table = spec.target.model.embed_tokens.weight.nbytes
    # Measured memory, not bookkeeping: the drafter costs its own arrays and not a table more.
    assert own <= growth < own + table // 2


@pytest.mark.parametrize(
    "geometry, towers",
    [("dense", ("vision_tower", "audio_tower")), ("unified", ("vision_embedder", "embed_vision", "embed_audio"))],
)
def test_multimodal_checkpoint_loads_text_weights_only(checkpoints, geometry, towers):
    path = checkpoints.target(geometry, multimodal=True)
    keys = set(mx.load(str(path / "model.safetensors")))
    assert all(any(k.startswith(f"model.{t}.") for k in keys) for t in towers)
    spec = load(path, drafter=False)
    names = {k for k, _ in tree_flatten(spec.target.parameters())}
    assert not any("vision" in k or "audio" in k for k in names)


def test_published_config_style_loads_the_same_model(checkpoints):
    a = load(checkpoints.target("31b"), drafter=False)
    b = load(checkpoints.target("31b", published=True), drafter=False)
    assert a.target.config.head_dims == b.target.config.head_dims
    assert a.target.config.kv_heads == b.target.config.kv_heads
    ids = prompt(20)
    np.testing.assert_array_equal(forward_in_steps(a.target, ids, [20])[0], forward_in_steps(b.target, ids, [20])[0])


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_mlx_lm_converted_folder_matches_mlx_lm(checkpoints, tmp_path, bits):
    import mlx_lm as lm

    # mlx-lm reads the published config style; width 64 so 4/8-bit groups of 32 fit.
    src = checkpoints.target("26b", published=True, hidden_size=64)
    out = tmp_path / "mlx"
    lm.convert(str(src), str(out), quantize=bits is not None, q_group_size=32, q_bits=bits or 4)
    weights = mx.load(str(out / "model.safetensors"))
    assert (bits is not None) == any(k.endswith(".scales") for k in weights)
    model, _ = lm.load(str(out))
    ids = prompt(30)
    expected = np.array(model(mx.array([ids]))[0])
    spec = load(out, drafter=False)
    np.testing.assert_allclose(forward_in_steps(spec.target, ids, [30])[0], expected, atol=1e-4, rtol=0)
    assert generate(spec, ids, max_tokens=5, draft_tokens=0).tokens


def test_checkpoint_without_tokenizer_takes_token_ids_only(checkpoints, tmp_path):
    path = _copy(checkpoints.target("dense"), tmp_path / "bare")
    for f in path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    spec = load(path, drafter=False)
    assert spec.tokenizer is None
    result = generate(spec, prompt(6), max_tokens=4, draft_tokens=0)
    assert len(result.tokens) <= 4 and result.text is None
    with pytest.raises(InputError, match="no tokenizer"):
        generate(spec, "hello there", max_tokens=4)


def test_text_prompt_with_tokenizer(checkpoints):
    target = checkpoints.target("dense")
    spec = load(target, drafter=checkpoints.assistant(target))
    result = generate(spec, "the cat sat on the mat", max_tokens=6)
    assert isinstance(result.text, str)
    assert result.tokens == generate(spec, spec.tokenizer.encode("the cat sat on the mat"), max_tokens=6).tokens


def test_hub_target_finds_its_assistant_repo(checkpoints, monkeypatch):
    """load("google/gemma-4-12b-it") fetches google/gemma-4-12b-it-assistant, as for the others
    (the hub client replaced by a table of local folders: no network)."""
    import huggingface_hub

    target = checkpoints.target("unified", multimodal=True, published=True)
    drafter = checkpoints.assistant(target, centroids=True, published=True)
    hub = {"google/gemma-4-12b-it": target, "google/gemma-4-12b-it-assistant": drafter,
           "google/gemma-4-E2B-it": checkpoints.target("e2b")}
    fetched = []

    class Response:  # what the hub's errors read of an HTTP response
        headers: dict = {}
        request = None

    def snapshot_download(repo_id, **kwargs):
        fetched.append(repo_id)
        if repo_id not in hub:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 no repo {repo_id}", response=Response())
        return str(hub[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    spec = load("google/gemma-4-12b-it")
    assert fetched == ["google/gemma-4-12b-it", "google/gemma-4-12b-it-assistant"]
    assert spec.drafter is not None and spec.drafter_name == str(drafter)
    assert spec.drafter.config.use_ordered_embeddings and spec.target.config.model_type == "gemma4_unified_text"
    # A target without a published assistant decodes plainly.
    fetched.clear()
    assert load("google/gemma-4-E2B-it").drafter is None
    assert fetched == ["google/gemma-4-E2B-it", "google/gemma-4-E2B-it-assistant"]


def test_drafter_found_beside_the_target(checkpoints, tmp_path):
    target = _copy(checkpoints.target("dense"), tmp_path / "tiny")
    _copy(checkpoints.assistant(checkpoints.target("dense")), tmp_path / "tiny-assistant")
    assert load(target).drafter is not None
    assert load(target, drafter=False).drafter is None


# ---- bad input --------------------------------------------------------------------------


def test_unknown_model_type(checkpoints, tmp_path):
    path = _copy(checkpoints.target("dense"), tmp_path / "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        load(path)


def test_drafter_given_as_target(checkpoints):
    with pytest.raises(ConfigError, match="drafter, not a target"):
        load(checkpoints.assistant(checkpoints.target("dense")))


def test_missing_weights(checkpoints, tmp_path):
    path = _copy(checkpoints.target("dense"), tmp_path / "noweights")
    (path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no \\*.safetensors"):
        load(path)


def test_weights_that_do_not_fit_the_config(checkpoints, tmp_path):
    path = _copy(checkpoints.target("dense"), tmp_path / "wrong")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    cfg["layer_types"] = cfg["layer_types"] + ["full_attention"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="do not fit the config"):
        load(path, drafter=False)


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="neither a local folder nor a hub repo id"):
        load(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(LoadError, match="could not fetch model 'nobody/nothing'"):
        load("nobody/nothing")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 64}, "target hidden size"),
        ({"vocab_size": 80}, "vocab is 80"),
    ],
)
def test_drafter_for_another_target_is_refused(checkpoints, change, message):
    other = checkpoints.target("dense", seed=3, **change)
    with pytest.raises(DrafterMismatchError, match=message):
        load(checkpoints.target("dense"), drafter=checkpoints.assistant(other))


def test_drafter_with_other_head_dim_is_refused(checkpoints):
    other = checkpoints.target("dense", seed=4, head_dim=16)
    with pytest.raises(DrafterMismatchError, match="head_dim"):
        load(checkpoints.target("dense"), drafter=checkpoints.assistant(other))


def test_only_a_missing_hub_repo_means_no_drafter(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from mlx_specdec.loading import locate_drafter

    class Response:  # what the hub's errors read of an HTTP response
        headers: dict = {}
        request = None

    def hub(error):
        def snapshot_download(name, allow_patterns=None):
            raise error
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    hub(RepositoryNotFoundError("404 no such repo", response=Response()))
    assert locate_drafter("owner/model", tmp_path, None) is None  # plain decoding
    for failure in (ConnectionError("network is unreachable"), GatedRepoError("401 gated", response=Response())):
        hub(failure)
        with pytest.raises(LoadError, match="could not fetch drafter 'owner/model-assistant'"):
            locate_drafter("owner/model", tmp_path, None)
    with pytest.raises(LoadError, match="is not on the hub"):  # asked for by name: an error
        hub(RepositoryNotFoundError("404 no such repo", response=Response()))
        locate_drafter("owner/model", tmp_path, "owner/other-assistant")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": -3}, "max_tokens must be an integer >= 1"),
        ({"draft_tokens": 99}, "draft_tokens must be 'auto' or an integer"),
        ({"draft_tokens": "many"}, "draft_tokens must be 'auto' or an integer"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
    ],
)
def test_bad_options(checkpoints, kwargs, message):
    spec = load(checkpoints.target("dense"), drafter=False)
    with pytest.raises(InputError, match=message):
        generate(spec, prompt(4), **kwargs)


@pytest.mark.parametrize("bad", [[], "", [5, 1000], [-1]])
def test_bad_prompts(checkpoints, bad):
    spec = load(checkpoints.target("dense"), drafter=False)
    with pytest.raises(InputError):
        generate(spec, bad, max_tokens=3)
    with pytest.raises(InputError):
        generate_batch(spec, [prompt(3), bad], max_tokens=3)


def test_cache_refuses_a_step_of_another_batch_size(checkpoints):
    spec = load(checkpoints.target("dense"), drafter=False)
    cache = spec.target.make_cache(2)
    with pytest.raises(ValueError, match="step has 1 rows but the cache holds 2"):
        spec.target(mx.array([[5]]), Step((0,), 1), cache)


@pytest.mark.parametrize("model_type", ["gemma4_text", "gemma4_unified_text"])
def test_config_defaults_are_transformers_defaults(model_type):
    """What a config.json leaves out resolves as transformers resolves it, per family: the
    unified text config has its own window and bidirectional mode and no PLE/MoE at all."""
    from transformers import AutoConfig, Gemma4UnifiedAssistantConfig

    from mlx_specdec.models import assistant, gemma4

    cfg = {"model_type": model_type, "num_hidden_layers": 6, "hidden_size": 64, "num_attention_heads": 4,
           "attention_k_eq_v": True, "num_global_key_value_heads": 1}
    ours, theirs = gemma4.TextConfig.from_dict(cfg), AutoConfig.for_model(**cfg)
    assert ours.model_type == theirs.model_type == model_type
    assert ours.sliding_window == theirs.sliding_window
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.use_bidirectional_attention == theirs.use_bidirectional_attention
    assert list(ours.layer_types) == theirs.layer_types and ours.rope_parameters == theirs.rope_parameters
    assert list(ours.head_dims) == [theirs.per_layer_config[i].head_dim for i in range(6)]
    assert list(ours.kv_heads) == [theirs.per_layer_config[i].num_key_value_heads for i in range(6)]
    assert ours.hidden_size_per_layer_input == getattr(theirs, "hidden_size_per_layer_input", 0)
    assert ours.enable_moe_block == getattr(theirs, "enable_moe_block", False)
    if model_type == "gemma4_unified_text":
        assert (ours.sliding_window, ours.use_bidirectional_attention) == (1024, "vision")
        # Keys the unified decoder never reads change nothing.
        stray = gemma4.TextConfig.from_dict({**cfg, "hidden_size_per_layer_input": 256, "enable_moe_block": True})
        assert (stray.hidden_size_per_layer_input, stray.enable_moe_block) == (0, False)
        drafter = assistant.AssistantConfig.from_dict(
            {"model_type": "gemma4_unified_assistant", "text_config": {**cfg, "num_hidden_layers": 2}})
        reference = Gemma4UnifiedAssistantConfig()
        assert drafter.text.model_type == model_type
        assert (drafter.backbone_hidden_size, drafter.num_centroids, drafter.centroid_intermediate_top_k) == (
            reference.backbone_hidden_size, reference.num_centroids, reference.centroid_intermediate_top_k)
        assert (reference.backbone_hidden_size, reference.num_centroids, reference.centroid_intermediate_top_k) == (
            3840, 2048, 32)
