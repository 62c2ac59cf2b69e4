"""Does "auto" recover after a run on a loaded machine poisoned the policy kept on disk?

1. A first `mlx-specdec generate` (auto) on a code prompt while processes hog every core;
   it keeps what it measured on disk, as every run does.
2. The hogs stop; more `generate` runs on code prompts, each a new process starting from the
   kept policy. Reported per run: whether it started from disk, the k it chose per round, and
   whether it drafted within its first 64 tokens.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python bench/recovery.py \\
        --out bench/results/recovery.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["def median(data):", "class LRUCache:\n    def __init__(self, size):", "def parse_args(argv=None):"]
CLI = [sys.executable, "-m", "mlx_specdec.commands.cli", "generate", "--ignore-chat-template", "--json",
       "--max-tokens", "64"]


def generate(prompt: str, env: dict) -> dict:
    out = subprocess.run(CLI + [prompt], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hogs", type=int, default=(os.cpu_count() or 2) * 2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    lines = [f"command: `{' '.join(sys.argv)}`", "",
             "| run | machine | policy from disk | tok/s | rounds by k (first 64 tokens) | drafted |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MLX_SPECDEC_CACHE=cache, PYTHONPATH=str(root))
        busy = hogs(args.hogs)
        try:
            time.sleep(1)
            runs = [("loaded", generate(PROMPTS[0], env))]
        finally:
            for p in busy:
                p.kill()
                p.wait()
        for i in range(args.runs):
            runs.append(("quiet", generate(PROMPTS[(i + 1) % len(PROMPTS)], env)))
    for i, (machine, result) in enumerate(runs, 1):
        stats = result["stats"]
        hist = stats["k_histogram"]
        drafted = any(int(k) > 0 for k in hist)
        lines.append(f"| {i} | {machine} | {stats['policy_kept']} | {stats['tokens_per_second']:.1f} | "
                     f"{', '.join(f'k={k}: {n}' for k, n in hist.items())} | {'yes' if drafted else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
