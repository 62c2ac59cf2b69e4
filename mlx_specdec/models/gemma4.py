"""Gemma 4 text decoder (the speculative target), self-contained in the mlx-lm style.

Covers every published geometry: per-layer inputs and KV-shared layers
(E2B/E4B), k=v global attention with its own head dim and KV-head count (31B),
the MoE block (26B A4B), sliding and full attention, logit soft-capping. The
12B's decoder (transformers' ``gemma4_unified_text``) is this one without
per-layer inputs and MoE, so it is a config here, not another model.

One forward pass returns the final (normed) hidden state; ``logits()`` turns it
into soft-capped logits, and the drafter reads the K/V of the two layers named
by ``drafter_sources`` straight out of the cache the same pass filled.
Reference semantics: transformers ``models/gemma4/modeling_gemma4.py`` and
``models/gemma4_unified/modeling_gemma4_unified.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_map
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchGLU

from ..cache import Blocks, Cache, LayerKV, Plan, PositionTable, Step
from ..errors import ConfigError, ShardError

SLIDING = "sliding_attention"
FULL = "full_attention"
ATTENTION_TYPES = (SLIDING, FULL)

# transformers' Gemma4TextConfig defaults, used where a config.json omits a key.
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
_DEFAULT_SLIDING_PATTERN = 6

GEMMA4_TEXT = "gemma4_text"
UNIFIED_TEXT = "gemma4_unified_text"
TEXT_TYPES = (GEMMA4_TEXT, UNIFIED_TEXT)
# Where transformers' Gemma4UnifiedTextConfig (the 12B) departs from Gemma4TextConfig's
# defaults. Its decoder layer has no per-layer inputs and no MoE block: it never reads
# those keys, so they are off whatever a config.json says.
_DEFAULTS = {
    GEMMA4_TEXT: {"sliding_window": 512, "use_bidirectional_attention": None, "max_position_embeddings": 131_072},
    UNIFIED_TEXT: {"sliding_window": 1024, "use_bidirectional_attention": "vision", "max_position_embeddings": 262_144},
}


def _layer_overrides(cfg: dict, layer_types: list[str]) -> list[dict]:
    """Per-layer head_dim / num_key_value_heads overrides, from either config style.

    Google's published config.json names ``global_head_dim`` and
    ``num_global_key_value_heads``; ``save_pretrained`` writes the resolved
    ``per_layer_config`` instead. transformers gives full-attention layers the
    global head dim always, and the global KV-head count only with k=v attention.
    """
    per_layer = cfg.get("per_layer_config")
    if per_layer is not None:
        if isinstance(per_layer, list):
            return [dict(o or {}) for o in per_layer] + [{}] * (len(layer_types) - len(per_layer))
        out = [{} for _ in layer_types]
        for key, value in per_layer.items():
            if str(key).isdigit() and int(key) < len(out):
                out[int(key)] = dict(value or {})
        return out
    full = {"head_dim": cfg.get("global_head_dim", 512)}
    if cfg.get("attention_k_eq_v", False) and cfg.get("num_global_key_value_heads") is not None:
        full["num_key_value_heads"] = cfg["num_global_key_value_heads"]
    return [dict(full) if t == FULL else {} for t in layer_types]


_REQUIRED = object()


def config_int(cfg: dict, key: str, default=_REQUIRED, *, minimum: int = 1, null=_REQUIRED) -> int:
    """``cfg[key]``, an integer >= ``minimum`` (``null``: what a JSON null stands for, if allowed)."""
    value = cfg.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"config is missing {key!r}")
    if value is None and null is not _REQUIRED:
        value = null
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def config_float(cfg: dict, key: str, default=_REQUIRED) -> float:
    """``cfg[key]``, a finite number > 0."""
    value = cfg.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"config is missing {key!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")
    return float(value)


def config_bool(cfg: dict, key: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def config_dict(cfg: dict, key: str) -> dict:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got {value!r}")
    return value


@dataclass(frozen=True)
class TextConfig:
    """The text decoder's geometry, resolved once from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    rope_parameters: dict
    sliding_window: int
    max_position_embeddings: int = 131_072  # prompt + answer never run past it
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    tie_word_embeddings: bool = True
    use_bidirectional_attention: str | None = None
    eos_token_id: tuple[int, ...] = ()
    model_type: str = GEMMA4_TEXT
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict) -> "TextConfig":
        """Parse and validate: a config.json is untrusted, and a bad value must fail here,
        naming its key, rather than as a shape error, a crash or silent nonsense later."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"expected a JSON object, got {type(cfg).__name__}")
        n = config_int(cfg, "num_hidden_layers")
        hidden = config_int(cfg, "hidden_size")
        heads = config_int(cfg, "num_attention_heads")
        model_type = UNIFIED_TEXT if cfg.get("model_type") == UNIFIED_TEXT else GEMMA4_TEXT
        defaults, gemma4 = _DEFAULTS[model_type], model_type == GEMMA4_TEXT
        act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"unsupported hidden_activation {act!r} (expected 'gelu_pytorch_tanh')")
        layer_types = cfg.get("layer_types") or [
            SLIDING if (i + 1) % _DEFAULT_SLIDING_PATTERN else FULL for i in range(n)
        ]
        if not isinstance(layer_types, list):
            raise ConfigError(f"layer_types must be a list, got {layer_types!r}")
        layer_types = list(layer_types)
        if len(layer_types) != n:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {n} layers")
        unknown = [t for t in layer_types if t not in ATTENTION_TYPES]
        if unknown:
            raise ConfigError(f"unknown layer types {unknown}")
        layer_types[-1] = FULL  # transformers forces the last layer to full attention
        rope = dict(_DEFAULT_ROPE)
        rope.update(config_dict(cfg, "rope_parameters"))
        if not all(isinstance(v, dict) for v in rope.values()):
            raise ConfigError(f"rope_parameters must map each attention type to a dict, got {rope!r}")
        if cfg.get("per_layer_config") is not None and not isinstance(cfg["per_layer_config"], (list, dict)):
            raise ConfigError(f"per_layer_config must be a list or a dict, got {cfg['per_layer_config']!r}")
        try:
            overrides = _layer_overrides(cfg, layer_types)
        except (TypeError, ValueError):
            raise ConfigError(f"per_layer_config entries must be dicts, got {cfg.get('per_layer_config')!r}") from None
        if len(overrides) != n:
            raise ConfigError(f"per_layer_config has {len(overrides)} entries for {n} layers")
        head_dim = config_int(cfg, "head_dim", 256)
        kv_heads = config_int(cfg, "num_key_value_heads", 4)
        head_dims = tuple(config_int(o, "head_dim", head_dim) for o in overrides)
        layer_kv_heads = tuple(config_int(o, "num_key_value_heads", kv_heads) for o in overrides)
        if any(heads % h for h in layer_kv_heads):
            raise ConfigError(f"num_attention_heads {heads} is not a multiple of the KV heads {set(layer_kv_heads)}")
        eos = cfg.get("eos_token_id", 1)
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
            raise ConfigError(f"eos_token_id must be a token id or a list of them, got {cfg.get('eos_token_id')!r}")
        softcap = cfg.get("final_logit_softcapping")
        shared = config_int(cfg, "num_kv_shared_layers", 0, minimum=0, null=0)
        if shared > n:
            raise ConfigError(f"num_kv_shared_layers must be at most num_hidden_layers ({n}), got {shared}")
        moe = config_bool(cfg, "enable_moe_block", False) if gemma4 else False
        bidirectional = cfg.get("use_bidirectional_attention", defaults["use_bidirectional_attention"])
        if bidirectional is not None and not isinstance(bidirectional, str):
            raise ConfigError(f"use_bidirectional_attention must be a string or null, got {bidirectional!r}")
        return cls(
            vocab_size=config_int(cfg, "vocab_size", 262_144),
            hidden_size=hidden,
            intermediate_size=config_int(cfg, "intermediate_size", 9216),
            num_hidden_layers=n,
            num_attention_heads=heads,
            layer_types=tuple(layer_types),
            head_dims=head_dims,
            kv_heads=layer_kv_heads,
            rope_parameters=rope,
            sliding_window=config_int(cfg, "sliding_window", defaults["sliding_window"]),
            max_position_embeddings=config_int(cfg, "max_position_embeddings", defaults["max_position_embeddings"]),
            rms_norm_eps=config_float(cfg, "rms_norm_eps", 1e-6),
            final_logit_softcapping=None if softcap is None else config_float(cfg, "final_logit_softcapping"),
            hidden_size_per_layer_input=(
                config_int(cfg, "hidden_size_per_layer_input", 256, minimum=0, null=0) if gemma4 else 0),
            vocab_size_per_layer_input=(
                config_int(cfg, "vocab_size_per_layer_input", 262_144, minimum=0, null=0) if gemma4 else 0),
            attention_k_eq_v=config_bool(cfg, "attention_k_eq_v", False),
            num_kv_shared_layers=shared,
            use_double_wide_mlp=config_bool(cfg, "use_double_wide_mlp", False),
            enable_moe_block=moe,
            num_experts=config_int(cfg, "num_experts") if moe else cfg.get("num_experts"),
            top_k_experts=config_int(cfg, "top_k_experts") if moe else cfg.get("top_k_experts"),
            moe_intermediate_size=config_int(cfg, "moe_intermediate_size") if moe else cfg.get("moe_intermediate_size"),
            tie_word_embeddings=config_bool(cfg, "tie_word_embeddings", True),
            use_bidirectional_attention=bidirectional,
            eos_token_id=tuple(eos),
            model_type=model_type,
            extra=cfg,
        )

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, i: int) -> int:
        """The layer whose K/V layer i attends to (itself unless KV-shared)."""
        if i < self.first_shared_layer:
            return i
        return self.last_layer_of(self.layer_types[i])

    def last_layer_of(self, kind: str) -> int:
        """Last non-shared layer of a type: its K/V serve shared layers and the drafter."""
        for i in reversed(range(self.first_shared_layer)):
            if self.layer_types[i] == kind:
                return i
        raise ConfigError(f"num_kv_shared_layers {self.num_kv_shared_layers} of {self.num_hidden_layers} leaves "
                          f"no {kind} layer that computes K/V for the KV-shared ones to read")


def softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


class RMSNormNoScale(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, None, self.eps)


def make_rope(config: TextConfig, kind: str, head_dim: int) -> nn.Module:
    params = dict(config.rope_parameters[kind])
    return initialize_rope(
        dims=head_dim,
        base=params.get("rope_theta", 10_000.0),
        traditional=False,
        scaling_config=params,
        max_position_embeddings=config.extra.get("max_position_embeddings"),
    )


# Steps of at most this many tokens per row (decode, verify, draft) run each layer's two halves
# around attention compiled. Such a step costs more per op than per FLOP: on MLX's CPU stream about
# 7 us an op, and a small model's step is a thousand ops, most of them elementwise (norms, rope,
# GeLU gating, residuals, and on the CPU the decompositions of mx.fast's kernels). Compiling fuses
# those chains and halves the ops. Longer steps (prefill, distillation) come in many lengths, each
# a fresh trace, and there the matmuls dominate anyway.
FUSED_MAX_TOKENS = 16


def attend(queries, keys, values, mask):
    if isinstance(mask, Blocks):  # a long step: each block of queries over the keys it sees
        return mx.concatenate([attend(queries[:, :, q0:q1], keys[:, :, k0:k1], values[:, :, k0:k1], part)
                               for q0, q1, k0, k1, part in mask.parts], axis=2)
    # Gemma 4 normalises q and k per head, so attention runs unscaled.
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)


@dataclass(frozen=True)
class HeadSplit:
    """One rank's share of an attention layer: query heads [q0, q1) and the K/V heads [kv0, kv1) they read."""

    q0: int
    q1: int
    kv0: int
    kv1: int


