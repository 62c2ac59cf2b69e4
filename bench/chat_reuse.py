"""How much a chat turn prefills with the prompt cache kept across turns, and without.

Runs the same scripted conversation twice through `ChatSession` (greedy, so both give the same
answers) and prints, per turn, the conversation length, the tokens prefilled and the prefill
time, with and without cache reuse:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python bench/chat_reuse.py --out bench/results/chat_reuse.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mlx_specdec import load
from mlx_specdec.api import Settings
from mlx_specdec.commands.chat import ChatSession

TURNS = [
    "What does textwrap.dedent do?",
    "What is the signature of textwrap.wrap?",
    "Explain the class fractions.Fraction.",
    "What is the difflib module for?",
    "Describe statistics.median.",
    "What is the signature of shlex.split?",
]


def run(spec, reuse: bool, max_tokens: int, repeats: int):
    """Per turn: (conversation tokens, prefilled tokens, median prefill ms, answer tokens)."""
    rows = None
    for _ in range(repeats):
        session = ChatSession(spec, Settings(max_tokens=max_tokens, draft_tokens="auto"), reuse_cache=reuse)
        for text in TURNS:
            for _ in session.ask(text):
                pass
        turns = [(r.prompt_tokens, r.prefill_tokens, r.stats.prefill_seconds * 1000, r.stats.generated_tokens)
                 for r in session.reports]
        rows = [[t] for t in turns] if rows is None else [acc + [t] for acc, t in zip(rows, turns)]
    return [(r[0][0], r[0][1], statistics.median(x[2] for x in r), r[0][3]) for r in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded demo model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = parser.parse_args(argv)
    spec = load(args.model)
    with_reuse = run(spec, True, args.max_tokens, args.repeats)
    without = run(spec, False, args.max_tokens, args.repeats)
    lines = [f"Model: {args.model or 'the embedded demo model'}; {len(TURNS)} turns, answers of up to {args.max_tokens} tokens, "
             f"median prefill time of {args.repeats} runs.", "",
             "| turn | conversation tokens | prefilled, reuse | prefilled, no reuse | prefill ms, reuse | "
             "prefill ms, no reuse |", "|---|---|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(with_reuse, without), 1):
        assert a[0] == b[0] and a[3] == b[3], "both runs must see the same conversation"
        lines.append(f"| {i} | {a[0]} | {a[1]} | {b[1]} | {a[2]:.1f} | {b[2]:.1f} |")
    total = (sum(r[1] for r in with_reuse), sum(r[1] for r in without))
    lines += ["", f"Prefilled in all: {total[0]} tokens with reuse, {total[1]} without."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
