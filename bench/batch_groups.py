"""Which draft length pays in each static batch of a workload, and what auto drafted there.

`mlx-specdec bench` sends a workload's prompts ``--batch`` at a time (it fills a last short batch
from the first prompts again; this script leaves it short): each group is a static batch
whose rows finish apart when drafting moves them by their own accepted drafts (see
`bench/batch_tail.py`). A cell's speed is the sum of its groups', and the best fixed k of the
cell need not be the best in every group: rows whose drafts are accepted alike finish nearly
together, rows that differ drift apart, the more the deeper the drafts. This script times every
group apart, as `mlx-specdec bench` runs it (EOS ends a row; greedy answers are the same in every
mode) with the modes taking turns run by run, and reports per group
and mode: the speed against plain decoding (median of the run-by-run ratios of decode time, with
their range), the share of decode time the policy counted as lost to rows finishing apart per
unit of their spread (`DraftPolicy.record_finish`, median over runs: the quantity the policy
keeps one median of, over the last FINISH_SAMPLES batches), and for auto the lengths it chose
(rows' rounds, all runs, as the bench's "auto chose"). "auto" has one policy through all groups and runs,
fresh when the script starts and learning through the warm-up, as in `mlx-specdec bench`.

    python bench/batch_groups.py --workload-file bench/workloads_wide.json --workload code
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
import sys
from pathlib import Path

from mlx_specdec import generate_batch, load
from mlx_specdec.commands.bench import encode_prompts, load_workloads
from mlx_specdec.demo import demo_path
from mlx_specdec.policy import DraftPolicy, loss_per_spread


class LoggedPolicy(DraftPolicy):
    """A policy that also keeps every static batch's loss per unit of spread, in order."""

    def __init__(self):
        super().__init__()
        self.per_spread: list[float] = []

    def record_finish(self, batch_size: int, lost: float, spread: float) -> None:
        self.per_spread.append(loss_per_spread(lost, spread))
        super().record_finish(batch_size, lost, spread)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload-file", default=None, help="as `mlx-specdec bench --workload-file`; default built-in")
    p.add_argument("--workload", default="code")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=None, help="default: the workload's, else 48")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every mode first")
    p.add_argument("--modes", default="1,3,auto", help="fixed k and auto; plain is always run")
    args = p.parse_args(argv)
    modes = [0] + [m if m == "auto" else int(m) for m in args.modes.split(",") if m not in ("0", "plain")]
    spec = load(demo_path(), dtype="float32", policy_cache=False)
    workload = load_workloads(args.workload_file, names=[args.workload])[0]
    max_tokens = args.max_tokens or workload.max_tokens or 48
    prompts = encode_prompts(spec, workload)
    groups = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    policies = {m: LoggedPolicy() for m in modes}  # fixed k too: its batches' losses are logged alike
    seconds = {(m, g): [] for m in modes for g in range(len(groups))}
    per_spread = {(m, g): [] for m in modes for g in range(len(groups))}
    chosen = [collections.Counter() for _ in groups]
    for i in range(args.warmup + args.repeats):
        for mode in modes:
            model = dataclasses.replace(spec, policy=policies[mode])
            for g, group in enumerate(groups):
                logged = len(policies[mode].per_spread)
                rows = [r.stats for r in generate_batch(model, group, max_tokens=max_tokens, draft_tokens=mode)]
                if i < args.warmup:
                    continue
                seconds[(mode, g)].append(max(s.decode_seconds for s in rows))  # the last row's: every round
                per_spread[(mode, g)] += policies[mode].per_spread[logged:]
                if mode == "auto":
                    for s in rows:
                        chosen[g].update(s.k_histogram)
    command = " ".join(["python", f"bench/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)])
    names = {m: "plain" if m == 0 else m if m == "auto" else f"k={m}" for m in modes}
    lines = [f"command: `{command}`",
             f"demo pair, workload {args.workload} ({len(prompts)} prompts) in {len(groups)} batches of up to "
             f"{args.batch}, up to {max_tokens} tokens a row, {args.repeats} runs a mode after "
             f"{args.warmup} warm-up, taking turns", "",
             "| batch | " + " | ".join(f"{names[m]} vs plain" for m in modes[1:]) + " | "
             + " | ".join(f"{names[m]} lost / spread" for m in modes[1:]) + " | auto chose |",
             "|---" * (2 * len(modes)) + "|"]

    def runs(mode, g=None) -> list[float]:
        """Each run's decode seconds of one batch, or of all of them."""
        return seconds[(mode, g)] if g is not None else [sum(t) for t in zip(*(seconds[(mode, h)] for h in range(len(groups))))]

    def versus(mode, g=None) -> str:
        ratios = [a / b for a, b in zip(runs(0, g), runs(mode, g)) if a > 0 and b > 0]  # 0: every row ended at its prefill
        if not ratios:
            return "-"
        return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"

    for g in range(len(groups)):
        losses = [f"{statistics.median(per_spread[(m, g)]):.2f}" if per_spread[(m, g)] else "-" for m in modes[1:]]
        total = sum(chosen[g].values())
        mix = ", ".join(f"k={k}: {n / total:.0%}" for k, n in chosen[g].most_common(3)) if total else "-"
        lines.append(f"| {g} | " + " | ".join(versus(m, g) for m in modes[1:]) + " | " + " | ".join(losses)
                     + f" | {mix} |")
    lines.append("| all | " + " | ".join(versus(m) for m in modes[1:]) + " |" + " |" * len(modes))
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