def split_heads(n_heads: int, n_kv_heads: int, size: int, rank: int) -> HeadSplit:
    """Query heads split evenly over ``size`` ranks; each rank keeps the K/V heads its queries read.

    With at least one K/V head per rank that is an even split of the K/V heads too. With fewer
    (the one global K/V head of k=v attention) a rank's queries all read one K/V head, which every
    rank needing it keeps: that part is replicated. Only a rank whose queries would straddle K/V
    heads unevenly has no split; every rank checks every rank, so all of them refuse together.
    """
    if n_heads % size:
        raise ShardError(f"{n_heads} attention heads do not split over {size} processes")
    per_rank, group = n_heads // size, n_heads // n_kv_heads
    splits = []
    for r in range(size):
        q0, q1 = r * per_rank, (r + 1) * per_rank
        kv0, kv1 = q0 // group, (q1 - 1) // group + 1
        if per_rank % group and kv1 - kv0 != 1:
            raise ShardError(f"{n_heads} query heads over {n_kv_heads} K/V heads do not split over {size} "
                             f"processes (rank {r}'s queries would read parts of {kv1 - kv0} K/V heads)")
        splits.append(HeadSplit(q0, q1, kv0, kv1))
    return splits[rank]


def _divides(n: int, size: int, what: str) -> None:
    if n % size:
        raise ShardError(f"{what} of {n} does not split over {size} processes")


