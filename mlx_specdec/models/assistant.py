"""Gemma 4 assistant (the MTP drafter).

It is not a model of its own: each step reads the target's embedding of the
last token and the target's last hidden state, and its layers attend, queries
only, to the K/V the target already computed (its last non-shared sliding and
full-attention layers). It drafts autoregressively at one fixed position, the
position of the token it was handed, feeding back its post-projected hidden.

Reference semantics: transformers ``models/gemma4_assistant``; the 12B's
``gemma4_unified_assistant`` is the same model over the unified text config.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError, DrafterMismatchError, ShardError
from .gemma4 import (
    FULL, GEMMA4_TEXT, SLIDING, UNIFIED_TEXT, DecoderLayer, TextConfig, config_bool, config_dict, config_int,
    split_heads,
)

# A drafter's model_type -> its text_config's model_type, with transformers'
# default backbone_hidden_size (the E2B's width, the 12B's width).
DRAFTER_TYPES = {"gemma4_assistant": GEMMA4_TEXT, "gemma4_unified_assistant": UNIFIED_TEXT}
_DEFAULT_BACKBONE = {"gemma4_assistant": 1536, "gemma4_unified_assistant": 3840}


@dataclass(frozen=True)
class AssistantConfig:
    text: TextConfig
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32

    @classmethod
    def from_dict(cls, cfg: dict) -> "AssistantConfig":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        if kind not in DRAFTER_TYPES:
            found = kind if isinstance(cfg, dict) else f"a JSON {type(cfg).__name__}"
            raise ConfigError(f"expected model_type one of {', '.join(DRAFTER_TYPES)}, found {found!r}")
        text = dict(config_dict(cfg, "text_config"))
        if not text:
            raise ConfigError(f"{kind} config has no text_config")
        text.setdefault("model_type", DRAFTER_TYPES[kind])
        # Every assistant layer reads the target's K/V.
        text["num_kv_shared_layers"] = text.get("num_kv_shared_layers") or text.get("num_hidden_layers")
        text.setdefault("hidden_size_per_layer_input", 0)
        text.setdefault("vocab_size_per_layer_input", 0)
        text_config = TextConfig.from_dict(text)
        if text_config.num_kv_shared_layers != text_config.num_hidden_layers:
            raise ConfigError(f"every {kind} layer must be KV-shared")
        if text_config.hidden_size_per_layer_input or text_config.enable_moe_block:
            raise ConfigError(f"a {kind} has no per-layer inputs and no MoE block")
        centroids = config_int(cfg, "num_centroids", 2048)
        top_k = config_int(cfg, "centroid_intermediate_top_k", 32)
        if top_k > centroids:
            raise ConfigError(f"centroid_intermediate_top_k must be at most num_centroids ({centroids}), got {top_k}")
        return cls(
            text=text_config,
            backbone_hidden_size=config_int(cfg, "backbone_hidden_size", _DEFAULT_BACKBONE[kind]),
            use_ordered_embeddings=config_bool(cfg, "use_ordered_embeddings", False),
            num_centroids=centroids,
            centroid_intermediate_top_k=top_k,
        )

    @property
    def sliding_window(self) -> int:
        """The window the drafter looks back through (transformers halves it
        for bidirectional configs)."""
        sw = self.text.sliding_window
        return sw // 2 + 1 if self.text.use_bidirectional_attention == "all" else sw


@dataclass(frozen=True)
class TargetKV:
    """The target's K/V for one attention type, with the position each slot holds."""

    keys: mx.array
    values: mx.array
    positions: mx.array  # (B, slots), -1 where empty


@dataclass(frozen=True)
class Draft:
    """One draft step's output.

    ``logits`` is (B, V), or (B, n) over ``candidates`` (B, n) token ids when
    the centroid head scored only the tokens of its top clusters.
    ``hidden`` (B, 1, backbone) is fed back as the next step's target hidden.
    """

    logits: mx.array
    candidates: mx.array | None
    hidden: mx.array

    def greedy_tokens(self) -> mx.array:
        best = mx.argmax(self.logits, axis=-1)
        if self.candidates is None:
            return best
        return mx.take_along_axis(self.candidates, best[:, None], axis=-1)[:, 0]


