"""mlx-specdec against its peers on the same checkpoints: plain decoding, prefill and memory.

Systems, taking turns run by run in one process (greedy, fp32, EOS ignored so every system
times the same tokens; every output is checked against ours plain):

  ours plain      decode() with draft_tokens=0
  ours k=N        a fixed draft length (targets with a drafter)
  ours auto       the measured policy, fresh at the start of the process
  mlx-lm plain    mlx_lm.generate.generate_step on the same folder
  mlx-vlm plain   mlx_vlm's generate_step, when mlx-vlm is installed (pip install 'mlx-specdec[peers]');
                  its MTP path needs a multimodal checkpoint layout, which this does not write yet

Targets: the embedded demo pair, and a random Gemma 4 target large enough that matmuls
dominate (~150M parameters fp32, written to a temporary folder both libraries load), with a
random drafter that never agrees (the floor "auto" must hold). Reported per cell: prefill and
decode tokens/s (medians), the median and spread (min-max) of run-by-run ratios to mlx-lm plain,
wall and CPU seconds, and the peak memory a long prefill adds over the resting state.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 nice -n -10 \\
        python bench/peers.py --out bench/results/peers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_specdec.cache import Step  # noqa: E402
from mlx_specdec.decode import Options, decode, new_cache  # noqa: E402
from mlx_specdec.demo import demo_path  # noqa: E402
from mlx_specdec.loading import load  # noqa: E402
from mlx_specdec.policy import DraftPolicy  # noqa: E402

LARGE = dict(
    model_type="gemma4_text", vocab_size=16384, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=128, global_head_dim=256, sliding_window=512,
    final_logit_softcapping=30.0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
    max_position_embeddings=8192, tie_word_embeddings=True, eos_token_id=[1], num_kv_shared_layers=0,
    attention_k_eq_v=False, enable_moe_block=False, use_double_wide_mlp=False, hidden_activation="gelu_pytorch_tanh",
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
    layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
)
LARGE_DRAFTER = dict(
    model_type="gemma4_assistant", backbone_hidden_size=1024,
    text_config=dict(
        vocab_size=16384, hidden_size=256, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, global_head_dim=256, sliding_window=512,
        layer_types=["full_attention"], hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
    ),
)


def write_large(folder: Path, seed: int = 0) -> Path:
    """A random ~150M-parameter target and a random drafter, saved as both libraries read them."""
    from mlx_specdec.models import assistant, gemma4

    def init(module):
        mx.random.seed(seed)
        params = tree_flatten(module.parameters())
        return {k: (mx.random.normal(v.shape) * v.shape[-1] ** -0.5 if v.ndim == 2 else v) for k, v in params}

    target = gemma4.Model(gemma4.TextConfig.from_dict(LARGE))
    weights = init(target)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(LARGE))
    target.load_weights(list(weights.items()))
    drafter = assistant.Drafter(assistant.AssistantConfig.from_dict(LARGE_DRAFTER), target.embed_tokens)
    (folder / "drafter").mkdir(exist_ok=True)
    mx.save_safetensors(str(folder / "drafter" / "model.safetensors"), init(drafter))
    (folder / "drafter" / "config.json").write_text(json.dumps(LARGE_DRAFTER))
    return folder


def parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def timed(steps) -> tuple[list[int], float, float, float]:
    """(tokens, wall seconds to the first token, wall and CPU seconds for the rest) of a
    generator of token lists."""
    start = time.perf_counter()
    tokens, first = [], None
    for new in steps:
        tokens += new
        if first is None:
            first, cpu = time.perf_counter(), time.process_time()
    return tokens, first - start, time.perf_counter() - first, time.process_time() - cpu


def ours(spec, prompt: list[int], n: int, draft_tokens):
    updates = decode(spec, [prompt], Options(max_tokens=n, draft_tokens=draft_tokens))
    return timed(update.tokens.get(0, []) for update in updates)


def mlx_lm_plain(model, prompt: list[int], n: int):
    return timed([int(token)] for token, _ in generate_step(mx.array(prompt), model, max_tokens=n))


def load_mlx_vlm(folder: Path):
    """mlx-vlm's model for the folder, or None when mlx-vlm is not installed (the `peers` extra)."""
    try:
        from mlx_vlm.utils import load_model as vlm_load
    except ImportError:
        return None
    model = vlm_load(Path(folder))
    model.set_dtype(mx.float32)
    return model


def mlx_vlm_plain(model, prompt: list[int], n: int):
    from mlx_vlm.generate.ar import generate_step as vlm_step

    return timed([int(token)] for token, _ in vlm_step(mx.array([prompt]), model, None, None, max_tokens=n))