def _keep_rows(linear: nn.Module, start: int, stop: int) -> None:
    """Keep output features [start, stop) of a (possibly quantized) linear layer, copied out so
    the full weight is never kept."""
    linear.update(tree_map(lambda w: mx.contiguous(w[start:stop]), linear.parameters()))


def _shard_linear(linear: nn.Module, sharding: str, group) -> nn.Module:
    try:
        return shard_linear(linear, sharding, group=group)
    except ValueError as e:  # a quantization group that a slice would cut
        raise ShardError(f"cannot shard a layer over {group.size()} processes: {e}") from None


class Attention(nn.Module):
    def __init__(self, config: TextConfig, i: int):
        super().__init__()
        self.kind = config.layer_types[i]
        self.head_dim = config.head_dims[i]
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.kv_heads[i]
        self.shares_kv = i >= config.first_shared_layer
        self.k_eq_v = config.attention_k_eq_v and self.kind == FULL
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        if not self.shares_kv:
            self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)
            self.v_norm = RMSNormNoScale(eps)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.rope = make_rope(config, self.kind, self.head_dim)

    def project(self, x, offsets: mx.array):
        """(queries,) for a KV-shared layer, else (queries, keys, values): normed, rotated,
        (B, heads, L, head_dim). The keys and values are the step's own, before the cache."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offsets)
        if self.shares_kv:
            return (q,)
        raw = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = raw if self.k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        k = self.rope(self.k_norm(raw).transpose(0, 2, 1, 3), offset=offsets)
        v = self.v_norm(v).transpose(0, 2, 1, 3)
        return q, k, v

    def shard(self, group, kv_heads: int | None = None) -> None:
        """Keep this rank's query heads and the K/V heads they read; o_proj sums the ranks' outputs.

        ``kv_heads``: the K/V heads this layer reads when they are another model's (a drafter's
        layers read the target's)."""
        split = split_heads(self.n_heads, kv_heads or self.n_kv_heads, group.size(), group.rank())
        self.q_proj = _shard_linear(self.q_proj, "all-to-sharded", group)
        self.o_proj = _shard_linear(self.o_proj, "sharded-to-all", group)
        self.n_heads = split.q1 - split.q0
        if not self.shares_kv:
            _keep_rows(self.k_proj, split.kv0 * self.head_dim, split.kv1 * self.head_dim)
            if not self.k_eq_v:
                _keep_rows(self.v_proj, split.kv0 * self.head_dim, split.kv1 * self.head_dim)
        self.n_kv_heads = split.kv1 - split.kv0


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))

    def shard(self, group) -> None:
        """Each rank keeps a slice of the hidden columns; down_proj sums the ranks' outputs."""
        _divides(self.gate_proj.weight.shape[0], group.size(), "an MLP's intermediate size")
        self.gate_proj = _shard_linear(self.gate_proj, "all-to-sharded", group)
        self.up_proj = _shard_linear(self.up_proj, "all-to-sharded", group)
        self.down_proj = _shard_linear(self.down_proj, "sharded-to-all", group)


