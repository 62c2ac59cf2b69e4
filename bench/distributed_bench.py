"""Tokens/s and the cost of the all-reduces per round, with the models in 1 and in 2 processes.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python bench/distributed_bench.py --out bench/results/distributed_bench.md

Launches itself alternately alone and under `mlx.launch -n 2 --backend ring` (two processes on
this machine, over the loopback), --launches times each; every launch loads the model (the
embedded demo pair unless --model), checks its greedy output against the first launch's, and
times greedy generation plainly (k=0), at a fixed k and with auto, --repeats times each in turn.
The 2-process launches also time one all-reduce of a verify step's hidden states (B x (k+1) x
hidden, fp32), evaluated alone as the model evaluates each (the next layer needs it), and count
the all-reduces of a round: two per target layer, two per drafter layer and step, and the loop's
agreements (the decision, the drafts, the accepted tokens). On one machine both processes share
its cores, so speed is not the point here: correctness, memory and the all-reduces' cost are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGREEMENTS_PER_ROUND = 3  # the decision, the drafts, the accepted tokens (decode.py)
PROMPTS = ["Describe the json module.", "What does itertools.chain do?"]


def _time_allreduce(group, shape, tries: int) -> float:
    import mlx.core as mx

    x = mx.ones(shape)
    mx.eval(mx.distributed.all_sum(x, group=group))  # the first one sets up buffers
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args) -> None:
    import mlx.core as mx

    from mlx_specdec import distributed, generate, load

    group = distributed.world()
    # Every answer runs to --max-tokens (EOS ignored, as `bench` does), so all modes time the same tokens.
    spec = replace(load(args.model, policy_cache=False, group=group), eos_token_ids=frozenset())
    prompts = [spec.tokenizer.encode(p) for p in PROMPTS]
    modes = [0, args.k, "auto"]
    result = {"processes": 1 if group is None else group.size(), "footprint": spec.footprint.as_dict(),
              "tokens": {}, "tokens_per_second": {str(m): [] for m in modes},
              "cpu_seconds": {str(m): [] for m in modes}, "rounds": {str(m): 0 for m in modes}}
    for i in range(args.warmup + args.repeats):
        for mode in modes:  # modes take turns, run by run
            wall, cpu, tokens, rounds = 0.0, 0.0, [], 0
            for ids in prompts:
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                out = generate(spec, ids, max_tokens=args.max_tokens, draft_tokens=mode)
                cpu += time.process_time() - cpu_start
                wall += time.perf_counter() - wall_start
                tokens.append(out.tokens)
                rounds += out.stats.rounds
            if i >= args.warmup:
                generated = sum(len(t) for t in tokens)  # end to end: the prefill's time and token count
                result["tokens_per_second"][str(mode)].append(generated / wall)
                result["cpu_seconds"][str(mode)].append(cpu)
                result["rounds"][str(mode)] = rounds
                result["tokens"][str(mode)] = tokens
    config, drafter = spec.target.config, spec.drafter
    result["allreduces_per_round"] = {
        "target": 2 * config.num_hidden_layers,
        "drafter_per_step": 2 * (drafter.config.text.num_hidden_layers if drafter else 0),
        "agreements": AGREEMENTS_PER_ROUND,
    }
    if group is not None:
        shape = (1, args.k + 1, config.hidden_size)
        result["allreduce_seconds"] = _time_allreduce(group, shape, tries=200)
        result["allreduce_shape"] = list(shape)
    if distributed.is_main(group):
        Path(args.worker).write_text(json.dumps(result))


def _launch(processes: int, args, out: Path) -> dict:
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--max-tokens", str(args.max_tokens),
          "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--k", str(args.k)]
    if args.model:
        me += ["--model", args.model]
    if processes > 1:
        me = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(processes), "--backend", "ring", *me]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(me, check=True, cwd=ROOT, env=env, timeout=1800)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="target folder (default: the embedded demo pair)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--launches", type=int, default=2, help="launches of each process count, alternating")
    parser.add_argument("--k", type=int, default=3, help="the fixed draft length timed beside plain and auto")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here (and .json beside)")
    parser.add_argument("--report-from", type=Path, default=None, help="render the table from a saved .json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        for key in ("max_tokens", "repeats", "launches", "k"):
            setattr(args, key, saved["args"][key])
        print("\n".join(_report({int(p): r for p, r in saved["runs"].items()}, args, saved["args"].get("command"))))
        return

    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.launches):
            for processes in (1, 2):
                runs[processes].append(_launch(processes, args, Path(tmp, f"{processes}-{i}.json")))
    reference = runs[1][0]["tokens"]
    for processes, launches in runs.items():
        for r in launches:
            for mode, tokens in r["tokens"].items():
                if tokens != reference["0"]:
                    sys.exit(f"{processes} processes, mode {mode}: output differs from plain single-process greedy")
    lines = _report(runs, args)
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"args": vars(args) | {"out": str(args.out), "command": _command()}, "runs": runs}, indent=1, default=str))


def _command() -> str:
    preload = os.environ.get("LD_PRELOAD")
    return (f"LD_PRELOAD={preload} " if preload else "") + "python bench/distributed_bench.py " + " ".join(sys.argv[1:])


def _report(runs: dict[int, list[dict]], args, command: str | None = None) -> list[str]:
    def spread(values):
        return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"

    mb = 1024 * 1024
    lines = ["# Sharded over 2 processes vs 1, on this machine", "",
             "```", command or _command(), "```", "",
             f"Greedy, {len(PROMPTS)} prompts x {args.max_tokens} tokens (EOS ignored), tokens/s end to end (prefill included), median of {args.repeats} runs per launch "
             f"over {args.launches} launches (min–max); output checked identical across modes and process counts.",
             "", "| processes | mode | tok/s | CPU s per run | rounds | weights per process | active after load |",
             "|---|---|---|---|---|---|---|"]
    for processes, launches in runs.items():
        fp = launches[0]["footprint"]
        for mode in launches[0]["tokens_per_second"]:
            tps = [t for r in launches for t in r["tokens_per_second"][mode]]
            cpu = [c for r in launches for c in r["cpu_seconds"][mode]]
            label = {"0": "plain", "auto": "auto"}.get(mode, f"k={mode}")
            lines.append(f"| {processes} | {label} | {spread(tps)} | {statistics.median(cpu):.2f} | "
                         f"{launches[0]['rounds'][mode]} | {fp['weight_bytes'] / mb:.2f} MB | "
                         f"{fp['active_bytes'] / mb:.2f} MB |")
    two = runs[2]
    per = two[0]["allreduces_per_round"]
    latency = statistics.median(r["allreduce_seconds"] for r in two)
    k = args.k
    count = per["target"] + k * per["drafter_per_step"] + per["agreements"]
    tps_k = statistics.median(t for r in two for t in r["tokens_per_second"][str(k)])
    rounds_k = two[0]["rounds"][str(k)]
    tokens_k = sum(len(t) for t in two[0]["tokens"][str(k)])
    round_seconds = tokens_k / tps_k / rounds_k  # prefill included: an upper bound
    one = runs[1]
    tps_one = statistics.median(t for r in one for t in r["tokens_per_second"][str(k)])
    round_one = sum(len(t) for t in one[0]["tokens"][str(k)]) / tps_one / one[0]["rounds"][str(k)]
    implied = (round_seconds - round_one) / count
    lines += ["", f"All-reduces per round at k={k}: {per['target']} in the verify pass (2 per target layer), "
              f"{k} x {per['drafter_per_step']} in the drafter's steps, {per['agreements']} agreements = {count}. "
              f"One all-reduce of {tuple(two[0]['allreduce_shape'])} fp32, timed alone back to back, took "
              f"{latency * 1e6:.0f} µs here (median of 200, 2 processes over the loopback): "
              f"{count * latency * 1e3:.1f} ms per round. Inside a round each one is a point where both "
              f"processes must be running at once; a round took {round_seconds * 1e3:.0f} ms with 2 processes "
              f"against {round_one * 1e3:.0f} ms with 1, about {implied * 1e3:.0f} ms per all-reduce, which is "
              f"the wait for the other process to be scheduled on this shared, loaded machine, not the transfer."]
    return lines


if __name__ == "__main__":
    main()