class MaskedEmbedder(nn.Module):
    """Centroid head: scores only the tokens of the top-k clusters of an
    ordered vocabulary, gathering just those rows of the head."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        vocab = config.text.vocab_size
        if vocab % config.num_centroids:
            raise ConfigError(f"vocab_size {vocab} is not divisible by num_centroids {config.num_centroids}")
        self.top_k = config.centroid_intermediate_top_k
        self.per_cluster = vocab // config.num_centroids
        self.centroids = nn.Linear(config.text.hidden_size, config.num_centroids, bias=False)
        self.token_ordering = mx.zeros((vocab,), dtype=mx.int32)

    def __call__(self, h: mx.array, head: nn.Module) -> tuple[mx.array, mx.array]:
        """h (B, D) -> (logits (B, n), token ids (B, n)), n = top_k * per_cluster."""
        scores = self.centroids(h)
        clusters = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[:, : self.top_k]
        clusters = mx.sort(clusters, axis=-1)  # a stable order for the candidates
        table = self.token_ordering.reshape(-1, self.per_cluster)
        ids = table[clusters].reshape(h.shape[0], -1)
        rows = head(ids)  # (B, n, D): gathers (and dequantizes) only these rows
        logits = (rows @ h[:, :, None])[..., 0]
        return logits, ids


class Drafter(nn.Module):
    def __init__(self, config: AssistantConfig, target_embedding: nn.Module):
        super().__init__()
        self.config = config
        text = config.text
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, config.backbone_hidden_size, bias=False)
        self.layers = [DecoderLayer(text, i) for i in range(text.num_hidden_layers)]
        self.norm = nn.RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        # The drafter's own vocabulary table: its (tied) output head only.
        self.lm_head = nn.Embedding(text.vocab_size, text.hidden_size)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(config)
        # The target's table, held by reference and kept out of this module's
        # parameters: one array between the two models, never a copy.
        self._target_embedding = target_embedding

    @property
    def sliding_window(self) -> int:
        """How far back it reads the target's sliding-window K/V (`loading.DraftModel`)."""
        return self.config.sliding_window

    @property
    def input_embedding(self) -> nn.Module:
        return self._target_embedding

    def embed(self, tokens: mx.array) -> mx.array:
        h = self._target_embedding(tokens)
        return h * mx.array(self.config.backbone_hidden_size**0.5, dtype=h.dtype)

    def masks(self, position: mx.array, kv: dict[str, TargetKV], queries: int = 1) -> dict[str, mx.array]:
        """What a query at ``position`` may read: the accepted prefix only
        (entries at or past it are rejected drafts or empty), and for sliding
        layers the same look-back as the reference: the newest
        ``sliding_window + 1`` keys before the position. With ``queries`` > 1,
        for queries at position, position + 1, ... (see `forward`)."""
        p = position[:, None, None, None] + mx.arange(queries, dtype=position.dtype)[None, None, :, None]
        out = {}
        for kind, entry in kv.items():
            k = entry.positions[:, None, None, :]
            mask = (k >= 0) & (k < p)
            if kind == SLIDING:
                mask = mask & (p - 1 - k <= self.config.sliding_window)
            out[kind] = mask
        return out

    def forward(self, tokens: mx.array, hidden: mx.array, position: mx.array, kv: dict[str, TargetKV],
                masks: dict[str, mx.array] | None = None) -> tuple[mx.array, mx.array]:
        """The drafter's layers for L queries per row at positions position, position + 1, ...:
        tokens (B, L), hidden (B, L, backbone). Returns the normed hidden state (what the heads
        read) and its post-projection (what the next draft step is fed). A draft step is L = 1;
        distillation runs one from every position of a sequence at once as L queries."""
        x = mx.concatenate([self.embed(tokens), hidden], axis=-1)
        h = self.pre_projection(x)
        masks = self.masks(position, kv, tokens.shape[1]) if masks is None else masks
        for kind, layer in zip(self.config.text.layer_types, self.layers):
            h, _ = layer(h, position, masks[kind], shared_kv=(kv[kind].keys, kv[kind].values))
        h = self.norm(h)
        return h, self.post_projection(h)

    def __call__(self, tokens: mx.array, hidden: mx.array, position: mx.array, kv: dict[str, TargetKV],
                 masks: dict[str, mx.array] | None = None) -> Draft:
        """One draft step for B rows.

        tokens (B,): the last token of each row; hidden (B, 1, backbone): the
        target's (or previous step's post-projected) hidden state for the
        token before it; position (B,): the fixed drafting position (that of
        ``tokens``); kv: the target's K/V per attention type; masks:
        ``self.masks(position, kv)``, which a round's steps share (position
        and K/V stay fixed while drafting), computed here when not given.
        """
        h, projected = self.forward(tokens[:, None], hidden, position, kv, masks)
        last = h[:, 0]
        if self.config.use_ordered_embeddings:
            logits, candidates = self.masked_embedding(last, self.lm_head)
        else:
            logits, candidates = self.lm_head.as_linear(last), None
        return Draft(logits=logits, candidates=candidates, hidden=projected)

    def shard(self, group, target: TextConfig, sources: dict[str, int]) -> None:
        """Split each layer's query heads so that every rank's queries read exactly the K/V heads
        its shard of the target's cache holds (``sources``: the target layer read per attention
        type); MLP columns split, one all-reduce after each attention output and each MLP. The
        projections and the heads (small) stay whole on every rank."""
        size, text = group.size(), self.config.text
        for i, layer in enumerate(self.layers):
            kv_heads = target.kv_heads[sources[text.layer_types[i]]]
            for r in range(size):
                mine = split_heads(text.num_attention_heads, kv_heads, size, r)
                held = split_heads(target.num_attention_heads, kv_heads, size, r)
                if (mine.kv0, mine.kv1) != (held.kv0, held.kv1):
                    raise ShardError(
                        f"drafter layer {i}: {text.num_attention_heads} query heads over {size} processes read "
                        f"K/V heads {mine.kv0}..{mine.kv1 - 1} on rank {r}, where the target's cache holds "
                        f"{held.kv0}..{held.kv1 - 1}")
            layer.shard(group, kv_heads)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for key, value in weights.items():
            if "rotary_emb" in key:
                continue
            if key == "model.embed_tokens.weight":
                key = "lm_head.weight"
            elif key == "lm_head.weight" and "model.embed_tokens.weight" in weights:
                continue  # tied to the table above
            elif key.startswith("model."):
                key = key[len("model.") :]
            if key == "masked_embedding.token_ordering":
                value = value.astype(mx.int32)
            out[key] = value
        return out