class Router(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = mx.ones((config.hidden_size,))
        self.per_expert_scale = mx.ones((config.num_experts,))
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps

    def __call__(self, x):
        x = mx.fast.rms_norm(x, self.scale * x.shape[-1] ** -0.5, self.eps)
        scores = self.proj(x)
        # softmax over all experts then renormalising the top k equals a
        # softmax over the top-k scores alone.
        top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.softmax(mx.take_along_axis(scores, top, axis=-1).astype(mx.float32), axis=-1)
        return top, weights.astype(x.dtype) * self.per_expert_scale[top]


class GeGLU(nn.Module):
    def __call__(self, x, gate):
        return nn.gelu_approx(gate) * x


class Experts(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.switch_glu = SwitchGLU(
            config.hidden_size, config.moe_intermediate_size, config.num_experts, activation=GeGLU()
        )
        self.intermediate = config.moe_intermediate_size
        self.group = None  # set by shard(): the ranks whose partial sums make the output

    def __call__(self, x, top, weights):
        out = (self.switch_glu(x, top) * weights[..., None]).sum(-2)
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)

    def shard(self, group) -> None:
        """Each rank keeps a slice of every expert's hidden columns (as mlx-lm shards its MoE
        models), not whole experts: with top-k routing of a few tokens, whole experts per rank
        would leave the ranks whose experts were not chosen idle, where slices give every rank
        1/N of every chosen expert's work."""
        _divides(self.intermediate, group.size(), "the experts' intermediate size")
        shard_inplace(self.switch_glu.gate_proj, "all-to-sharded", group=group)
        shard_inplace(self.switch_glu.up_proj, "all-to-sharded", group=group)
        shard_inplace(self.switch_glu.down_proj, "sharded-to-all", group=group)
        self.group = group


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, i: int):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, i)
        double = config.use_double_wide_mlp and self.self_attn.shares_kv
        self.mlp = MLP(dim, config.intermediate_size * (2 if double else 1))
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.layer_scalar = mx.ones((1,))
        self.moe = config.enable_moe_block
        if self.moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = nn.RMSNorm(dim, eps=eps)
            self.post_feedforward_layernorm_2 = nn.RMSNorm(dim, eps=eps)
            self.pre_feedforward_layernorm_2 = nn.RMSNorm(dim, eps=eps)
        self.per_layer = config.hidden_size_per_layer_input
        if self.per_layer:
            self.per_layer_input_gate = nn.Linear(dim, self.per_layer, bias=False)
            self.per_layer_projection = nn.Linear(self.per_layer, dim, bias=False)
            self.post_per_layer_input_norm = nn.RMSNorm(dim, eps=eps)
        # Both halves around attention, compiled: see FUSED_MAX_TOKENS. ``inputs=self`` makes the
        # layer's weights inputs read at every call, so loading, quantizing or training them later
        # is seen (they are not frozen into the compiled graph).
        self._fused_project = mx.compile(self.project, inputs=self)
        self._fused_finish = mx.compile(self.finish, inputs=self)
        self.fuse = True

    def __call__(self, x, offsets, mask, cache=None, plan=None, shared_kv=None, per_layer_input=None):
        """Attend with ``mask`` (broadcastable to (B, 1, L, keys), "causal", None or cache.Blocks) to this layer's
        keys: a layer that computes K/V writes them to ``cache`` where ``plan`` says and reads back
        what the cache returns; a KV-shared layer computes none and reads ``shared_kv``, the
        (keys, values) its source layer attended to in this same pass. ``offsets``: the rows'
        first positions, an int32 array, () or (B,). Returns the output and the (keys, values)
        attended to."""
        fused = self.fuse and x.shape[1] <= FUSED_MAX_TOKENS
        project, finish = (self._fused_project, self._fused_finish) if fused else (self.project, self.finish)
        q, *new_kv = project(x, offsets)
        keys, values = cache.update_and_fetch(*new_kv, plan) if new_kv else shared_kv
        return finish(x, attend(q, keys, values, mask), per_layer_input), (keys, values)

    def project(self, x, offsets):
        return self.self_attn.project(self.input_layernorm(x), offsets)

    def finish(self, x, attended, per_layer_input=None):
        """Everything after attention: output projection, the feed-forward block(s), the
        per-layer input, each with its norms and residual."""
        B, _, L, _ = attended.shape
        attn = self.self_attn.o_proj(attended.transpose(0, 2, 1, 3).reshape(B, L, -1))
        h = x + self.post_attention_layernorm(attn)
        ff = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:
            top, weights = self.router(h)
            experts = self.experts(self.pre_feedforward_layernorm_2(h), top, weights)
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(experts)
        h = h + self.post_feedforward_layernorm(ff)
        if self.per_layer:
            gate = nn.gelu_approx(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return h * self.layer_scalar

    def shard(self, group, kv_heads: int | None = None) -> None:
        """Attention heads, MLP columns and experts split over the group; norms, the router and
        the per-layer-input projections (small) are replicated."""
        self.self_attn.shard(group, kv_heads)
        self.mlp.shard(group)
        # A compiled graph would keep the group's collectives alive in MLX's compile cache until
        # the interpreter's last teardown, after the group: MLX then aborts the process on exit.
        self.fuse = False
        if self.moe:
            self.experts.shard(group)


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        for i in range(config.first_shared_layer, config.num_hidden_layers):
            config.kv_source(i)  # a KV-shared layer with no source fails here, not mid-forward
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        P = config.hidden_size_per_layer_input
        if P:
            n = config.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, n * P)
            self.per_layer_model_projection = nn.Linear(config.hidden_size, n * P, bias=False)
            self.per_layer_projection_norm = nn.RMSNorm(P, eps=config.rms_norm_eps)

    def embed(self, tokens: mx.array) -> mx.array:
        """Scaled token embedding: the target's input, and the drafter's too."""
        h = self.embed_tokens(tokens)
        # transformers casts the scale to the weight dtype (55.43 -> 55.5 in bf16).
        return h * mx.array(self.config.hidden_size**0.5, dtype=h.dtype)

    def per_layer_inputs(self, tokens: mx.array, h: mx.array) -> mx.array:
        c = self.config
        shape = (*tokens.shape, c.num_hidden_layers, c.hidden_size_per_layer_input)
        by_token = self.embed_tokens_per_layer(tokens)
        by_token = (by_token * mx.array(c.hidden_size_per_layer_input**0.5, dtype=by_token.dtype)).reshape(shape)
        by_context = self.per_layer_model_projection(h) * (c.hidden_size**-0.5)
        by_context = self.per_layer_projection_norm(by_context.reshape(shape))
        return (by_context + by_token) * (2.0**-0.5)

    def __call__(self, tokens: mx.array, step: Step, cache: Cache) -> mx.array:
        h = self.embed(tokens)
        per_layer = self.per_layer_inputs(tokens, h) if self.config.hidden_size_per_layer_input else None
        plans = cache.plan(step)
        # One start for all rows (always at B = 1) rotates by one offset. An array, not an int:
        # a compiled layer would trace an int as a constant, once per position.
        offsets = mx.array(step.starts[0] if step.uniform else step.starts, dtype=mx.int32)
        # A KV-shared layer reads what the last layer of its type that computes K/V attended to
        # in this pass (`TextConfig.kv_source`). Those layers all come first, so the latest pair
        # per type is all there is to hold, and nothing holds it past this call.
        first_shared, latest = self.config.first_shared_layer, {}
        for i, layer in enumerate(self.layers):
            kind = self.config.layer_types[i]
            plan = plans[kind]
            extra = None if per_layer is None else per_layer[:, :, i]
            if i < first_shared:
                h, latest[kind] = layer(h, offsets, plan.mask, cache.layers[i], plan, per_layer_input=extra)
            else:
                h, _ = layer(h, offsets, plan.mask, shared_kv=latest[kind], per_layer_input=extra)
        return self.norm(h)


