"""Reference oracle for the tests: tiny random Gemma 4 checkpoints and torch outputs.

Test-only helper (imported by the tests, never by `mlx_specdec`). It builds tiny random
checkpoints with `transformers` in the four published Gemma 4 geometries and two of the 12B's
unified decoder (`gemma4_unified`), saves them the way
`save_pretrained` does (optionally rewritten into the style of Google's published config.json),
and computes reference outputs with torch in fp32 on CPU:

- `reference_forward`: one full-sequence target forward (logits, post-norm hidden, shared K/V);
- `reference_draft`: the first drafting round of `SinglePositionMultiTokenCandidateGenerator`;
- `reference_greedy` / `reference_assisted`: `generate`, plain or with the assistant.

Reading order: geometry configs, checkpoint builders (with the weight randomizer), the
published-config rewrite, model loading, reference computations, tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn
from transformers import (
    GenerationConfig,
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForCausalLM,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedTextConfig,
)
from transformers.generation import utils as generation_utils
from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator
from transformers.models.gemma4 import modeling_gemma4 as m4
from transformers.models.gemma4_assistant import modeling_gemma4_assistant as ma
from transformers.models.gemma4_unified import modeling_gemma4_unified as mu
from transformers.models.gemma4_unified_assistant import modeling_gemma4_unified_assistant as mua

GEMMA4_GEOMETRIES = ("dense", "e2b", "31b", "26b")
UNIFIED_GEOMETRIES = ("unified", "unified-shared")  # the 12B's decoder (gemma4_unified)
GEOMETRIES = GEMMA4_GEOMETRIES + UNIFIED_GEOMETRIES
K_EQ_V = ("31b", "26b", "unified")  # full layers: no v_proj, 1 global KV head
KV_SHARED = ("e2b", "unified-shared")  # the last 2 layers reuse K/V, with a double-wide MLP
# Keys of Gemma4TextConfig that the unified text config does not have.
_NOT_UNIFIED = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block")

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
DEFAULT_VOCAB = 96  # divisible by NUM_CENTROIDS so the centroid head can split it evenly
NUM_CENTROIDS = 8
CENTROID_TOP_K = 2

SLIDING, FULL = "sliding_attention", "full_attention"

# Weight scales: linear weights get std WEIGHT_GAIN / sqrt(fan_in), so every matmul output is
# O(WEIGHT_GAIN); norms sit around 1 but far enough from it that a `1 + w` or a dropped norm shows.
WEIGHT_GAIN = 1.5
NORM_RANGE = (0.7, 1.3)
# The target's token embedding is small next to the layer outputs (post-norms make those O(1)):
# with a tied lm_head, a large embedding makes a random model predict its input token forever.
# Its final norm is large instead, so that logits (std ~2) reach where the 30.0 softcap bends them.
TARGET_EMBED_GAIN = 0.5
TARGET_FINAL_NORM_RANGE = (3.0, 5.0)
SCALAR_RANGE = (0.5, 1.5)  # layer_scalar, router scale, per-expert scale
PLE_EMBED_STD = 0.3

ROPE_PARAMETERS = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


# --------------------------------------------------------------------------------------------
# Geometry configs
# --------------------------------------------------------------------------------------------


def _layer_types(num_layers: int) -> list[str]:
    """Every third layer full attention, and always the last one (transformers forces it)."""
    return [FULL if (i + 1) % 3 == 0 or i == num_layers - 1 else SLIDING for i in range(num_layers)]


def text_config(
    geometry: str, *, sliding_window: int = 8, vocab_size: int = DEFAULT_VOCAB, seed: int = 0, **overrides
) -> dict:
    """Keyword arguments for a tiny text config (`text_config_class(geometry)`) of one geometry.

    geometry:
        "dense": plain Gemma 4 text model (no per-layer inputs, no KV sharing, separate V).
        "e2b":   per-layer inputs (PLE), the last 2 layers reuse K/V, double-wide MLP on them.
        "31b":   attention_k_eq_v (full layers have no v_proj) with 1 global KV head vs 2 sliding.
        "26b":   like 31b plus a MoE block (4 experts, top-2) next to the dense MLP in every layer.
        "unified": the 12B's `gemma4_unified_text` decoder (no PLE, no MoE keys) with k=v as 31b.
        "unified-shared": the unified decoder with separate V, the last 2 layers reusing K/V and
                 a double-wide MLP on them, as e2b.
    Full-attention layers use head_dim 16 (`global_head_dim`) against 8 for sliding layers, and
    proportional RoPE over a quarter of their dims. `seed` is accepted for symmetry with the
    builders; a config holds nothing random. `overrides` replace any key; if they change
    `num_hidden_layers` without `layer_types`, the layer types are regenerated.
    """
    del seed
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")
    num_layers = 6 if geometry in KV_SHARED else 5
    cfg: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": num_layers,
        "layer_types": [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL][:num_layers - 1] + [FULL],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "global_head_dim": 16,
        "rope_parameters": json.loads(json.dumps(ROPE_PARAMETERS)),
        "sliding_window": sliding_window,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "attention_k_eq_v": False,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
    }
    if geometry in KV_SHARED:
        # Layers 4, 5 (sliding, full) reuse the K/V of layers 3 (sliding) and 2 (full).
        cfg.update(num_kv_shared_layers=2, use_double_wide_mlp=True)
    if geometry == "e2b":
        cfg.update(hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab_size)
    elif geometry in ("31b", "unified"):
        cfg.update(attention_k_eq_v=True, num_global_key_value_heads=1)
    elif geometry == "26b":
        cfg.update(
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=16,
        )
    if geometry in UNIFIED_GEOMETRIES:
        cfg = {k: v for k, v in cfg.items() if k not in _NOT_UNIFIED}
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        overrides = {**overrides, "layer_types": _layer_types(overrides["num_hidden_layers"])}
    cfg.update(overrides)
    return cfg


def text_config_class(geometry: str) -> type:
    return Gemma4UnifiedTextConfig if geometry in UNIFIED_GEOMETRIES else Gemma4TextConfig


def _unified_vision_config() -> dict:
    """The 12B's encoder-free patch embedder, tiny: a checkpoint carries it as `embed_vision`."""
    return {"patch_size": 2, "pooling_kernel_size": 2, "mm_embed_dim": 16, "mm_posemb_size": 8, "output_proj_dims": 16}