def prefill_peak(run) -> float:
    """MB a prefill (to the first token) allocates above what was resident before it."""
    mx.synchronize()
    mx.clear_cache()
    resting = mx.get_active_memory()
    mx.reset_peak_memory()
    run()
    return (mx.get_peak_memory() - resting) / 2**20


def make_prompt(spec, length: int) -> list[int]:
    """``length`` tokens: Python source through the tokenizer when the model has one (the demo
    pair knows Python, so its drafter agrees as it would in use), else random ids."""
    if spec.tokenizer is None:
        vocab = spec.target.config.vocab_size
        return [int(x) for x in np.random.RandomState(length).randint(3, vocab, size=length)]
    import textwrap

    ids = list(spec.tokenizer.encode(Path(textwrap.__file__).read_text()))
    return ids[:length]


def bench_target(name, spec, lm_model, vlm_model, prompt_lengths, n, repeats, modes, log) -> list[dict]:
    rows = []
    for length in prompt_lengths:
        prompt = make_prompt(spec, length)
        systems = {"mlx-lm plain": lambda: mlx_lm_plain(lm_model, prompt, n)}
        if vlm_model is not None:
            systems["mlx-vlm plain"] = lambda: mlx_vlm_plain(vlm_model, prompt, n)
        for mode in modes:
            label = {0: "ours plain", "auto": "ours auto"}.get(mode, f"ours k={mode}")
            systems[label] = lambda mode=mode: ours(spec, prompt, n, mode)
        for run in systems.values():  # warm-up: shapes, allocations, auto's first measurements
            run()
        runs = {s: [] for s in systems}
        for _ in range(repeats):
            for system, run in systems.items():
                wall, cpu = time.perf_counter(), time.process_time()
                tokens, prefill, rest, rest_cpu = run()
                runs[system].append(dict(tokens=tokens, prefill=prefill, decode=rest, decode_cpu=rest_cpu,
                                         wall=time.perf_counter() - wall, cpu=time.process_time() - cpu))
        reference = runs["ours plain"][0]["tokens"]
        base = runs["mlx-lm plain"]
        for system, rs in runs.items():
            decode_ratio = [b["decode"] / r["decode"] for r, b in zip(rs, base)]
            # CPU time spent per token: steadier than wall time when other processes share the cores.
            cpu_ratio = [b["decode_cpu"] / r["decode_cpu"] for r, b in zip(rs, base)]
            prefill_ratio = [b["prefill"] / r["prefill"] for r, b in zip(rs, base)]
            row = dict(
                target=name, prompt=length, system=system,
                prefill_tok_s=length / statistics.median(r["prefill"] for r in rs),
                decode_tok_s=(n - 1) / statistics.median(r["decode"] for r in rs),
                decode_vs_mlx_lm=statistics.median(decode_ratio), decode_spread=[min(decode_ratio), max(decode_ratio)],
                decode_cpu_ms_per_token=1000 * statistics.median(r["decode_cpu"] for r in rs) / (n - 1),
                decode_cpu_vs_mlx_lm=statistics.median(cpu_ratio), decode_cpu_spread=[min(cpu_ratio), max(cpu_ratio)],
                prefill_vs_mlx_lm=statistics.median(prefill_ratio),
                prefill_spread=[min(prefill_ratio), max(prefill_ratio)],
                wall_s=statistics.median(r["wall"] for r in rs), cpu_s=statistics.median(r["cpu"] for r in rs),
                identical=all(r["tokens"] == reference for r in rs),
            )
            rows.append(row)
            log(f"{name} P={length} {system:13s} prefill {row['prefill_tok_s']:7.0f} tok/s "
                f"({row['prefill_vs_mlx_lm']:.2f}x)  decode {row['decode_tok_s']:6.1f} tok/s "
                f"({row['decode_vs_mlx_lm']:.2f}x, {min(decode_ratio):.2f}-{max(decode_ratio):.2f}; CPU "
                f"{row['decode_cpu_ms_per_token']:.2f} ms/tok, {row['decode_cpu_vs_mlx_lm']:.2f}x)"
                f"  wall {row['wall_s']:.2f}s cpu {row['cpu_s']:.2f}s  identical {row['identical']}")
    return rows


