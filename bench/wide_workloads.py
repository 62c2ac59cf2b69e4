"""Writes bench/workloads_wide.json: the built-in workloads' four recipes with 16 prompts each,
drawn (seeded) from the standard-library modules the demo pair never saw (HELD_OUT in
scripts/demo_corpus.py).

Why: the built-in workloads have four prompts each, and greedy answers are the same every run,
so where a fixed k's drafts line up with the easy stretches of those four answers it makes more
tokens a round than its acceptance predicts, run after run (prose at k = 4: 3.36 tokens a round
against 3.11 expected, and the best fixed k there). "auto against the best fixed k" then measures
that luck as much as the policy. Sixteen prompts a workload smooth it out:

    python bench/wide_workloads.py                     # writes bench/workloads_wide.json
    mlx-specdec bench --workload-file bench/workloads_wide.json ...

The prompts come from this Python's source (CPython 3.11.7 wrote the committed file), by the
built-in workloads' recipes: code, a function's signature, docstring and first body lines;
prose, the first sentences of a docstring; qa, a question about a function or class (chat
template); short, the question about a signature with 16-token answers.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from demo_corpus import HELD_OUT  # noqa: E402

PROMPTS = 16
OUT = Path(__file__).resolve().parent / "workloads_wide.json"


def definitions(stdlib: Path) -> list[tuple[str, ast.AST, str]]:
    """(module, def or class node, module source) for every public top-level function and class
    with a docstring in the held-out modules, in file order."""
    found = []
    for name in HELD_OUT:
        source = (stdlib / name).read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
                    and ast.get_docstring(node)):
                found.append((name.removesuffix(".py"), node, source))
    return found


def code_prompt(node: ast.AST, source: str) -> str | None:
    """The definition's lines through its docstring and two more (at most 320 characters, cut at
    a line end), as the built-in code prompts are."""
    if not isinstance(node, ast.FunctionDef) or len(node.body) < 3:
        return None
    lines = source.splitlines(keepends=True)
    end = node.body[0].end_lineno + 2  # docstring, then two lines of the body
    text = "".join(lines[node.lineno - 1:end])
    while len(text) > 320 and "\n" in text.rstrip("\n"):
        text = text[:text.rstrip("\n").rfind("\n") + 1]
    return text if len(text) <= 320 else None


def prose_prompt(node: ast.AST) -> str | None:
    """A docstring's opening words, cut after 100 characters at a word boundary (the built-in
    prose prompts are 103-109 characters, each stopping mid-sentence)."""
    text = " ".join(ast.get_docstring(node).split())
    if len(text) < 140 or not text[0].isupper():
        return None
    cut = text.find(" ", 100)
    return text[:cut]


def build(seed: int = 0) -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    defs = definitions(stdlib)
    rng = random.Random(seed)

    def pick(candidates: list[str]) -> list[str]:
        unique = sorted(set(candidates))
        if len(unique) < PROMPTS:
            raise SystemExit(f"only {len(unique)} candidates, {PROMPTS} needed")
        return rng.sample(unique, PROMPTS)

    functions = [(m, n) for m, n, _ in defs if isinstance(n, ast.FunctionDef)]
    classes = [(m, n) for m, n, _ in defs if isinstance(n, ast.ClassDef)]
    code = pick([p for _, n, s in defs if (p := code_prompt(n, s))])
    prose = pick([p for _, n, _ in defs if (p := prose_prompt(n))])
    qa = pick([f"What does {m}.{n.name} do?" for m, n in functions]
              + [f"Explain the class {m}.{n.name}." for m, n in classes])
    short = pick([f"What is the signature of {m}.{n.name}?" for m, n in functions])
    recipe = "16 prompts from the held-out standard-library modules (bench/wide_workloads.py)"
    return {"workloads": [
        {"name": "code", "description": f"code completion, {recipe}", "prompts": code},
        {"name": "prose", "description": f"prose: docstring openings, {recipe}", "prompts": prose},
        {"name": "qa", "description": f"Q&A (chat template), {recipe}", "prompts": qa, "chat": True},
        {"name": "short", "description": f"short answers (chat template), {recipe}", "prompts": short,
         "chat": True, "max_tokens": 16},
    ]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.write_text(json.dumps(build(args.seed), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
