"""Where a batch's decode time goes when its rows finish apart.

Rows of one batch accept different shares of their drafts (each is a prompt of its own), so
with drafting they reach their last token in different rounds, and the batch runs on with the
rows that are left: rounds that cost nearly what a full batch's does for fewer tokens. Plain
decoding moves every row one token a round, so rows with the same number of tokens to go finish
together. The draft policy weighs a round at the batch size it decides for and cannot see that
tail, which is where drafting that breaks even round for round loses to plain decoding.

Each mode runs the same rows (slices of one Python source file through the demo pair's
tokenizer, as `bench/peers.py` writes its prompts) to ``--max-tokens`` with EOS ignored, the
modes taking turns run by run; per mode: its speed against plain decoding (median of the
run-by-run ratios of decode time, with their range), its speed round for round while the whole
batch ran (tokens a round, each row at its own average, over the time a round took until the
first row finished; against plain decoding's, median), the round in which each row finished and
the share of its drafts it accepted (in the last run; the same in every run of a fixed k, greedy
decoding being deterministic), and the tail: the share of the batch's decode time after
its first row finished (median and range). "auto" has a policy of its own, fresh when the
script starts and learning through the warm-up runs, as in `mlx-specdec bench`.

    python bench/batch_tail.py                                   # 512-token prompts, B = 4
    python bench/batch_tail.py --prompt 32 --modes 0,1,3,auto
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import peers  # bench/peers.py: the same prompts

from mlx_specdec import generate_batch, load
from mlx_specdec.demo import demo_path
from mlx_specdec.policy import DraftPolicy


def one_run(model, prompts: list[list[int]], max_tokens: int, mode) -> dict:
    rows = [r.stats for r in generate_batch(model, prompts, max_tokens=max_tokens, draft_tokens=mode)]
    # A row's decode_seconds add up the rounds it was in: the batch's time is its last row's.
    seconds = [s.decode_seconds for s in rows]
    last = max(rows, key=lambda s: s.decode_seconds)  # in every round of the batch
    first = min(rows, key=lambda s: s.decode_seconds)  # every round of its life had the whole batch
    # Tokens a round of the whole batch: each row's own average (the first token is the prefill's).
    per_round = sum((s.generated_tokens - 1) / s.rounds for s in rows if s.rounds)
    return dict(seconds=max(seconds), tail=1.0 - min(seconds) / max(seconds), rounds=[s.rounds for s in rows],
                full=per_round * first.rounds / first.decode_seconds if first.decode_seconds else 0.0,
                acceptance=[s.acceptance_rate for s in rows], k_histogram=dict(sorted(last.k_histogram.items())))


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=512, help="prompt length in tokens")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every mode first")
    p.add_argument("--modes", default="0,1,2,auto", help="0 (plain), fixed k and auto; plain is always run")
    args = p.parse_args(argv)
    modes = [m if m == "auto" else int(m) for m in args.modes.split(",")]
    modes = [0] + [m for m in modes if m != 0]
    spec = load(demo_path(), dtype="float32", policy_cache=False)
    spec = dataclasses.replace(spec, eos_token_ids=frozenset())  # every mode times the same tokens
    prompts = [peers.make_prompt(spec, args.prompt, row) for row in range(args.batch)]
    auto = dataclasses.replace(spec, policy=DraftPolicy())  # learns from scratch in the warm-up, as in bench
    runs: dict = {m: [] for m in modes}
    for i in range(args.warmup + args.repeats):
        for mode in modes:
            got = one_run(auto if mode == "auto" else spec, prompts, args.max_tokens, mode)
            if i >= args.warmup:
                runs[mode].append(got)
    command = " ".join(["python", f"bench/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"command: `{command}`",
             f"demo pair, {args.batch} rows of {args.prompt} prompt tokens, {args.max_tokens} tokens each, "
             f"{args.repeats} runs a mode after {args.warmup} warm-up, taking turns", "",
             "| mode | vs plain (min-max) | round for round | rows finished in round | rows' acceptance "
             "| tail share of time (min-max) "
             "| k chosen (rounds of the last row) |", "|---|---|---|---|---|---|---|"]
    for mode in modes:
        got = runs[mode]
        ratios = [p["seconds"] / r["seconds"] for p, r in zip(runs[0], got)]
        rounds = [r["full"] / p["full"] for p, r in zip(runs[0], got)]
        tails = [r["tail"] for r in got]
        last = got[-1]
        lines.append(f"| {'plain' if mode == 0 else mode if mode == 'auto' else f'k={mode}'} "
                     f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
                     f"| {statistics.median(rounds):.2f}x "
                     f"| {', '.join(map(str, last['rounds']))} "
                     f"| {', '.join(f'{a:.2f}' for a in last['acceptance']) if mode else '-'} "
                     f"| {statistics.median(tails):.2f} ({min(tails):.2f}-{max(tails):.2f}) "
                     f"| {last['k_histogram'] if mode == 'auto' else '-'} |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
