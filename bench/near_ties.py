"""How often a greedy token flips between batch shapes: what "identical" can promise.

Greedy decoding takes the argmax of float32 logits, and the same logits computed in another
shape (a row alone or among others in a batch; one token per pass, or k + 1 tokens in a
speculative verify pass) differ in their last bits, because the matmuls sum in another order.
Where the top two logits are closer than that difference, the argmax can flip. This measures it
on the same tokens, teacher-forced, against plain greedy decoding of each row alone, one token
per pass (the reference, run free):

- batch: the rows decoded together, B at a time, one token per pass (plain batched decoding);
- verify: each row alone, k + 1 tokens per pass (the shape of a speculative verify);
- verify, batch: both.

Per shape: how many positions' argmax differs from the reference, the largest and median
|logit difference|, and how many positions have a top-two gap smaller than the largest
difference seen (the ones that could flip):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python bench/near_ties.py --out bench/results/near_ties.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
import numpy as np

from mlx_specdec import load
from mlx_specdec.cache import Cache, Step
from mlx_specdec.commands.bench import WORKLOADS_FILE
from mlx_specdec.decode import new_cache
from mlx_specdec.loading import SpecModel
from mlx_specdec.models import gemma4


def prompts(spec, n_random: int, seed: int) -> list[list[int]]:
    """The bench workloads' prompts (raw text), and random-id prompts, whose flatter
    distributions make near-ties likelier."""
    texts = [p for w in json.loads(WORKLOADS_FILE.read_text())["workloads"] for p in w["prompts"]]
    out = [list(spec.tokenizer.encode(t)) for t in texts] if spec.tokenizer is not None else []
    rng = np.random.default_rng(seed)
    vocab = spec.target.config.vocab_size
    out += [rng.integers(10, vocab, size=int(rng.integers(8, 40))).tolist() for _ in range(n_random)]
    return out


INIT_STD = 0.02
NEAR = 0.05  # logits: the gaps counted as "near zero" for the density


def random_model(seed: int) -> SpecModel:
    """An untrained Gemma 4 target: its logits are nearly flat, so near-ties are common, as on
    the tests' tiny random checkpoints."""
    mx.random.seed(seed)
    config = gemma4.TextConfig.from_dict(dict(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, global_head_dim=128, sliding_window=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, final_logit_softcapping=30.0))
    model = gemma4.Model(config)
    # Matrices drawn as transformers initialises them (normal, std 0.02), as in the tests'
    # checkpoints; the norms keep their initial scales.
    model.update(tree_map(lambda w: mx.random.normal(w.shape) * INIT_STD if w.ndim >= 2 else w, model.parameters()))
    mx.eval(model.parameters())
    return SpecModel(target=model, drafter=None, tokenizer=None)


