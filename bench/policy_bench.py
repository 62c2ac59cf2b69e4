"""Does draft_tokens="auto" pay where drafting pays, and cost nothing where it does not?

Tiny random Gemma 4 models sized so a target pass is memory-bound on this
CPU (as on a Mac GPU). Dense target: a drafter that never agrees must leave
"auto" at >= 0.95x plain decoding; the stand-in drafter that proposes the
target's own continuation (every draft accepted) must make "auto" pick k >= 3
and beat plain. MoE target (64 experts, top 8), with a stand-in drafter whose
drafts are right 40% of the time: verifying k + 1 tokens at B = 1 wakes up to
8(k + 1) experts and costs nearly k + 1 forwards, so drafting does not pay and
"auto" must keep it off at B = 1; at B = 4 the rows already wake most experts,
an extra token per row costs little, and "auto" must turn drafting on. By
measurement alone: nothing tells the policy it is a MoE.

Run with OpenBLAS preloaded (MLX's Linux wheel links a reference BLAS that is
~40x slower):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python bench/policy_bench.py --out bench/results/policy_bench
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_specdec import generate_batch
from mlx_specdec.loading import SpecModel
from mlx_specdec.models import assistant, gemma4

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for its test double:
from tests.stand_in import StandInDrafter  # noqa: E402 - a drafter that proposes the target's own continuation

TARGET = dict(
    vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10, num_attention_heads=8,
    num_key_value_heads=2, head_dim=128, global_head_dim=256, sliding_window=256, final_logit_softcapping=30.0,
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, eos_token_id=None,
    layer_types=["sliding_attention"] * 4 + ["full_attention"] + ["sliding_attention"] * 4 + ["full_attention"],
)
DRAFTER = dict(
    model_type="gemma4_assistant", backbone_hidden_size=1024,
    text_config=dict(
        vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, global_head_dim=256, sliding_window=256,
        layer_types=["full_attention"], hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
    ),
)


# The 26B A4B's shape in miniature: a dense MLP beside a block of many small experts.
MOE_TARGET = dict(
    TARGET, intermediate_size=1024, num_hidden_layers=4, enable_moe_block=True, num_experts=64, top_k_experts=8,
    moe_intermediate_size=512, layer_types=["sliding_attention"] * 3 + ["full_attention"],
)


def random_init(model: nn.Module, seed: int) -> None:
    """Weights of a sensible scale: each matmul output O(1), norms at 1."""
    mx.random.seed(seed)
    scaled = lambda a: mx.random.normal(a.shape) * a.shape[-1] ** -0.5 if a.ndim == 2 else a  # noqa: E731
    model.update(tree_map(scaled, model.parameters()))
    mx.eval(model.parameters())


def build(target_config: dict, seed: int = 0):
    target = gemma4.Model(gemma4.TextConfig.from_dict(target_config))
    random_init(target, seed)
    config = assistant.AssistantConfig.from_dict(DRAFTER)
    drafter = assistant.Drafter(config, target.embed_tokens)
    random_init(drafter, seed + 1)
    return target, drafter


def run(spec, prompts, max_tokens, draft_tokens):
    """Decode tokens/s of one batched generation, and its results."""
    results = generate_batch(spec, prompts, max_tokens=max_tokens, draft_tokens=draft_tokens)
    tokens = sum(r.stats.generated_tokens - 1 for r in results)
    return tokens / max(r.stats.decode_seconds for r in results), results


def summary(speeds, ratios, results):
    k_hist: dict[int, int] = {}
    for r in results:
        for k, n in r.stats.k_histogram.items():
            k_hist[k] = k_hist.get(k, 0) + n
    accepted = sum(r.stats.accepted for r in results)
    drafted = sum(r.stats.drafted for r in results)
    return {
        "tokens_per_second": statistics.median(speeds),
        "speedup": statistics.median(ratios),
        "runs": speeds,
        "k_histogram": dict(sorted(k_hist.items())),
        "acceptance": accepted / drafted if drafted else None,
        "off_reason": results[0].stats.off_reason,
    }


def cases(kind: str, target, drafter, prompts: list[list[int]], max_tokens: int):
    """Plain decoding and the (name, model, draft_tokens) cases run against it."""
    plain = SpecModel(target=target, drafter=None, tokenizer=None)
    # The stand-in needs each row's plain continuation to propose it.
    continuations = generate_batch(plain, prompts, max_tokens=max_tokens + 16, draft_tokens=0)
    seqs = [p + r.tokens + [3] * 16 for p, r in zip(prompts, continuations)]
    if kind == "moe":
        weak = SpecModel(target=target, drafter=StandInDrafter(target, seqs, error_rate=0.6), tokenizer=None)
        return plain, [("40%-agreeing drafter, auto", weak, "auto"), ("40%-agreeing drafter, k=2", weak, 2)]
    never = SpecModel(target=target, drafter=drafter, tokenizer=None)
    perfect = SpecModel(target=target, drafter=StandInDrafter(target, seqs), tokenizer=None)
    return plain, [
        ("never-agreeing drafter, auto", never, "auto"),
        ("never-agreeing drafter, k=3", never, 3),
        ("perfect drafter, auto", perfect, "auto"),
        ("perfect drafter, k=3", perfect, 3),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="dense,moe")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args()

    rows, sizes = [], {}
    for kind in args.targets.split(","):
        target, drafter = build({"dense": TARGET, "moe": MOE_TARGET}[kind])
        sizes[kind] = sum(a.size for _, a in tree_flatten(target.parameters()))
        rng = np.random.default_rng(0)
        for B in [int(b) for b in args.batch_sizes.split(",")]:
            prompts = [[int(t) for t in rng.integers(3, 8192, size=24 + 8 * i)] for i in range(B)]
            plain, named = cases(kind, target, drafter, prompts, args.max_tokens)
            # One warm-up each ("auto" measures its costs there), then the cases take turns with plain
            # decoding in every repeat, so a load that drifts hits them alike; the speedup is the
            # median of per-repeat ratios to the plain run just before.
            for _, spec, mode in [("plain", plain, 0)] + named:
                run(spec, prompts, args.max_tokens, mode)
            speeds = {name: [] for name, _, _ in named}
            ratios = {name: [] for name, _, _ in named}
            plain_speeds, last = [], {}
            for _ in range(args.repeats):
                for name, spec, mode in named:
                    base, _ = run(plain, prompts, args.max_tokens, 0)
                    speed, last[name] = run(spec, prompts, args.max_tokens, mode)
                    plain_speeds.append(base)
                    speeds[name].append(speed)
                    ratios[name].append(speed / base)
            plain_median = statistics.median(plain_speeds)
            for name, spec, mode in named:
                r = summary(speeds[name], ratios[name], last[name])
                r.update(target=kind, batch_size=B, case=name, plain_tokens_per_second=plain_median)
                if mode == "auto":  # the verify costs the policy measured, relative to one token
                    one = spec.policy.costs.verify_time(B, 1)
                    r["verify_cost"] = {n: spec.policy.costs.verify_time(B, n) / one for n in (2, 3, 5, 9)}
                rows.append(r)
                print(f"{kind} B={B} {name:30s} {r['tokens_per_second']:7.1f} tok/s  x{r['speedup']:.2f} plain "
                      f"({plain_median:.1f})  k={r['k_histogram']}  acc={r['acceptance']}  "
                      f"verify/1={r.get('verify_cost')}", flush=True)

    env = {
        "mlx": mx.__version__, "device": str(mx.default_device()), "machine": platform.machine(),
        "target_parameters": sizes, "dtype": "float32", "max_tokens": args.max_tokens, "repeats": args.repeats,
        "command": " ".join(["LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python",
                             "bench/policy_bench.py", *map(shlex.quote, sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        described = ", ".join(f"{kind} target {n / 1e6:.0f}M params" for kind, n in sizes.items())
        lines = [f"Command: `{env['command']}` ({env['date']}, MLX {env['mlx']} {env['device']}, fp32, "
                 f"{described}, {args.max_tokens} new tokens per row, median of {args.repeats} runs)", "",
                 "| target | B | case | tok/s | vs plain | k chosen (rounds) | acceptance | "
                 "verify 2/3/5/9 tokens vs 1 (auto's measurements) |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
            cost = " / ".join(f"{c:.2f}" for c in r["verify_cost"].values()) if "verify_cost" in r else ""
            lines.append(f"| {r['target']} | {r['batch_size']} | {r['case']} | {r['tokens_per_second']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['k_histogram']} | {acc} | {cost} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
