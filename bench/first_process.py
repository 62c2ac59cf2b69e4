"""What a short answer costs in a brand-new process: `mlx-specdec generate` on the demo model with
draft-tokens auto and nothing kept on disk yet, then the next processes (which read what the first
kept), against plain decoding in a fresh process. Each run is its own process, as a user's is.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 nice -n -10 \\
        python bench/first_process.py --out bench/results/first_process.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Raw code to continue: the demo answers a chat question in a handful of tokens, too few to time.
PROMPT = "def median(data):"


def generate(cache: str, draft: str, max_tokens: int) -> dict:
    env = {**os.environ, "MLX_SPECDEC_CACHE": cache}
    out = subprocess.run([sys.executable, "-m", "mlx_specdec.commands.cli", "generate", "--ignore-chat-template", "--prompt", PROMPT,
                          "--max-tokens", str(max_tokens), "--draft-tokens", draft, "--json"],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5, help="fresh caches (each: plain, then auto x3)")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"plain, fresh process": [], "auto, first process (nothing kept)": [],
                                    "auto, second process": [], "auto, third process": []}
    texts, lengths = set(), set()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            plain = generate("off", "0", args.max_tokens)
            rows["plain, fresh process"].append(plain["stats"]["tokens_per_second"])
            texts.add(plain["text"])
            lengths.add(len(plain["tokens"]))
            for label in list(rows)[1:]:
                auto = generate(cache, "auto", args.max_tokens)
                rows[label].append(auto["stats"]["tokens_per_second"])
                texts.add(auto["text"])
    base = rows["plain, fresh process"]
    lines = [f"command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
             f"demo model, greedy, `{PROMPT}` continued as raw text, answers of {'/'.join(map(str, sorted(lengths)))} "
             f"tokens (max {args.max_tokens}), each run its own process, {args.repeats} "
             "rounds taking turns; decode tokens/s as `generate --json` reports it", "",
             "| run | tok/s (median) | min-max | vs plain (median of per-round ratios) |", "|---|---|---|---|"]
    for label, values in rows.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        lines.append(f"| {label} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} | {ratio:.2f}x |")
    lines.append("")
    lines.append(f"every answer identical: {len(texts) == 1}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