def memory(name, spec, lm_model, length, repeats, log) -> list[dict]:
    prompt = make_prompt(spec, length)
    def chunked(size=512):
        """Our prefill in chunks (what an engine admitting long prompts does): the chunks after
        the first attend to the cache through the concatenating path."""
        cache = new_cache(spec, 1)
        for start in range(0, len(prompt), size):
            chunk = prompt[start : start + size]
            hidden = spec.target(mx.array([chunk]), Step((start,), len(chunk)), cache)
            mx.eval(hidden[:, -1:], *cache.arrays())
        mx.eval(mx.argmax(spec.target.logits(hidden[:, -1]), axis=-1))

    systems = {"ours": lambda: ours(spec, prompt, 1, 0), "mlx-lm": lambda: mlx_lm_plain(lm_model, prompt, 1),
               "ours, 512-token chunks": chunked}
    peaks, seconds = {s: [] for s in systems}, {s: [] for s in systems}
    for _ in range(repeats):
        for system, run in systems.items():
            start = time.perf_counter()
            peaks[system].append(prefill_peak(run))
            seconds[system].append(time.perf_counter() - start)
    out = []
    for system, values in peaks.items():
        out.append(dict(target=name, prompt=length, system=system, prefill_peak_mb=statistics.median(values),
                        seconds=statistics.median(seconds[system])))
        log(f"{name} {length}-token prefill peak over resting: {system} {statistics.median(values):.1f} MB, "
            f"{statistics.median(seconds[system]):.2f} s")
    return out


def markdown(rows, memory_rows, header) -> str:
    lines = header + ["", "| target | prompt | system | prefill tok/s | vs mlx-lm (min-max) | decode tok/s "
                      "| vs mlx-lm (min-max) | decode CPU ms/token | vs mlx-lm (min-max) | run wall s | run CPU s "
                      "| identical |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['prompt']} | {r['system']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['prefill_vs_mlx_lm']:.2f}x ({r['prefill_spread'][0]:.2f}-{r['prefill_spread'][1]:.2f}) | "
                     f"{r['decode_tok_s']:.1f} | {r['decode_vs_mlx_lm']:.2f}x "
                     f"({r['decode_spread'][0]:.2f}-{r['decode_spread'][1]:.2f}) | {r['decode_cpu_ms_per_token']:.2f} | "
                     f"{r['decode_cpu_vs_mlx_lm']:.2f}x ({r['decode_cpu_spread'][0]:.2f}-{r['decode_cpu_spread'][1]:.2f}) | "
                     f"{r['wall_s']:.2f} | {r['cpu_s']:.2f} | {'yes' if r['identical'] else 'NO'} |")
    if memory_rows:
        lines += ["", "| target | prefill of | system | peak MB over resting | seconds (wall, to the first token) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m['target']} | {m['prompt']} tokens | {m['system']} | {m['prefill_peak_mb']:.1f} | "
                  f"{m['seconds']:.2f} |" for m in memory_rows]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="demo,large")
    parser.add_argument("--prompts", default="32,512", help="prompt lengths")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo-modes", default="0,2,4,auto", help="our modes on the demo pair")
    parser.add_argument("--large-modes", default="0,1,auto", help="our modes on the large random pair")
    parser.add_argument("--memory-prompt", type=int, default=2048, help="prefill length for peak memory (0: skip)")
    parser.add_argument("--no-mlx-vlm", dest="mlx_vlm", action="store_false",
                        help="leave out mlx-vlm even when it is installed")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()

    def modes(text):
        return [m if m == "auto" else int(m) for m in text.split(",")]

    messages = []

    def log(line):
        print(line, flush=True)
        messages.append(line)

    rows, mem = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.targets.split(","):
            folder = demo_path() if name == "demo" else write_large(Path(tmp) / "large")
            spec = load(folder, dtype="float32", policy_cache=False)
            # EOS ignored, as by mlx-lm's generate_step: every system times the same tokens.
            spec = dataclasses.replace(spec, eos_token_ids=frozenset(), policy=DraftPolicy())
            lm_model, _ = load_model(Path(folder))
            lm_model.set_dtype(mx.float32)
            vlm_model = load_mlx_vlm(folder) if args.mlx_vlm else None
            log(f"{name}: target {parameters(spec.target) / 1e6:.1f}M parameters fp32, drafter "
                f"{parameters(spec.drafter) / 1e6:.1f}M")
            chosen = modes(args.demo_modes if name == "demo" else args.large_modes)
            rows += bench_target(name, spec, lm_model, vlm_model, [int(p) for p in args.prompts.split(",")],
                                 args.max_tokens, args.repeats, chosen, log)
            if args.memory_prompt:
                mem += memory(name, spec, lm_model, args.memory_prompt, 3, log)
            del spec, lm_model, vlm_model
    header = [
        f"command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"MLX {mx.__version__} ({mx.default_device()}), {platform.machine()}, {args.max_tokens} new tokens, "
        f"greedy, fp32, medians of {args.repeats} runs taking turns; ratios are run-by-run against mlx-lm plain "
        "(>1: faster than mlx-lm)",
    ]
    text = markdown(rows, mem, header)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(dict(rows=rows, memory=mem, header=header), indent=1))


if __name__ == "__main__":
    main()
