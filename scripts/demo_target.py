"""Train the demo pair's target: a small Gemma 4 text model (the real architecture, our port's
modules) on the stdlib corpus, with MLX.

The training forward runs our port's decoder layers over whole sequences without a cache: each
attention layer gets a pass-through in place of its cache and a causal (or sliding-window
causal) mask, so the model trained is exactly the module the loader builds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_specdec.models import gemma4

SLIDING, FULL = gemma4.SLIDING, gemma4.FULL


def target_config(vocab_size: int, *, hidden: int = 256, layers: int = 6, intermediate: int = 1024,
                  heads: int = 4, kv_heads: int = 1, head_dim: int = 64, global_head_dim: int = 128,
                  sliding_window: int = 128, eos_ids=(1, 5)) -> dict:
    """A gemma4_text config.json: sliding and full layers (every third full, and the last),
    proportional RoPE on a quarter of the wider full-attention heads, tied embeddings and
    final logit soft-capping, as in the published Gemma 4 models."""
    layer_types = [FULL if (i + 1) % 3 == 0 or i == layers - 1 else SLIDING for i in range(layers)]
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "layer_types": layer_types,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "num_global_key_value_heads": None,
        "sliding_window": sliding_window,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "attention_k_eq_v": False,
        "enable_moe_block": False,
        "use_double_wide_mlp": False,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": list(eos_ids),
        "dtype": "float16",
    }


class _NoCache:
    """Stands in for a layer's cache: attention reads exactly the keys it just computed."""

    def update_and_fetch(self, keys, values, plan):
        return keys, values


def forward(model: gemma4.Model, tokens: mx.array) -> mx.array:
    """Logits for every position of (B, L) tokens, no cache (training)."""
    text = model.model
    B, L = tokens.shape
    h = text.embed(tokens)
    pos = mx.arange(L)
    causal = pos[None, :] <= pos[:, None]
    masks = {FULL: causal, SLIDING: causal & (pos[None, :] > pos[:, None] - text.config.sliding_window)}
    offsets = mx.zeros((B,), dtype=mx.int32)
    for kind, layer in zip(text.config.layer_types, text.layers):
        h, _ = layer(h, offsets, masks[kind], _NoCache())
    return model.logits(text.norm(h))


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 700
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    qa_fraction: float = 0.3  # rows drawn from the question -> answer stream
    eval_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0


def windows(stream: np.ndarray, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    starts = rng.integers(0, len(stream) - length, size=n)
    return np.stack([stream[s : s + length] for s in starts])


def batch(step: int, code: np.ndarray, qa: np.ndarray, s: TrainSettings) -> np.ndarray:
    """The rows of one step, a function of (seed, step) alone so that a resumed run sees the
    same batches as an uninterrupted one."""
    rng = np.random.default_rng([s.seed, step])
    n_qa = int(rng.binomial(s.batch_size, s.qa_fraction))
    rows = [windows(code, rng, s.batch_size - n_qa, s.seq_len + 1)]
    if n_qa:
        rows.append(windows(qa, rng, n_qa, s.seq_len + 1))
    return np.concatenate(rows)


def schedule(s: TrainSettings):
    warmup = min(s.warmup, s.steps // 2)
    warm = optim.linear_schedule(s.lr * 0.01, s.lr, max(warmup, 1))
    decay = optim.cosine_decay(s.lr, max(s.steps - warmup, 1), s.lr * s.min_lr_ratio)
    return optim.join_schedules([warm, decay], [max(warmup, 1)])


def train_target(config: dict, code: np.ndarray, qa: np.ndarray, held_out: np.ndarray,
                 settings: TrainSettings, work: Path, log=print) -> gemma4.Model:
    """Train from a seeded init (or resume from ``work``'s checkpoint); returns the fp32 model."""
    s = settings
    mx.random.seed(s.seed)
    model = gemma4.Model(gemma4.TextConfig.from_dict(config))
    # layer_scalar is a fixed buffer in the published models: keep it at 1.
    model.freeze(keys=["layer_scalar"], strict=False)
    opt = optim.AdamW(learning_rate=schedule(s), betas=(0.9, 0.98), weight_decay=s.weight_decay)
    ckpt = work / "target_checkpoint"
    start = 0
    if (ckpt / "state.json").exists():
        model.load_weights(str(ckpt / "weights.safetensors"))
        opt.init(model.trainable_parameters())
        opt.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
        start = json.loads((ckpt / "state.json").read_text())["step"]
        log(f"resuming target training at step {start}")
    mx.eval(model.parameters())

    def loss_fn(m, x):
        logits = forward(m, x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:]).mean()

    step_fn = nn.value_and_grad(model, loss_fn)
    eval_x = mx.array(windows(held_out, np.random.default_rng(s.seed + 1), 8, s.seq_len + 1))
    started, recent = time.perf_counter(), []
    for step in range(start, s.steps):
        x = mx.array(batch(step, code, qa, s))
        loss, grads = step_fn(model, x)
        grads, _ = optim.clip_grad_norm(grads, s.grad_clip)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        recent = (recent + [loss.item()])[-20:]
        done = step + 1
        if done % 10 == 0 or done == s.steps:
            rate = (done - start) * x.size / (time.perf_counter() - started)
            log(f"target step {done}/{s.steps} loss {np.mean(recent):.3f} "
                f"lr {opt.learning_rate.item():.2e} {rate:.0f} tok/s")
        if done % s.eval_every == 0 or done == s.steps:
            held = mx.mean(mx.array([loss_fn(model, eval_x[i : i + 4]) for i in range(0, 8, 4)])).item()
            log(f"target step {done}: held-out loss {held:.3f} (ppl {math.exp(held):.1f})")
        if done % s.checkpoint_every == 0 or done == s.steps:
            ckpt.mkdir(parents=True, exist_ok=True)
            model.save_weights(str(ckpt / "weights.safetensors"))
            mx.save_safetensors(str(ckpt / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
            (ckpt / "state.json").write_text(json.dumps({"step": done}))
    return model


def save_target(model: gemma4.Model, config: dict, out: Path, dtype=mx.float16) -> None:
    """config.json + model.safetensors with the published parameter names (our port's)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
