"""The demo pair's held-out evaluation (build_demo.py's "eval" stage).

Everything runs on held-out text: code continuation prompts from the HELD_OUT stdlib modules
and questions about them in the chat template. Measures, with the shipped pair as `load()`
returns it:
  * greedy acceptance per draft position: teacher-forced and in the real loop (k = 4);
  * decode speed, plain (draft_tokens=0) against k = 1..4 and "auto", prompts interleaved so
    that load from other processes hits every setting alike; every speculative output is
    checked token-for-token against the plain one;
  * the quantized-target experiment: the target quantized in memory to 8, 4 and 3 bits, the
    shipped drafter's acceptance against it, then distilled against it, acceptance again.
"""

from __future__ import annotations

import json
import time

import numpy as np

import demo_corpus

CODE_PROMPTS = 12
PROMPT_TOKENS = 96
NEW_TOKENS = 96
CHAT_PROMPTS = 8
SPEED_SETTINGS = (0, 1, 2, 3, 4, "auto")
SPEED_REPEATS = 2  # passes over the prompts: the machine is shared, its load drifts
QUANT_GROUP = 64


def code_prompts(spec, corpus, seed: int) -> list[list[int]]:
    """PROMPT_TOKENS-token windows of the held-out modules, each starting at a line start."""
    rng = np.random.default_rng([seed, 7])
    out = []
    modules = corpus.held_out_code
    for i in range(CODE_PROMPTS):
        _, src = modules[i % len(modules)]
        lines = src.splitlines(keepends=True)
        for _ in range(100):
            start = int(rng.integers(0, max(1, len(lines) - 40)))
            ids = spec.tokenizer.encode("".join(lines[start:]))
            if len(ids) > PROMPT_TOKENS + NEW_TOKENS:
                break
        out.append(ids[:PROMPT_TOKENS])
    return out


def chat_prompts(spec, corpus, seed: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, 8])
    picks = rng.choice(len(corpus.held_out_qa), CHAT_PROMPTS, replace=False)
    return [list(spec.tokenizer.apply_chat_template([{"role": "user", "content": corpus.held_out_qa[i][0]}],
                                                    add_generation_prompt=True)) for i in picks]


def loop_acceptance(spec, prompts, k: int, max_tokens: int = NEW_TOKENS) -> dict:
    from mlx_specdec.commands import distill as D

    acc = D.evaluate_loop(spec, spec.drafter, prompts, k, max_tokens)
    return {"by_position": acc.by_position, "reached": acc.reached, "E(k)": acc.expected_tokens_per_round}


def teacher_forced(spec, held_tokens: np.ndarray, seed: int, steps: int = 4) -> dict:
    import mlx.core as mx

    from mlx_specdec.commands import distill as D

    rng = np.random.default_rng([seed, 9])
    starts = rng.integers(0, len(held_tokens) - 257, 16)
    seqs = mx.array(np.stack([held_tokens[s : s + 256] for s in starts]))
    acc = D.evaluate_teacher_forced(spec, spec.drafter, seqs, steps)
    return {"by_position": acc.by_position, "reached": acc.reached}


def speed(spec, prompts, log) -> dict:
    """Decode tokens/s per draft setting, over all prompts, prompts interleaved."""
    from mlx_specdec import generate

    generate(spec, prompts[0], max_tokens=16, draft_tokens=0)  # warm-up
    generate(spec, prompts[0], max_tokens=16, draft_tokens=2)
    totals = {str(k): [0, 0.0] for k in SPEED_SETTINGS}
    hist = {}
    for p in [p for _ in range(SPEED_REPEATS) for p in prompts]:
        plain = None
        for k in SPEED_SETTINGS:
            r = generate(spec, p, max_tokens=NEW_TOKENS, draft_tokens=k)
            if k == 0:
                plain = r.tokens
            elif r.tokens != plain:
                raise AssertionError(f"draft_tokens={k} changed the greedy output")
            totals[str(k)][0] += r.stats.generated_tokens - 1
            totals[str(k)][1] += r.stats.decode_seconds
            if k == "auto":
                for kk, n in r.stats.k_histogram.items():
                    hist[kk] = hist.get(kk, 0) + n
    out = {k: {"tokens": n, "seconds": s, "tokens_per_second": n / s} for k, (n, s) in totals.items()}
    base = out["0"]["tokens_per_second"]
    for k, v in out.items():
        v["speedup"] = v["tokens_per_second"] / base
    out["auto_k_histogram"] = {str(k): v for k, v in sorted(hist.items())}
    log("speed: " + ", ".join(f"k={k} {v['tokens_per_second']:.1f} tok/s ({v['speedup']:.2f}x)"
                              for k, v in out.items() if k != "auto_k_histogram"))
    return out


def quantized(args, corpus, held_tokens, prompts, log, train_drafter) -> dict:
    from mlx_specdec.commands import distill as D
    from mlx_specdec.loading import load, load_drafter

    out = {}
    for bits in args.quant_bits:
        spec = load(args.out, drafter=False)
        D.quantize_target(spec.target, bits, QUANT_GROUP)
        drafter = load_drafter(args.out / "drafter", spec.target, dtype="float32")
        config = json.loads((args.out / "drafter" / "config.json").read_text())
        spec.drafter = drafter
        before = {"loop": loop_acceptance(spec, prompts, 4), "teacher-forced": teacher_forced(spec, held_tokens, args.seed)}
        log(f"{bits}-bit target, shipped drafter: loop a={_fmt(before['loop'])} tf a={_fmt(before['teacher-forced'])}")
        folder = args.work / f"quant{bits}"
        train_drafter(spec, drafter, config, corpus, args, folder, args.quant_steps,
                      evaluate_before=False, lr=args.quant_lr)
        spec.drafter = drafter
        after = {"loop": loop_acceptance(spec, prompts, 4), "teacher-forced": teacher_forced(spec, held_tokens, args.seed)}
        log(f"{bits}-bit target, re-distilled drafter: loop a={_fmt(after['loop'])} tf a={_fmt(after['teacher-forced'])}")
        out[f"{bits}bit"] = {"before": before, "after": after, "steps": args.quant_steps, "lr": args.quant_lr}
    return out


def _fmt(acc: dict) -> str:
    return "/".join(f"{a:.2f}" for a in acc["by_position"])


def run(args, corpus, log, train_drafter) -> dict:
    from mlx_specdec import load

    spec = load(args.out)  # what load() gives with no arguments when args.out is the package's folder
    held_tokens = np.array([t for _, src in corpus.held_out_code for t in spec.tokenizer.encode(src) + [1]])
    code = code_prompts(spec, corpus, args.seed)
    chat = chat_prompts(spec, corpus, args.seed)
    path = args.work / "report.json"
    # A rerun without the quantized experiment (--quant-steps 0) keeps the earlier one.
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update({"python": __import__("sys").version.split()[0], "held_out_modules": list(demo_corpus.HELD_OUT)})
    started = time.perf_counter()
    report["acceptance"] = {
        "code_loop_k4": loop_acceptance(spec, code, 4),
        "chat_loop_k4": loop_acceptance(spec, chat, 4),
        "code_teacher_forced": teacher_forced(spec, held_tokens, args.seed),
    }
    for name, acc in report["acceptance"].items():
        log(f"{name}: a={_fmt(acc)}")
    report["speed_code"] = speed(spec, code, log)
    report["speed_chat"] = speed(spec, chat, log)
    if args.quant_steps:
        report["quantized"] = quantized(args, corpus, held_tokens, code, log, train_drafter)
    report["eval_seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"report written to {path}")
    return report