def run(spec, rows: list[list[int]], feed: list[list[int]] | None, new_tokens: int, chunk: int) -> np.ndarray:
    """Logits (B, new_tokens, V) for rows decoded together: the prompt's prefill predicts
    token 0; then ``chunk`` tokens per pass. With ``feed`` the tokens fed are those
    (teacher-forced); without, the argmax (free greedy decoding, chunk 1)."""
    target, B = spec.target, len(rows)
    out, caches, first = [], [], []
    # Prompts differ in length: each is prefilled alone, then the rows share every pass (each
    # at its own positions), as in the decode loop.
    for prompt in rows:
        c = new_cache(spec, 1)
        h = target(mx.array([prompt]), Step((0,), len(prompt)), c)
        first.append(target.logits(h[:, -1:]))
        mx.eval(first[-1], *c.arrays())
        caches.append(c)
    cache = Cache.stack(caches) if B > 1 else caches[0]
    out.append(mx.concatenate(first, axis=0))
    pos = [len(p) for p in rows]
    done = 1
    tokens = [[int(mx.argmax(out[0][b, -1]))] if feed is None else [feed[b][0]] for b in range(B)]
    while done < new_tokens:
        n = min(chunk, new_tokens - done)
        if feed is None:
            step_tokens = [[t[-1]] for t in tokens]
        else:
            step_tokens = [f[done - 1: done - 1 + n] for f in feed]
        logits = target.logits(target(mx.array(step_tokens), Step(tuple(pos), n), cache))
        mx.eval(logits)
        out.append(logits)
        pos = [p + n for p in pos]
        if feed is None:
            for b in range(B):
                tokens[b].append(int(mx.argmax(logits[b, -1])))
        done += n
    return np.array(mx.concatenate(out, axis=1).astype(mx.float32))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded demo model")
    parser.add_argument("--random-model", action="store_true", help="an untrained random target instead")
    parser.add_argument("--random-prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="verify passes of k + 1 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = parser.parse_args(argv)
    spec = random_model(args.seed) if args.random_model else load(args.model, drafter=False, policy_cache=False)
    rows = prompts(spec, args.random_prompts, args.seed)

    # The reference: each row alone, plain greedy, one token per pass, run free.
    reference = [run(spec, [p], None, args.new_tokens, 1)[0] for p in rows]
    ref_tokens = [r.argmax(-1).tolist() for r in reference]
    order = [np.argsort(r, axis=-1)[:, -2:] for r in reference]  # (second, first) per position
    top2 = [np.take_along_axis(r, o, -1) for r, o in zip(reference, order)]
    gaps = np.concatenate([t[:, 1] - t[:, 0] for t in top2])
    # Near zero the gaps are spread about evenly, so their density there, times how far a shape
    # moves a gap, estimates the flips per position where too few happen to count.
    density = float((gaps < NEAR).mean() / NEAR)

    shapes = {"batch": (args.batch, 1), "verify": (1, args.k + 1), "verify, batch": (args.batch, args.k + 1)}
    results = {}
    for name, (batch, chunk) in shapes.items():
        logits = []
        for i in range(0, len(rows), batch):
            group = list(range(i, min(i + batch, len(rows))))
            got = run(spec, [rows[g] for g in group], [ref_tokens[g] for g in group], args.new_tokens, chunk)
            logits += list(got)
        diff = np.concatenate([np.abs(a - b).max(-1) for a, b in zip(logits, reference)])
        # How much this shape moved each position's top-two gap: a flip needs a move past the gap.
        moved = np.concatenate([np.abs(np.take_along_axis(a - b, o, -1) @ np.array([-1.0, 1.0]))
                                for a, b, o in zip(logits, reference, order)])
        flips = sum(int((a.argmax(-1) != np.array(t)).sum()) for a, t in zip(logits, ref_tokens))
        rows_flipped = sum(int((a.argmax(-1) != np.array(t)).any()) for a, t in zip(logits, ref_tokens))
        results[name] = dict(flips=flips, rows=rows_flipped, max_diff=float(diff.max()),
                             median_diff=float(np.median(diff)), mean_moved=float(moved.mean()),
                             could_flip=int((gaps <= moved).sum()),
                             expected=float(density * moved.mean() * len(gaps)))
        print(name, results[name], flush=True)

    positions = len(gaps)
    name = "an untrained random target" if args.random_model else args.model or "the embedded demo model"
    lines = [
        f"Model: {name} (float32, {mx.default_device()}); "
        f"{len(rows)} prompts ({len(rows) - args.random_prompts} bench workload prompts, {args.random_prompts} "
        f"random-id), {args.new_tokens} greedy tokens each: {positions} positions, teacher-forced on plain greedy "
        "decoding of each row alone, one token per pass.",
        f"Top-two logit gap over those positions: median {np.median(gaps):.3g}, smallest {gaps.min():.3g}; "
        f"{int((gaps < 1e-4).sum())} below 1e-4, {int((gaps < 1e-5).sum())} below 1e-5.",
        "",
        f"{int((gaps < NEAR).sum())} positions have a gap below {NEAR}, a density of {density:.3g} per unit of "
        "logit near zero.",
        "",
        "| shape | argmax flips | rows with a flip | max abs logit difference | median | mean change of the "
        "top-two gap | positions whose gap it crossed | flips expected from the gap density |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (batch, chunk) in shapes.items():
        r = results[name]
        lines.append(f"| {name} (B={batch}, {chunk} token{'s' if chunk > 1 else ''} per pass) | {r['flips']} of "
                     f"{positions} | {r['rows']} of {len(rows)} | {r['max_diff']:.3g} | {r['median_diff']:.3g} | "
                     f"{r['mean_moved']:.3g} | {r['could_flip']} | {r['expected']:.2g} (1 in "
                     f"{positions / r['expected'] if r['expected'] else float('inf'):.3g} positions) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python bench/near_ties.py " + \
            " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(f"Command: `{command}`\n\n" + text)
    return results


if __name__ == "__main__":
    main()