def check_compatible(drafter: AssistantConfig, target: TextConfig, sources: dict[str, int]) -> None:
    """Refuse a drafter made for another target, naming the mismatch."""
    problems = []
    if drafter.backbone_hidden_size != target.hidden_size:
        problems.append(
            f"drafter expects a target hidden size of {drafter.backbone_hidden_size}, target has {target.hidden_size}"
        )
    if drafter.text.vocab_size != target.vocab_size:
        problems.append(f"drafter vocab is {drafter.text.vocab_size}, target vocab is {target.vocab_size}")
    for i, kind in enumerate(drafter.text.layer_types):
        if kind not in sources:
            problems.append(f"drafter layer {i} reads {kind} K/V but the target has no {kind} layer")
            continue
        src = sources[kind]
        if drafter.text.head_dims[i] != target.head_dims[src]:
            problems.append(
                f"drafter layer {i} ({kind}) has head_dim {drafter.text.head_dims[i]}, "
                f"target layer {src} has {target.head_dims[src]}"
            )
        if drafter.text.num_attention_heads % target.kv_heads[src]:
            problems.append(
                f"drafter layer {i} has {drafter.text.num_attention_heads} heads, not a multiple of the "
                f"target's {target.kv_heads[src]} KV heads"
            )
    if problems:
        raise DrafterMismatchError("drafter does not match the target: " + "; ".join(problems))


__all__ = ["DRAFTER_TYPES", "AssistantConfig", "Draft", "Drafter", "TargetKV", "check_compatible", "FULL", "SLIDING"]