def _unified_audio_config() -> dict:
    """The 12B's raw-waveform audio projection (`embed_audio`), tiny."""
    return {"audio_embed_dim": 8}


def _vision_config() -> dict:
    """A one-layer vision tower: present in the checkpoint only so that loaders learn to skip it."""
    return {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "patch_size": 4,
        "pooling_kernel_size": 2,
        "position_embedding_size": 16,
        "max_position_embeddings": 64,
    }


def _audio_config() -> dict:
    """A one-layer audio tower: present in the checkpoint only so that loaders learn to skip it."""
    return {
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "subsampling_conv_channels": [4, 4],
        "conv_kernel_size": 3,
        "output_proj_dims": 16,
    }


# --------------------------------------------------------------------------------------------
# Weight randomization
# --------------------------------------------------------------------------------------------


def _uniform(shape, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _randomize(module: nn.Module, gen: torch.Generator, *, embed_gain: float, final_norm_range=NORM_RANGE) -> None:
    """Overwrite every persistent parameter/buffer of `module` with random values.

    `embed_gain` sets the main embedding (= tied lm_head) std to embed_gain / sqrt(hidden);
    `final_norm_range` the range of the final norm (`norm`, not the layer norms).

    Raises if a tensor of an unknown kind is met, so a new parameter kind in a future
    transformers version cannot silently keep its (often trivial: ones, zeros) init.
    """
    touched: set[int] = set()

    def put(t: torch.Tensor, value: torch.Tensor) -> None:
        if id(t) in touched:  # a tied weight (lm_head) keeps the value of its first owner
            return
        with torch.no_grad():
            t.copy_(value.to(t.dtype))
        touched.add(id(t))

    for name, sub in module.named_modules():
        if isinstance(sub, (m4.Gemma4RMSNorm, mu.Gemma4UnifiedRMSNorm)):
            if sub.with_scale:
                low_high = final_norm_range if name in ("norm", "model.norm") else NORM_RANGE
                put(sub.weight, _uniform(sub.weight.shape, *low_high, gen))
        elif isinstance(sub, (m4.Gemma4TextScaledWordEmbedding, mu.Gemma4UnifiedTextScaledWordEmbedding)):
            # The main lookup is multiplied by sqrt(hidden) (embed_scale): entries have std embed_gain.
            is_ple = name.endswith("embed_tokens_per_layer")
            std = PLE_EMBED_STD if is_ple else embed_gain / sub.embedding_dim**0.5
            put(sub.weight, torch.randn(sub.weight.shape, generator=gen) * std)
        elif isinstance(sub, nn.Linear):
            put(sub.weight, torch.randn(sub.weight.shape, generator=gen) * WEIGHT_GAIN / sub.in_features**0.5)
            if sub.bias is not None:
                put(sub.bias, torch.randn(sub.bias.shape, generator=gen) * 0.1)
        elif isinstance(sub, m4.Gemma4TextExperts):
            hidden, inter = sub.hidden_dim, sub.intermediate_dim
            put(sub.gate_up_proj, torch.randn(sub.gate_up_proj.shape, generator=gen) * WEIGHT_GAIN / hidden**0.5)
            put(sub.down_proj, torch.randn(sub.down_proj.shape, generator=gen) * WEIGHT_GAIN / inter**0.5)
        elif isinstance(sub, m4.Gemma4TextRouter):
            put(sub.scale, _uniform(sub.scale.shape, *SCALAR_RANGE, gen))
            put(sub.per_expert_scale, _uniform(sub.per_expert_scale.shape, *SCALAR_RANGE, gen))
        elif isinstance(sub, (m4.Gemma4TextDecoderLayer, mu.Gemma4UnifiedTextDecoderLayer)):
            put(sub.layer_scalar, _uniform(sub.layer_scalar.shape, *SCALAR_RANGE, gen))
        elif isinstance(sub, (ma.Gemma4AssistantMaskedEmbedder, mua.Gemma4UnifiedAssistantMaskedEmbedder)):
            put(sub.token_ordering, torch.randperm(sub.vocab_size, generator=gen))

    # Every tensor that is saved must have been randomized (tied lm_head shares the embedding).
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in touched:
            raise RuntimeError(f"randomizer does not know how to set {name} {tuple(tensor.shape)}")


# --------------------------------------------------------------------------------------------
# Checkpoint builders
# --------------------------------------------------------------------------------------------


_TARGET_SCALES = {"embed_gain": TARGET_EMBED_GAIN, "final_norm_range": TARGET_FINAL_NORM_RANGE}


def save_target(path, geometry: str, *, multimodal: bool = False, seed: int = 0, **config_overrides) -> pathlib.Path:
    """Build a random target in `geometry`, fp32, eval mode, and `save_pretrained(path)`.

    Text-only: `Gemma4ForCausalLM` (model_type gemma4_text, weights under `model.*`).
    multimodal=True: `Gemma4ForConditionalGeneration` (model_type gemma4, text weights under
    `model.language_model.*`) with tiny vision and audio towers saved as real weights that a
    text loader must skip; only the language model is randomized (the towers keep their
    seeded init). The unified geometries use `Gemma4UnifiedForCausalLM` (gemma4_unified_text)
    and `Gemma4UnifiedForConditionalGeneration` (gemma4_unified, with the encoder-free
    `embed_vision` / `embed_audio` beside `model.language_model.*`). The config.json is what `save_pretrained` writes (with `per_layer_config`);
    see `rewrite_config_as_published` for the style of Google's files. Deterministic in `seed`.
    """
    path = pathlib.Path(path)
    text = text_config(geometry, **config_overrides)
    gen = torch.Generator().manual_seed(seed)
    unified = geometry in UNIFIED_GEOMETRIES
    with torch.random.fork_rng(devices=[]):  # seed the towers' init without touching the caller's RNG
        torch.manual_seed(seed)
        if multimodal and unified:
            config = Gemma4UnifiedConfig(
                text_config=text,
                vision_config=_unified_vision_config(),
                audio_config=_unified_audio_config(),
                tie_word_embeddings=True,
            )
            model = Gemma4UnifiedForConditionalGeneration(config)
            _randomize(model.model.language_model, gen, **_TARGET_SCALES)
        elif multimodal:
            config = Gemma4Config(
                text_config=text,
                vision_config=_vision_config(),
                audio_config=_audio_config(),
                tie_word_embeddings=True,
            )
            model = Gemma4ForConditionalGeneration(config)
            _randomize(model.model.language_model, gen, **_TARGET_SCALES)
        else:
            causal_lm = Gemma4UnifiedForCausalLM if unified else Gemma4ForCausalLM
            model = causal_lm(text_config_class(geometry)(**text))
            _randomize(model.model, gen, **_TARGET_SCALES)
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("expected lm_head to be tied to embed_tokens")
    model = model.to(torch.float32).eval()
    model.save_pretrained(path)
    return path


def save_assistant(
    path,
    target_path,
    *,
    centroids: bool = False,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 32,
    **overrides,
) -> pathlib.Path:
    """Build a random `Gemma4AssistantForCausalLM` that fits the target at `target_path`
    (`Gemma4UnifiedAssistantForCausalLM` for a unified target).

    Its attention reads the target's shared K/V, so head dims and KV-head counts (per layer
    type), the sliding window, RoPE and vocab are copied from the target; every layer reuses
    K/V (num_kv_shared_layers == num_hidden_layers) and the layer types cycle sliding/full.
    centroids=True: ordered-embedding head with NUM_CENTROIDS centroids, top CENTROID_TOP_K,
    token_ordering a random permutation of the vocab (vocab must divide evenly).
    `overrides` update the assistant's text config. Deterministic in `seed`.
    """
    path = pathlib.Path(path)
    target = load_config(target_path).get_text_config()
    full_kv_heads = target.per_layer_config[target.layer_types.index(FULL)].num_key_value_heads
    sliding_kv_heads = target.per_layer_config[target.layer_types.index(SLIDING)].num_key_value_heads
    text = {
        "vocab_size": target.vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "layer_types": [SLIDING if i % 2 == 0 else FULL for i in range(num_layers - 1)] + [FULL],
        "num_attention_heads": target.num_attention_heads,
        "num_key_value_heads": sliding_kv_heads,
        "head_dim": target.per_layer_config[target.layer_types.index(SLIDING)].head_dim,
        "global_head_dim": target.per_layer_config[target.layer_types.index(FULL)].head_dim,
        # The per-layer kv-head override only applies with attention_k_eq_v (see
        # Gemma4TextConfig.__post_init__); it has no weights in a fully shared model.
        "attention_k_eq_v": full_kv_heads != sliding_kv_heads or target.attention_k_eq_v,
        "num_global_key_value_heads": full_kv_heads,
        "rope_parameters": json.loads(json.dumps(target.rope_parameters)),
        "sliding_window": target.sliding_window,
        "final_logit_softcapping": target.final_logit_softcapping,
        "hidden_activation": target.hidden_activation,
        "rms_norm_eps": target.rms_norm_eps,
        "tie_word_embeddings": True,
        "max_position_embeddings": target.max_position_embeddings,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "num_kv_shared_layers": num_layers,
        "enable_moe_block": False,
        "use_double_wide_mlp": False,
    }
    text.update(overrides)
    if centroids and text["vocab_size"] % NUM_CENTROIDS:
        raise ValueError(f"vocab_size {text['vocab_size']} is not divisible by {NUM_CENTROIDS} centroids")
    unified = target.model_type == "gemma4_unified_text"
    if unified:
        text = {k: v for k, v in text.items() if k not in _NOT_UNIFIED}
    config_class = Gemma4UnifiedAssistantConfig if unified else Gemma4AssistantConfig
    config = config_class(
        text_config=(Gemma4UnifiedTextConfig if unified else Gemma4TextConfig)(**text),
        backbone_hidden_size=target.hidden_size,
        use_ordered_embeddings=centroids,
        num_centroids=NUM_CENTROIDS,
        centroid_intermediate_top_k=CENTROID_TOP_K,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (Gemma4UnifiedAssistantForCausalLM if unified else Gemma4AssistantForCausalLM)(config)
    # Offset seed: an assistant and its target built with the same seed get unrelated weights.
    _randomize(model, torch.Generator().manual_seed(seed + 1_000_003), embed_gain=WEIGHT_GAIN)
    model = model.to(torch.float32).eval()
    model.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Published-style config.json
# --------------------------------------------------------------------------------------------


def _published_text_config(text: dict) -> dict:
    """Replace `per_layer_config` by `global_head_dim` / `num_global_key_value_heads`."""
    if "per_layer_config" not in text:  # already in the published style
        return text
    text = dict(text)
    per_layer = {int(i): o for i, o in (text.pop("per_layer_config") or {}).items()}
    full_layers = [i for i, t in enumerate(text["layer_types"]) if t == FULL]
    overrides = [per_layer.get(i, {}) for i in full_layers]
    if set(per_layer) - set(full_layers) or any(o != overrides[0] for o in overrides):
        raise ValueError(f"per_layer_config is not one override shared by the full layers: {per_layer}")
    text["global_head_dim"] = overrides[0].get("head_dim", text["head_dim"])
    text["num_global_key_value_heads"] = overrides[0].get("num_key_value_heads")
    return text


def rewrite_config_as_published(path) -> pathlib.Path:
    """Rewrite `path/config.json` the way Google's published Gemma 4 files are written.

    `save_pretrained` stores the full-attention overrides as `per_layer_config`
    ({"<layer idx>": {"head_dim": .., "num_key_value_heads": ..}}); the published files carry
    `global_head_dim` and `num_global_key_value_heads` (null when the full layers keep
    `num_key_value_heads`) instead. Handles flat (gemma4_text) and nested `text_config`
    (gemma4, gemma4_assistant) files. Returns the config path.
    """
    config_path = pathlib.Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    if "text_config" in config:
        config["text_config"] = _published_text_config(config["text_config"])
    else:
        config = _published_text_config(config)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config_path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_MODEL_CLASSES = {
    "gemma4_text": Gemma4ForCausalLM,
    "gemma4": Gemma4ForConditionalGeneration,
    "gemma4_assistant": Gemma4AssistantForCausalLM,
    "gemma4_unified_text": Gemma4UnifiedForCausalLM,
    "gemma4_unified": Gemma4UnifiedForConditionalGeneration,
    "gemma4_unified_assistant": Gemma4UnifiedAssistantForCausalLM,
}


def load_config(path):
    """The transformers config saved at `path` (any model_type of `_MODEL_CLASSES`)."""
    model_type = json.loads((pathlib.Path(path) / "config.json").read_text())["model_type"]
    return _MODEL_CLASSES[model_type].config_class.from_pretrained(path)


def _stamp(path: pathlib.Path) -> tuple:
    files = sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors"))
    return tuple((p.name, p.stat().st_mtime_ns) for p in files)


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, stamp: tuple, dtype: torch.dtype) -> nn.Module:
    del stamp  # part of the cache key only: a rewritten checkpoint is reloaded
    model_type = json.loads((pathlib.Path(path) / "config.json").read_text())["model_type"]
    model, info = _MODEL_CLASSES[model_type].from_pretrained(
        path,
        dtype=dtype,
        attn_implementation="eager",
        experts_implementation="eager",  # the plain per-expert loop, not grouped_mm
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"loading {path} was not exact: {problems}")
    return model.eval()


def load_model(path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a checkpoint strictly (no missing/unexpected keys) with eager attention and experts.

    Memoized on the path, the files' mtimes and dtype; callers must not mutate the weights.
    """
    path = pathlib.Path(path).resolve()
    return _load_cached(str(path), _stamp(path), dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Reference computations
# --------------------------------------------------------------------------------------------


def _target_prefill(target: nn.Module, ids: list[int]):
    input_ids = torch.tensor([ids], dtype=torch.long)
    return target(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        use_cache=False,
        output_hidden_states=True,
        return_shared_kv_states=True,
    )


@torch.no_grad()
def reference_forward(target_path, ids: list[int], *, dtype: torch.dtype = torch.float32) -> dict:
    """One forward of the target over the whole of `ids` (no cache), as numpy arrays of `dtype`.

    dtype=torch.float64 gives the near-exact answer, to tell a port's fp32 rounding (expect
    ~1e-5 relative to the hidden state's scale) from torch's own.

    Returns {"logits": (L, V) soft-capped logits, "hidden": (L, H) `hidden_states[-1]`, which
    in this transformers version is the post-final-norm `last_hidden_state` (the input of
    lm_head), "shared_kv": {layer_type: (k, v)} each (kv_heads, L, head_dim), the K/V stored
    by the last non-shared layer of each type: K after k_norm and RoPE, V after v_norm (for
    attention_k_eq_v full layers V is the un-normed, un-roped k_proj output through v_norm).
    Sliding K/V cover all L positions here (a cacheless/prefill forward does not truncate).
    """
    out = _target_prefill(load_model(target_path, dtype), ids)
    return {
        "logits": _np(out.logits[0]),
        "hidden": _np(out.hidden_states[-1][0]),
        "shared_kv": {kind: (_np(k[0]), _np(v[0])) for kind, (k, v) in out.shared_kv_states.items()},
    }


@torch.no_grad()
def reference_draft(target_path, assistant_path, ids: list[int], steps: int) -> dict:
    """The first drafting round after prefill, as `SinglePositionMultiTokenCandidateGenerator` does it.

    The target prefills `ids`; t = argmax of the last logits. The drafter then runs `steps`
    times at position_ids = len(ids) (the position of t), each time on
    cat(target.embed_tokens(t) [scaled by sqrt(H)], last hidden), attention_mask=None (what
    generate holds for an all-ones mask) and the prefill's shared K/V; it feeds back its own
    argmax token and its returned (post-projection) last_hidden_state. Masks: full attention
    sees all len(ids) keys; sliding attention sees the last sliding_window + 1 keys
    (bidirectional window |q - kv| <= W, flipped), one more than a causal target query would.

    Returns {"first_token": t, "tokens": [d1..dk], "hidden": (steps, H_target) projected
    drafter states, "logits": (steps, V) drafter logits (for the centroid head: the scattered
    full-vocab logits, unselected entries = min(selected) - 1), "inner_hidden": (steps, H_assistant)
    the drafter's post-norm state before post_projection}, plus with centroids "selected": per
    step an int array of the top_k * (V / num_centroids) token ids the head scored, ordered by
    centroid rank then by position in token_ordering.
    """
    target = load_model(target_path)
    assistant = load_model(assistant_path)
    prefill = _target_prefill(target, ids)
    first = int(prefill.logits[0, -1].argmax())

    # Mirror get_candidates: input_ids now ends with t. generate drops an all-ones attention
    # mask, so the drafter gets attention_mask=None (its masks equal those of a ones vector).
    current_length = len(ids) + 1
    attention_mask = None
    shared_kv = {
        k: (v[0][:, :, :current_length, :], v[1][:, :, :current_length, :])
        for k, v in prefill.shared_kv_states.items()
    }
    last_hidden = prefill.hidden_states[-1][:, -1:]
    last_token = torch.tensor([[first]], dtype=torch.long)
    position_ids = torch.tensor([[current_length - 1]], dtype=torch.long)
    embed = target.get_input_embeddings()

    inner: list[torch.Tensor] = []
    hook = assistant.model.norm.register_forward_hook(lambda _m, _i, out: inner.append(out))
    tokens, hiddens, logits = [], [], []
    try:
        for _ in range(steps):
            inputs_embeds = torch.cat([embed(last_token), last_hidden], dim=-1)
            out = assistant(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                shared_kv_states=shared_kv,
                use_cache=False,
            )
            last_token = out.logits.argmax(dim=-1)
            last_hidden = out.last_hidden_state
            tokens.append(int(last_token))
            hiddens.append(_np(last_hidden[0, 0]))
            logits.append(_np(out.logits[0, 0]))
    finally:
        hook.remove()

    result = {
        "first_token": first,
        "tokens": tokens,
        "hidden": np.stack(hiddens) if hiddens else np.zeros((0, target.config.get_text_config().hidden_size)),
        "logits": np.stack(logits) if logits else np.zeros((0, assistant.vocab_size)),
        "inner_hidden": np.stack([_np(h[0, 0]) for h in inner]) if inner else np.zeros((0, assistant.hidden_size)),
    }
    if assistant.masked_embedding is not None:
        head = assistant.masked_embedding
        per_cluster = head.token_ordering.long().view(head.num_centroids, head.vocab_size_per_centroid)
        result["selected"] = [
            per_cluster[torch.topk(head.centroids(h[0, 0]), k=head.centroid_intermediate_top_k).indices]
            .reshape(-1)
            .numpy()
            for h in inner
        ]
    return result


def _generation_config(max_new_tokens: int, eos_token_id, num_assistant_tokens: int) -> GenerationConfig:
    # generate fills None fields from the checkpoint's generation_config (eos 1): an empty list
    # is what switches eos off without a warning.
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=[] if eos_token_id is None else eos_token_id,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        num_assistant_tokens=num_assistant_tokens,
        num_assistant_tokens_schedule="constant",
    )


@torch.no_grad()
def reference_assisted(
    target_path,
    ids: list[int],
    max_new_tokens: int,
    assistant_path,
    *,
    num_assistant_tokens: int = 4,
    eos_token_id: int | list[int] | None = None,
) -> dict:
    """Greedy assisted `generate` with the MTP assistant, recording every verification round.

    Returns {"tokens": new tokens, "rounds": [{"drafted": [...], "accepted": n}, ...]} with one
    round per target forward after the prefill; it emits accepted + 1 tokens. `drafted` is
    empty when the length budget leaves no room to draft (min(num_assistant_tokens,
    max_length - len - 1) <= 0); `accepted` is transformers' n_matches after its
    max-length/eos crop.
    Note: from the second round on, transformers hands the drafter sliding K/V that still
    include the rejected draft tokens of the previous verify (it crops only full-length K/V).
    """
    target = load_model(target_path)
    assistant = load_model(assistant_path)
    assistant.generation_config.num_assistant_tokens = num_assistant_tokens
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    rounds: list[dict] = []

    class Recording(SinglePositionMultiTokenCandidateGenerator):
        drafted: list[int] | None = None  # None during the prefill pass

        def get_candidates(self, input_ids, **kwargs):
            candidates, candidate_logits = super().get_candidates(input_ids, **kwargs)
            first = kwargs["is_first_iteration"]
            self.drafted = None if first else candidates[0, input_ids.shape[1] :].tolist()
            return candidates, candidate_logits

        def update_candidate_strategy(self, input_ids, scores, num_matches):
            if self.drafted is not None:
                rounds.append({"drafted": self.drafted, "accepted": int(num_matches)})

    input_ids = torch.tensor([ids], dtype=torch.long)
    with mock.patch.object(generation_utils, "SinglePositionMultiTokenCandidateGenerator", Recording):
        out = target.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=_generation_config(max_new_tokens, eos_token_id, num_assistant_tokens),
            assistant_model=assistant,
        )
    return {"tokens": out[0, len(ids) :].tolist(), "rounds": rounds}


@torch.no_grad()
def reference_greedy(
    target_path,
    ids: list[int],
    max_new_tokens: int,
    *,
    assistant_path=None,
    num_assistant_tokens: int = 4,
    eos_token_id: int | list[int] | None = None,
) -> list[int]:
    """Greedy `generate` (do_sample=False) of the target: the new tokens only.

    With `assistant_path`, transformers' assisted generation with the MTP assistant drafting
    a constant `num_assistant_tokens` per round. With eos_token_id None (default) nothing
    stops generation early, so exactly `max_new_tokens` come out.
    """
    if assistant_path is not None:
        return reference_assisted(
            target_path,
            ids,
            max_new_tokens,
            assistant_path,
            num_assistant_tokens=num_assistant_tokens,
            eos_token_id=eos_token_id,
        )["tokens"]
    target = load_model(target_path)
    input_ids = torch.tensor([ids], dtype=torch.long)
    out = target.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=_generation_config(max_new_tokens, eos_token_id, num_assistant_tokens),
    )
    return out[0, len(ids) :].tolist()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
_ALPHABET = list("\n▁abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:")
_MERGES = [
    ("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("r", "e"),
    ("o", "n"), ("a", "t"), ("e", "n"), ("n", "d"), ("▁", "a"), ("▁", "s"), ("▁", "w"),
    ("▁", "o"), ("▁", "i"), ("o", "u"), ("i", "s"), ("▁a", "nd"), ("in", "g"),
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ message['role'] }}\n{{ message['content'] }}<turn|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def save_tokenizer(path, vocab_size: int = DEFAULT_VOCAB) -> pathlib.Path:
    """Write a tiny SentencePiece-style BPE tokenizer (tokenizer.json + tokenizer_config.json).

    Special tokens <pad>/<eos>/<bos> at ids 0/1/2, <unk> 3, <|turn> 4, <turn|> 5; then
    "\\n", "▁", lowercase letters, digits, punctuation and a few merged pieces; padded with
    <unusedN> up to exactly `vocab_size` ids. Spaces become "▁" (normalizer), encoding
    prepends <bos>, and the decoder is Gemma's Replace/ByteFallback/Fuse sequence, so
    mlx_lm picks its SPM streaming detokenizer. Loadable by transformers.AutoTokenizer and
    mlx_lm.tokenizer_utils.load. Returns the directory.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    pieces = SPECIAL_TOKENS + _ALPHABET + ["".join(m) for m in _MERGES]
    if len(pieces) > vocab_size:
        raise ValueError(f"tokenizer needs at least {len(pieces)} ids, got vocab_size={vocab_size}")
    pieces += [f"<unused{i}>" for i in range(vocab_size - len(pieces))]
    vocab = {piece: i for i, piece in enumerate(pieces)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES), unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Memoized checkpoints (wrapped by the session fixture `checkpoints` in conftest.py)
# --------------------------------------------------------------------------------------------


def _key(**kwargs) -> str:
    """A short stable directory name for a set of builder arguments."""
    text = json.dumps(kwargs, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


class Checkpoints:
    """Builds each distinct checkpoint once under `root` and hands back its directory.

    Directories are shared between tests: treat them as read-only (copy before rewriting).
    """

    def __init__(self, root):
        self.root = pathlib.Path(root)
        self._built: dict[str, pathlib.Path] = {}

    def _get(self, name: str, build) -> pathlib.Path:
        if name not in self._built:
            self._built[name] = build(self.root / name)
        return self._built[name]

    def target(
        self, geometry: str, *, multimodal: bool = False, seed: int = 0, published: bool = False, **overrides
    ) -> pathlib.Path:
        """A `save_target` checkpoint plus a `save_tokenizer` tokenizer of the same vocab size.

        published=True rewrites its config.json with `rewrite_config_as_published`.
        """
        key = _key(geometry=geometry, multimodal=multimodal, seed=seed, published=published, **overrides)

        def build(path: pathlib.Path) -> pathlib.Path:
            save_target(path, geometry, multimodal=multimodal, seed=seed, **overrides)
            save_tokenizer(path, vocab_size=load_config(path).get_text_config().vocab_size)
            if published:
                rewrite_config_as_published(path)
            return path

        return self._get(f"target-{geometry}-{key}", build)

    def assistant(
        self, target_path, *, centroids: bool = False, seed: int = 0, published: bool = False, **overrides
    ) -> pathlib.Path:
        """A `save_assistant` checkpoint fitted to `target_path`."""
        target_path = pathlib.Path(target_path)
        key = _key(target=str(target_path), centroids=centroids, seed=seed, published=published, **overrides)

        def build(path: pathlib.Path) -> pathlib.Path:
            save_assistant(path, target_path, centroids=centroids, seed=seed, **overrides)
            if published:
                rewrite_config_as_published(path)
            return path

        return self._get(f"assistant-{target_path.name}-{key}", build)
