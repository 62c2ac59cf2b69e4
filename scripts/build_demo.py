"""Build the embedded demo pair into mlx_specdec/demo/model/ (see README "The embedded demo pair").

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        nice -n 10 python scripts/build_demo.py

Stages, each resumable (intermediate state lives in --work, default build/demo/):
  data      the corpus (this Python's standard library source, minus HELD_OUT modules, and
            question -> answer chats built from its docstrings) and a byte-level BPE tokenizer;
  target    a small Gemma 4 target trained on it with MLX (demo_target.py);
  drafter   a 1-layer gemma4_assistant drafter distilled against the shipped (half-precision)
            target with mlx_specdec.commands.distill, the library behind `mlx-specdec distill`;
  eval      held-out acceptance per draft position and speed of plain vs speculative decoding
            (written to --work/report.json).
Everything is seeded; the corpus depends on the Python version (built with CPython 3.11.7).
A stage finds its checkpoint in --work and continues from it: delete --work to start over.
Times on a shared 2-core x86 VM: data 1 min, target 39 min, drafter 16 min, eval ~52 min
(`--stages eval --quant-steps 0`: acceptance and speed only, ~2 min).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402
import demo_target  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "mlx_specdec" / "demo" / "model"
VOCAB_SIZE = 4096
STAGES = ("data", "target", "drafter", "eval")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stream(tokenizer, texts: list[str], eos: int) -> np.ndarray:
    """All texts as one token stream, each <bos> ... <eos>."""
    ids = []
    for enc in tokenizer.encode_batch(texts):
        ids += enc.ids + [eos]
    return np.array(ids, dtype=np.int32)


def stage_data(args, corpus) -> None:
    tok = demo_corpus.train_tokenizer(
        corpus.train_code + [demo_corpus.chat_text(q, a) for q, a in corpus.train_qa], VOCAB_SIZE, args.out
    )
    eos = tok.token_to_id(demo_corpus.EOS)
    data = args.work / "data"
    data.mkdir(parents=True, exist_ok=True)
    np.save(data / "code.npy", stream(tok, corpus.train_code, eos))
    np.save(data / "qa.npy", stream(tok, [demo_corpus.chat_text(q, a) for q, a in corpus.train_qa], eos))
    np.save(data / "held_out.npy", stream(tok, [src for _, src in corpus.held_out_code], eos))
    demo_corpus.write_qa_jsonl(corpus.train_qa, data / "qa_train.jsonl")
    (data / "train_files.txt").write_text("\n".join(str(p) for p in corpus.train_paths) + "\n")
    log(f"data: {len(corpus.train_code)} train files, {len(corpus.held_out_code)} held-out modules, "
        f"{len(corpus.train_qa)} train / {len(corpus.held_out_qa)} held-out questions")


def stage_target(args) -> None:
    data = args.work / "data"
    code, qa, held = (np.load(data / f"{n}.npy") for n in ("code", "qa", "held_out"))
    log(f"target: {len(code)} code tokens, {len(qa)} chat tokens, {len(held)} held-out tokens")
    config = demo_target.target_config(VOCAB_SIZE)
    settings = demo_target.TrainSettings(steps=args.target_steps, seed=args.seed)
    model = demo_target.train_target(config, code, qa, held, settings, args.work, log=log)
    demo_target.save_target(model, config, args.out)
    log(f"target saved to {args.out}")


DRAFTER = dict(hidden_size=256, layers=1)
DISTILL = dict(lr=2e-3, batch_size=8, seq_len=256, draft_steps=4, warmup=20, eval_every=50,
               checkpoint_every=25, eval_sequences=8, eval_prompts=8, eval_prompt_len=96, eval_new_tokens=48)


def _documents(spec, corpus, work: Path):
    """The distill inputs, as the CLI would get them: the training stdlib files and a JSONL of
    the training chats; held out: the HELD_OUT modules."""
    from mlx_specdec.commands import distill as D

    jsonl = demo_corpus.write_qa_jsonl(corpus.train_qa, work / "data" / "qa_train.jsonl")
    docs = D.read_documents([*corpus.train_paths, jsonl], spec.tokenizer)
    held = [spec.tokenizer.encode(src) for _, src in corpus.held_out_code]
    return docs, held


def _train_drafter(spec, drafter, config, corpus, args, out: Path, steps: int, evaluate_before=True, **overrides):
    from mlx_specdec.commands import distill as D

    settings = D.Settings(steps=steps, seed=args.seed, **{**DISTILL, **overrides})
    docs, held = _documents(spec, corpus, args.work)
    data = D.Data.from_documents(docs, min(spec.eos_token_ids), settings, held_out_docs=held)
    resume = D.read_checkpoint_state(out) is not None
    if resume:
        drafter, config, state = D.resume_drafter(spec, out)
        log(f"resuming the distillation in {out} at step {state['step']}")
    report = None
    for event in D.distill(spec, drafter, config, data, settings, out, resume=resume, save_dtype="float16",
                           evaluate_before=evaluate_before):
        if isinstance(event, D.Report):
            report = event
        elif event.step % 10 == 0 or event.eval is not None:
            est = "" if event.eval is None else " teacher-forced a=" + "/".join(f"{a:.2f}" for a in event.eval.by_position)
            log(f"distill step {event.step}/{event.steps} loss {event.loss:.3f} "
                f"KL/step {'/'.join(f'{k:.2f}' for k in event.kl_by_step)}{est} {event.tokens_per_second:.0f} tok/s")
    for when, results in (("before", report.before), ("after", report.after)):
        for method, acc in results.items():
            log(f"{when} ({method}): " + " ".join(f"{a:.3f}" for a in acc.by_position))
    return report


def stage_drafter(args, corpus) -> None:
    from mlx_specdec.commands import distill as D
    from mlx_specdec.loading import load

    spec = load(args.out, drafter=False)  # the shipped half-precision target, computed in fp32
    config = D.scratch_config(spec.target, **DRAFTER)
    drafter = D.new_drafter(spec.target, config, args.seed)
    out = args.work / "drafter"
    _train_drafter(spec, drafter, config, corpus, args, out, args.drafter_steps)
    dest = args.out / "drafter"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (dest / name).write_bytes((out / name).read_bytes())
    log(f"drafter saved to {dest}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=REPO / "build" / "demo")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-steps", type=int, default=700)
    p.add_argument("--drafter-steps", type=int, default=240)
    p.add_argument("--quant-steps", type=int, default=50, help="distillation steps per quantized target (0: skip)")
    p.add_argument("--quant-lr", type=float, default=5e-4)
    p.add_argument("--quant-bits", default="8,4,3", help="comma-separated bit widths for the quantized-target experiment")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    args.quant_bits = [int(b) for b in args.quant_bits.split(",") if b]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; expected a subset of {STAGES}")
    mx.set_default_device(mx.cpu)
    corpus = demo_corpus.build_corpus(args.seed)
    started = time.perf_counter()
    if "data" in stages:
        stage_data(args, corpus)
    if "target" in stages:
        stage_target(args)
    if "drafter" in stages:
        stage_drafter(args, corpus)
    if "eval" in stages:
        import demo_eval

        demo_eval.run(args, corpus, log, _train_drafter)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
