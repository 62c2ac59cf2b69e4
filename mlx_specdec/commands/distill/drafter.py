"""The drafter to train: from an existing one or from sizes, the target quantized first if asked, and saved as a loadable folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ...errors import InputError
from ...loading import DTYPES, SpecModel, load_drafter
from ...models import assistant, gemma4
from ...models.assistant import FULL, SLIDING


# The drafter that goes with each target text decoder: model_type and transformers' class.
_DRAFTER_FOR = {
    gemma4.GEMMA4_TEXT: ("gemma4_assistant", "Gemma4AssistantForCausalLM"),
    gemma4.UNIFIED_TEXT: ("gemma4_unified_assistant", "Gemma4UnifiedAssistantForCausalLM"),
}


def scratch_config(target: gemma4.Model, *, hidden_size: int, layers: int, heads: int | None = None,
                   intermediate_size: int | None = None) -> dict:
    """A gemma4_assistant config.json (gemma4_unified_assistant for the 12B) fitted to
    ``target``: attention geometry, window, RoPE and vocabulary copied from the target's K/V
    source layers; layer types alternate sliding/full and end with full (or are all full when
    the target has no sliding layer)."""
    c = target.config
    sources = target.drafter_sources()
    kinds = [SLIDING if i % 2 == 0 and SLIDING in sources else FULL for i in range(layers - 1)] + [FULL]
    sliding, full = sources.get(SLIDING, sources[FULL]), sources[FULL]
    extra = c.extra
    text = {
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": layers,
        "layer_types": kinds,
        "num_attention_heads": heads or c.num_attention_heads,
        "num_key_value_heads": c.kv_heads[sliding],
        "head_dim": c.head_dims[sliding],
        "global_head_dim": c.head_dims[full],
        "attention_k_eq_v": c.kv_heads[full] != c.kv_heads[sliding] or c.attention_k_eq_v,
        "num_global_key_value_heads": c.kv_heads[full],
        "rope_parameters": json.loads(json.dumps(c.rope_parameters)),
        "sliding_window": c.sliding_window,
        "final_logit_softcapping": c.final_logit_softcapping,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": True,
        "max_position_embeddings": c.max_position_embeddings,
        "num_kv_shared_layers": layers,
        "use_double_wide_mlp": False,
    }
    if c.model_type == gemma4.GEMMA4_TEXT:  # the unified config has no such keys
        text.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if key in extra:
            text[key] = extra[key]
    model_type, architecture = _DRAFTER_FOR[c.model_type]
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "backbone_hidden_size": c.hidden_size,
        "use_ordered_embeddings": False,
        "tie_word_embeddings": True,
        "text_config": text,
    }


def _embedding_matrix(module: nn.Module) -> mx.array:
    if isinstance(module, nn.QuantizedEmbedding):
        return mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
    return module.weight


def new_drafter(target: gemma4.Model, config: dict, seed: int) -> assistant.Drafter:
    """A freshly initialised drafter. When its width equals the target's, its (tied) head
    starts as a copy of the target's embedding, i.e. the target's own output head."""
    mx.random.seed(seed)
    cfg = assistant.AssistantConfig.from_dict(config)
    assistant.check_compatible(cfg, target.config, target.drafter_sources())
    drafter = assistant.Drafter(cfg, target.embed_tokens)
    if cfg.text.hidden_size == target.config.hidden_size and target.config.tie_word_embeddings:
        drafter.lm_head.weight = mx.array(_embedding_matrix(target.embed_tokens).astype(mx.float32))
    mx.eval(drafter.parameters())
    return drafter


def hf_weights(drafter: assistant.Drafter, dtype=mx.bfloat16) -> dict[str, mx.array]:
    """The drafter's parameters under transformers' Gemma4AssistantForCausalLM names (the
    inverse of ``Drafter.sanitize``)."""
    out = {}
    for key, value in tree_flatten(drafter.parameters()):
        if key == "lm_head.weight":
            key = "model.embed_tokens.weight"
        elif key.startswith(("layers.", "norm.")):
            key = "model." + key
        if key == "masked_embedding.token_ordering":
            out[key] = value.astype(mx.int64)
        else:
            out[key] = value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
    return out




def save_drafter(drafter: assistant.Drafter, config: dict, out: Path, dtype: str = "bfloat16") -> Path:
    """A drafter folder ``load(target, drafter=out)`` reads: config.json + model.safetensors."""
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "dtype": dtype}
    mx.save_safetensors(str(out / "model.safetensors"), hf_weights(drafter, DTYPES[dtype]), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


QUANT_BITS = (2, 3, 4, 5, 6, 8)


def quantize_target(target: gemma4.Model, bits: int, group_size: int = 64) -> gemma4.Model:
    """Quantize the target's linear layers and embedding in place (as an mlx-lm conversion
    would). Do it before a drafter is built around the target's embedding."""
    if bits not in QUANT_BITS:
        raise InputError(f"quantization bits must be one of {QUANT_BITS}, got {bits}")
    try:
        nn.quantize(target, group_size=group_size, bits=bits)
    except ValueError as e:
        raise InputError(f"cannot quantize the target with group size {group_size}: {e}") from None
    mx.eval(target.parameters())
    return target


def start_drafter(spec: SpecModel, drafter_path: Path | None, *, hidden_size: int, layers: int,
                  seed: int) -> tuple[assistant.Drafter, dict]:
    """The drafter to train: loaded from ``drafter_path`` (in fp32), or new from the sizes."""
    if drafter_path is not None:
        drafter = load_drafter(Path(drafter_path), spec.target, dtype="float32")
        config = json.loads((Path(drafter_path) / "config.json").read_text())
        return drafter, config
    if hidden_size < 1 or layers < 1:
        raise InputError(f"hidden size and layers must be >= 1, got {hidden_size} and {layers}")
    config = scratch_config(spec.target, hidden_size=hidden_size, layers=layers)
    return new_drafter(spec.target, config, seed), config
