"""`mlx-specdec distill`: fit a Gemma 4 assistant drafter to a target on your text.

A thin layer over ``mlx_specdec.distill``: parse flags, load, render progress with rich,
print the before/after acceptance table. Errors are one line on stderr with exit code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..sampling import SEED_RANGE

# What each of distill.Settings' checks is about, by the flag the user typed.
_SETTING_FLAGS = {"steps": "--steps", "lr": "--lr", "batch size": "--batch-size", "draft steps": "--draft-steps",
                  "seq len": "--seq-len", "feed": "--feed", "eval/checkpoint intervals": "--eval-every"}

# Widest drafter built from scratch when --hidden-size is not given: the published Gemma 4
# assistants are far narrower than their targets, and a drafter must stay cheap per step.
DEFAULT_MAX_HIDDEN = 1024


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def distill_command(
    data: Annotated[list[str], typer.Option("--data", "-d", help="Training text: a file, a folder (read recursively) or a .jsonl of {'text'} / {'prompt','completion'} / {'messages'} rows. Repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the drafter (config.json + model.safetensors), its checkpoint/ and distill_report.json.")],
    model: Annotated[Optional[str], typer.Option("--model", help="Target: local folder or hub repo id (default: the embedded demo model).")] = None,
    drafter: Annotated[Optional[str], typer.Option("--drafter", help="Drafter to start from (folder or repo id); omitted: a new one of --hidden-size/--layers.")] = None,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Held-out text for the acceptance estimates (default: the last 5% of --data).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 1000,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (linear warm-up, cosine decay).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(min=3, help="Tokens per sequence.")] = 256,
    draft_steps: Annotated[int, typer.Option(help="Draft steps unrolled per position (train for k up to this).")] = 4,
    hidden_size: Annotated[Optional[int], typer.Option(min=1, help="From scratch: drafter width (default: the target's, at most 1024).")] = None,
    layers: Annotated[int, typer.Option(min=1, help="From scratch: drafter layers.")] = 1,
    feed: Annotated[str, typer.Option(help="Token fed to draft steps 2..S: 'data' (the text's next token) or 'drafter' (its own argmax).")] = "data",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.")] = False,
    eval_every: Annotated[int, typer.Option(min=1, help="Steps between held-out acceptance estimates.")] = 100,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 100,
    quantize_bits: Annotated[Optional[int], typer.Option(help="Quantize the target in memory to this many bits first (distil for a quantized target).")] = None,
    group_size: Annotated[int, typer.Option(min=1, help="Quantization group size (with --quantize-bits).")] = 64,
    dtype: Annotated[str, typer.Option(help="Dtype of the saved drafter: bfloat16, float16 or float32.")] = "bfloat16",
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and of the batch order.")] = 0,
) -> None:
    """Distil a drafter against a frozen target; report acceptance per draft position before and after."""
    from rich.console import Console

    from . import distill as D
    from .common import print_blas_hint
    from ..errors import SpecDecError
    from ..loading import load

    console = Console(stderr=True)
    # Every flag is judged before the target loads: a bad one is a usage error (exit 2).
    seed %= SEED_RANGE  # any integer is a seed, as for sampling
    try:
        settings = D.Settings(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, draft_steps=draft_steps,
                              feed=feed, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
    except D.InputError as e:
        raise typer.BadParameter(str(e), param_hint=_SETTING_FLAGS.get(str(e).split(" must")[0])) from None
    if dtype not in D.DTYPES:
        raise typer.BadParameter(f"expected one of {', '.join(D.DTYPES)}, got {dtype!r}", param_hint="--dtype")
    if quantize_bits is not None and quantize_bits not in D.QUANT_BITS:
        raise typer.BadParameter(f"expected one of {', '.join(map(str, D.QUANT_BITS))}, got {quantize_bits}",
                                 param_hint="--quantize-bits")
    for flag, paths in (("--data", data), ("--eval-data", eval_data or [])):
        for path in paths:
            if not Path(path).expanduser().exists():
                raise typer.BadParameter(f"{path} does not exist", param_hint=flag)
    state = D.read_checkpoint_state(out)
    if state is not None and not resume:
        raise typer.BadParameter(f"{out} holds a checkpoint at step {state['step']}: pass --resume to continue it, "
                                 "or choose another --out", param_hint="--out")
    if state is None and resume:
        raise typer.BadParameter(f"nothing to resume: no checkpoint in {out}", param_hint="--resume")
    try:
        with console.status("loading the target"):
            spec = load(model, drafter=False)
            if quantize_bits is not None:
                D.quantize_target(spec.target, quantize_bits, group_size)
        print_blas_hint()
        with console.status("reading the data"):
            docs = D.read_documents(data, spec.tokenizer)
            held = D.read_documents(eval_data, spec.tokenizer) if eval_data else None
            eos = min(spec.eos_token_ids) if spec.eos_token_ids else 1
            corpus = D.Data.from_documents(docs, eos, settings, held_out_docs=held)
        if resume:
            start, config, state = D.resume_drafter(spec, out)
            origin = (f"resumed from step {state['step']} of {steps} "
                      f"({out / D.CHECKPOINT_DIR}, {steps - state['step']} steps to go)")
        else:
            width = hidden_size or min(spec.target.config.hidden_size, DEFAULT_MAX_HIDDEN)
            start, config = D.start_drafter(spec, drafter, hidden_size=width, layers=layers, seed=seed)
            origin = f"from {drafter}" if drafter else "from scratch"
        console.print(f"target {spec.name}: {len(corpus.train):,} training tokens, {len(corpus.held_out):,} held out; "
                      f"drafter {origin}")
        _run(console, D.distill(spec, start, config, corpus, settings, out, resume=resume, save_dtype=dtype), out)
    except SpecDecError as e:
        _fail(str(e))


def _run(console, events, out: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .distill import Report

    columns = [TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    from .distill import read_checkpoint_state

    report, estimate = None, ""
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            task = None
            for event in events:
                if isinstance(event, Report):
                    report = event
                    continue
                if task is None:
                    task = bar.add_task("distill", total=event.steps, completed=event.step - 1, info="")
                if event.eval is not None:
                    estimate = " a=" + "/".join(f"{a:.2f}" for a in event.eval.by_position)
                kl = "/".join(f"{k:.2f}" for k in event.kl_by_step)
                bar.update(task, completed=event.step,
                           info=f"loss {event.loss:.3f} (KL {kl}){estimate} {event.tokens_per_second:,.0f} tok/s")
    except KeyboardInterrupt:  # the bar is closed; the generator saves the step it reached
        events.close()
        state = read_checkpoint_state(out)
        where = (f"checkpoint at step {state['step']} in {out / 'checkpoint'}; continue it with --resume"
                 if state else "nothing was saved (interrupted before the first step)")
        typer.echo(f"interrupted: {where}", err=True)
        raise typer.Exit(130) from None
    _print_report(report)


def _print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"greedy acceptance per draft position on held-out text ({report.out})")
    table.add_column("measure")
    width = max(len(a.by_position) for a in (*report.before.values(), *report.after.values()))
    for i in range(width):
        table.add_column(f"a{i + 1}", justify="right")
    table.add_column("E(k)", justify="right")
    for when, results in (("before", report.before), ("after", report.after)):
        for method, acc in results.items():
            table.add_row(f"{when} ({method})", *[f"{a:.3f}" for a in acc.by_position],
                          f"{acc.expected_tokens_per_round:.2f}")
    Console().print(table)
    resumed = f", resumed from step {report.resumed_from}" if report.resumed_from else ""
    Console().print(f"drafter written to {report.out} ({report.steps} steps{resumed}; "
                    f"this run took {report.seconds / 60:.1f} min)")
    if not report.before:
        Console().print("(no 'before' row: the checkpoint resumed from predates keeping it)")


def main() -> None:  # pragma: no cover - `python -m mlx_specdec.distill_cli`
    typer.run(distill_command)


if __name__ == "__main__":  # pragma: no cover
    main()