class Model(nn.Module):
    """The target: ``hidden = model(tokens, step, cache)``; ``logits = model.logits(hidden)``."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, step: Step, cache: Cache) -> mx.array:
        return self.model(tokens, step, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            out = self.model.embed_tokens.as_linear(hidden)
        else:
            out = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return softcap(out, cap) if cap else out

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.embed_tokens

    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed(tokens)

    def lookback(self, drafter_window: int = 0) -> int:
        """How many latest positions a sliding ring must hold: the target's window, or the
        drafter's if it reads further back (it sees ``drafter_window + 1`` keys before its position)."""
        return max(self.config.sliding_window, drafter_window + 1)

    def make_cache(self, batch_size: int = 1, max_step: int = 16, drafter_window: int = 0) -> Cache:
        """Empty caches for ``batch_size`` rows.

        ``max_step`` bounds the tokens of one decode step (k + 1); larger steps
        (prefill) still work but take the slower concatenating path.
        ``drafter_window`` is the sliding window the drafter reads through.
        """
        c = self.config
        tables = {
            SLIDING: PositionTable(batch_size, c.sliding_window, self.lookback(drafter_window) + max_step),
            FULL: PositionTable(batch_size, None, 0),
        }
        # KV-shared layers never write theirs (their LayerKV stays empty);
        # one entry per layer keeps the indexing plain.
        layers = [LayerKV(tables[kind]) for kind in c.layer_types]
        return Cache(tables, layers, max_step)

    def shard(self, group) -> None:
        """Tensor parallelism over ``group`` (run on every rank, before the weights are evaluated,
        so that each rank reads only its slice): attention heads, MLP columns and expert columns
        split, one all-reduce after each attention output and each MLP (two in a MoE layer: its
        dense MLP and its experts). The embedding (the tied head, shared with the drafter) and
        the per-layer-input tables stay whole on every rank. Each rank's cache then holds the
        K/V heads of its own queries."""
        for layer in self.model.layers:
            layer.shard(group)

    def drafter_sources(self) -> dict[str, int]:
        """Which layer's K/V the drafter reads for each attention type."""
        return {kind: self.config.last_layer_of(kind) for kind in set(self.config.layer_types)}

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a text checkpoint's keys onto this module (already stripped of
        multimodal prefixes by the loader)."""
        c = self.config
        out = {}
        for key, value in weights.items():
            if "rotary_emb" in key:
                continue
            if key == "lm_head.weight" and c.tie_word_embeddings:
                continue
            parts = key.split(".")
            if len(parts) > 3 and parts[1] == "layers" and parts[4:5] and parts[3] == "self_attn":
                i = int(parts[2])
                if c.kv_source(i) != i and parts[4] in ("k_proj", "v_proj", "k_norm", "v_norm"):
                    continue  # KV-shared layers never compute their own K/V
            if key.endswith(".experts.gate_up_proj"):
                base = key.removesuffix(".gate_up_proj")
                gate, up = mx.split(value, 2, axis=-2)
                out[f"{base}.switch_glu.gate_proj.weight"] = gate
                out[f"{base}.switch_glu.up_proj.weight"] = up
                continue
            if key.endswith(".experts.down_proj"):
                out[key.removesuffix(".down_proj") + ".switch_glu.down_proj.weight"] = value
                continue
            out[key] = value
        return out
