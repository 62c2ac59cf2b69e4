"""mlx-specdec against its peers on the same checkpoints: plain and speculative decoding, prefill and memory.

Systems, taking turns run by run in one process, each turn starting one system further on
(greedy, fp32, EOS ignored so every system times the same tokens; every output is checked
against ours plain at the same batch size):

  ours plain              decode() with draft_tokens=0
  ours k=N                a fixed draft length (targets with a drafter)
  ours auto               the measured policy, fresh at the start of the process
  mlx-lm plain            mlx_lm.generate.generate_step on the same folder (B=1 only)
  mlx-vlm plain           mlx_vlm's generate_step, when mlx-vlm is installed (pip install 'mlx-specdec[peers]')
                          (B=1 only: its plain loop yields one token per step)
  mlx-vlm MTP block=N     mlx_vlm's generate_step with the demo's gemma4_assistant drafter
                          (draft_kind "mtp", draft_block_size N: N-1 drafted tokens + 1, so
                          block=N drafts as many tokens as ours k=N-1), at B=1 and batched
  mlx-vlm MTP default     the same with draft_block_size unset (the drafter config's block_size)

mlx-vlm runs a Gemma 4 MTP drafter only on a multimodal target (model_type gemma4: its
gemma4_text model returns no hidden states for the drafter), so for the demo pair every system
loads one folder written in that layout (write_multimodal): the demo's text weights under
model.language_model.*, a tiny random vision tower that text decoding never runs, the same
tokenizer and drafter/. Ours and mlx-lm skip the towers, so all read identical fp32 weights.
Block sizes above the drafter's configured one are a ceiling in mlx-vlm: it drafts the
configured depth until most rounds accept all of it.

Targets: the embedded demo pair, and a random Gemma 4 target large enough that matmuls
dominate (~150M parameters fp32, written to a temporary folder both libraries load), with a
random drafter that never agrees (the floor "auto" must hold); the large target runs at B=1
without mlx-vlm's MTP path. Reported per cell: prefill and decode tokens/s (medians), the median
and spread (min-max) of run-by-run ratios to the cell's base (mlx-lm plain at B=1; ours plain at
B>1, where mlx-lm and mlx-vlm have no plain batched generate_step), wall and CPU seconds, and the
peak memory a long prefill adds over the resting state. Against mlx-vlm's MTP path: ours best
fixed k vs its best block size, and ours auto vs its default, "best" being the highest median
decode tok/s of the timed runs, chosen the same way on both sides and from the same draft depths
(ours k = block size - 1 for each block size; every one is also reported on its own row).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 nice -n -10 \\
        python bench/peers.py --out bench/results/peers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import shutil
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


# A vision tower as small as mlx-vlm's gemma4 model accepts: the multimodal layout needs one,
# but text decoding never runs it (and ours and mlx-lm skip its weights when loading).
TINY_VISION = dict(
    model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, head_dim=16, global_head_dim=16, patch_size=16, position_embedding_size=64,
    pooling_kernel_size=3,
)


def write_multimodal(text_folder: Path, folder: Path) -> Path:
    """The text-only target in ``text_folder`` (with its drafter/, tokenizer and chat template)
    rewritten as a multimodal ``Gemma4ForConditionalGeneration`` checkpoint, the layout in which
    mlx-vlm runs a Gemma 4 MTP drafter: the same text weights (values untouched, renamed under
    ``model.language_model.*``) plus a tiny random vision tower. Needs mlx-vlm (the tower's shapes)."""
    from mlx_vlm.models.gemma4.config import VisionConfig
    from mlx_vlm.models.gemma4.gemma4 import MultimodalEmbedder
    from mlx_vlm.models.gemma4.vision import VisionModel

    text = json.loads((text_folder / "config.json").read_text())
    # The nested text_config of a multimodal checkpoint names no architecture of its own; the
    # weights' stored dtype stays in their safetensors (every system casts to fp32 anyway).
    del text["architectures"], text["dtype"]
    config = dict(model_type="gemma4", architectures=["Gemma4ForConditionalGeneration"], text_config=text,
                  vision_config=TINY_VISION, audio_config=None, vocab_size=text["vocab_size"],
                  hidden_size=text["hidden_size"], eos_token_id=text["eos_token_id"], tie_word_embeddings=True)
    vision = VisionConfig.from_dict(TINY_VISION)
    mx.random.seed(0)
    towers = {f"model.vision_tower.{k}": v for k, v in tree_flatten(VisionModel(vision).parameters())}
    embedder = MultimodalEmbedder(vision.hidden_size, text["hidden_size"], vision.rms_norm_eps)
    towers |= {f"model.embed_vision.{k}": v for k, v in tree_flatten(embedder.parameters())}
    weights = mx.load(str(text_folder / "model.safetensors"))
    if not all(k.startswith("model.") for k in weights):
        raise ValueError(f"{text_folder}: expected a text-only checkpoint, every weight under model.*")
    weights = {"model.language_model." + k.removeprefix("model."): v for k, v in weights.items()}
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights | towers)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(text_folder / name, folder / name)
    shutil.copytree(text_folder / "drafter", folder / "drafter")
    return folder


def parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def timed(steps) -> tuple[list[list[int]], float, float, float]:
    """(tokens of each row, wall seconds to the first token, wall and CPU seconds for the rest)
    of a generator that yields, per step, a list of each row's new tokens."""
    start = time.perf_counter()
    tokens, first = None, None
    for new in steps:
        if tokens is None:
            tokens = [[] for _ in new]
        for row, added in zip(tokens, new):
            row += added
        if first is None:
            first, cpu = time.perf_counter(), time.process_time()
    return tokens, first - start, time.perf_counter() - first, time.process_time() - cpu


def ours(spec, prompts: list[list[int]], n: int, draft_tokens):
    updates = decode(spec, prompts, Options(max_tokens=n, draft_tokens=draft_tokens))
    return timed([update.tokens.get(row, []) for row in range(len(prompts))] for update in updates)


def mlx_lm_plain(model, prompt: list[int], n: int):
    return timed([[int(token)]] for token, _ in generate_step(mx.array(prompt), model, max_tokens=n))


@dataclasses.dataclass
class MlxVlm:
    """mlx-vlm's target, and its MTP drafter when the target has one (None otherwise)."""

    model: object
    drafter: object | None


def load_mlx_vlm(folder: Path, with_drafter: bool) -> MlxVlm | None:
    """mlx-vlm's model (and drafter) for the folder, or None when mlx-vlm is not installed (the
    `peers` extra)."""
    try:
        from mlx_vlm.speculative.drafters import load_drafter
        from mlx_vlm.utils import load_model as vlm_load
    except ImportError:
        return None
    model = vlm_load(Path(folder))
    model.set_dtype(mx.float32)
    # Its batched speculative loop ends a row at the config's eos_token_id; every system here
    # ignores EOS so that all time the same tokens.
    model.config.eos_token_id = None
    drafter = None
    if with_drafter:
        drafter, kind = load_drafter(str(Path(folder) / "drafter"))
        if kind != "mtp":
            raise ValueError(f"mlx-vlm resolved the drafter in {folder}/drafter as {kind!r}, not 'mtp'")
        drafter.set_dtype(mx.float32)
    return MlxVlm(model, drafter)


def mlx_vlm_plain(model, prompt: list[int], n: int):
    from mlx_vlm.generate.ar import generate_step as vlm_step

    return timed([[int(token)]] for token, _ in vlm_step(mx.array([prompt]), model, None, None, max_tokens=n))


def mlx_vlm_mtp(vlm: MlxVlm, prompts: list[list[int]], n: int, block: int | None):
    """mlx-vlm's MTP path; ``block`` None leaves draft_block_size to the drafter's config."""
    from mlx_vlm.generate.ar import generate_step as vlm_step

    steps = vlm_step(mx.array(prompts), vlm.model, None, None, max_tokens=n, draft_model=vlm.drafter,
                     draft_kind="mtp", draft_block_size=block)
    if len(prompts) == 1:  # one token per yield
        return timed([[int(token)]] for token, _ in steps)
    # Batched: one entry per row per yield, None where a row has no token at that position.
    return timed([[] if t is None else [int(t)] for t in tokens] for tokens, _ in steps)


def prefill_peak(run) -> float:
    """MB a prefill (to the first token) allocates above what was resident before it."""
    mx.synchronize()
    mx.clear_cache()
    resting = mx.get_active_memory()
    mx.reset_peak_memory()
    run()
    return (mx.get_peak_memory() - resting) / 2**20


def make_prompt(spec, length: int, row: int = 0) -> list[int]:
    """``length`` tokens, different for each ``row`` of a batch: Python source through the
    tokenizer when the model has one (the demo pair knows Python, so its drafter agrees as it
    would in use), consecutive slices of it for consecutive rows, else random ids."""
    if spec.tokenizer is None:
        vocab = spec.target.config.vocab_size
        seed = length + 1_000_003 * row  # row 0: the same prompt as before batches were measured
        return [int(x) for x in np.random.RandomState(seed).randint(3, vocab, size=length)]
    import textwrap

    ids = list(spec.tokenizer.encode(Path(textwrap.__file__).read_text()))
    if len(ids) < (row + 1) * length:
        raise ValueError(f"textwrap.py has {len(ids)} tokens, too few for row {row} of {length}-token prompts")
    return ids[row * length : (row + 1) * length]


def best(runs: dict[str, list[dict]], labels: list[str], n: int) -> str:
    """The label with the highest median decode tok/s over its timed runs."""
    return max(labels, key=lambda s: n / statistics.median(r["decode"] for r in runs[s]))


def run_by_run(mine: list[dict], theirs: list[dict]) -> dict:
    """Decode speed of ``mine`` over ``theirs`` (>1: mine faster), wall and CPU, taken run by run
    (the two ran in the same turn of each repeat): median and (min, max)."""
    wall = [t["decode"] / m["decode"] for m, t in zip(mine, theirs)]
    cpu = [t["decode_cpu"] / m["decode_cpu"] for m, t in zip(mine, theirs)]
    return dict(decode_ratio=statistics.median(wall), decode_spread=[min(wall), max(wall)],
                decode_cpu_ratio=statistics.median(cpu), decode_cpu_spread=[min(cpu), max(cpu)])


def bench_target(name, spec, lm_model, vlm, prompt_lengths, batch, n, repeats, modes, blocks, log):
    """(rows, comparisons with mlx-vlm's MTP path, ours auto against ours plain) at batch size ``batch``."""
    rows, versus, floor = [], [], []
    for length in prompt_lengths:
        prompts = [make_prompt(spec, length, row) for row in range(batch)]
        systems = {}
        if batch == 1:  # mlx-lm's and mlx-vlm's plain generate_step decode one sequence
            systems["mlx-lm plain"] = lambda: mlx_lm_plain(lm_model, prompts[0], n)
            if vlm is not None:
                systems["mlx-vlm plain"] = lambda: mlx_vlm_plain(vlm.model, prompts[0], n)
        base = "mlx-lm plain" if batch == 1 else "ours plain"
        fixed, vlm_blocks = [], []
        for mode in modes:
            label = {0: "ours plain", "auto": "ours auto"}.get(mode, f"ours k={mode}")
            if isinstance(mode, int) and mode > 0:
                fixed.append(label)
            systems[label] = lambda mode=mode: ours(spec, prompts, n, mode)
        if vlm is not None and vlm.drafter is not None:
            systems["mlx-vlm MTP default"] = lambda: mlx_vlm_mtp(vlm, prompts, n, None)
            for block in blocks:
                vlm_blocks.append(f"mlx-vlm MTP block={block}")
                systems[vlm_blocks[-1]] = lambda block=block: mlx_vlm_mtp(vlm, prompts, n, block)
        for run in systems.values():  # warm-up: shapes, allocations, auto's first measurements
            run()
        runs = {s: [] for s in systems}
        names = list(systems)
        for i in range(repeats):
            # Each repeat starts one system further on, so that no system always runs right after
            # the same other one: on the large target at 512 tokens the run after mlx-vlm's plain
            # run was 3-7% slower than the same system later in the turn.
            for system in names[i % len(names):] + names[:i % len(names)]:
                wall, cpu = time.perf_counter(), time.process_time()
                tokens, prefill, rest, rest_cpu = systems[system]()
                runs[system].append(dict(tokens=tokens, prefill=prefill, decode=rest, decode_cpu=rest_cpu,
                                         wall=time.perf_counter() - wall, cpu=time.process_time() - cpu))
        reference = runs["ours plain"][0]["tokens"]
        decoded = batch * (n - 1)  # tokens after each row's first
        for system, rs in runs.items():
            decode_ratio = [b["decode"] / r["decode"] for r, b in zip(rs, runs[base])]
            # CPU time spent per token: steadier than wall time when other processes share the cores.
            cpu_ratio = [b["decode_cpu"] / r["decode_cpu"] for r, b in zip(rs, runs[base])]
            prefill_ratio = [b["prefill"] / r["prefill"] for r, b in zip(rs, runs[base])]
            row = dict(
                target=name, prompt=length, batch=batch, system=system, base=base,
                prefill_tok_s=batch * length / statistics.median(r["prefill"] for r in rs),
                decode_tok_s=decoded / statistics.median(r["decode"] for r in rs),
                decode_vs_base=statistics.median(decode_ratio), decode_spread=[min(decode_ratio), max(decode_ratio)],
                decode_cpu_ms_per_token=1000 * statistics.median(r["decode_cpu"] for r in rs) / decoded,
                decode_cpu_vs_base=statistics.median(cpu_ratio), decode_cpu_spread=[min(cpu_ratio), max(cpu_ratio)],
                prefill_vs_base=statistics.median(prefill_ratio),
                prefill_spread=[min(prefill_ratio), max(prefill_ratio)],
                wall_s=statistics.median(r["wall"] for r in rs), cpu_s=statistics.median(r["cpu"] for r in rs),
                identical=all(r["tokens"] == reference for r in rs),
            )
            rows.append(row)
            log(f"{name} P={length} B={batch} {system:22s} prefill {row['prefill_tok_s']:7.0f} tok/s "
                f"({row['prefill_vs_base']:.2f}x)  decode {row['decode_tok_s']:6.1f} tok/s "
                f"({row['decode_vs_base']:.2f}x {base}, {min(decode_ratio):.2f}-{max(decode_ratio):.2f}; CPU "
                f"{row['decode_cpu_ms_per_token']:.2f} ms/tok, {row['decode_cpu_vs_base']:.2f}x)"
                f"  wall {row['wall_s']:.2f}s cpu {row['cpu_s']:.2f}s  identical {row['identical']}")
        pairs = []
        if fixed and vlm_blocks:
            pairs.append(("ours best fixed k vs mlx-vlm MTP best block", best(runs, fixed, n), best(runs, vlm_blocks, n)))
        if "ours auto" in runs and "mlx-vlm MTP default" in runs:
            pairs.append(("ours auto vs mlx-vlm MTP default", "ours auto", "mlx-vlm MTP default"))
        for comparison, mine, theirs in pairs:
            ratio = run_by_run(runs[mine], runs[theirs])
            versus.append(dict(target=name, prompt=length, batch=batch, comparison=comparison, ours=mine,
                               mlx_vlm=theirs, identical=all(r["tokens"] == reference for r in runs[mine] + runs[theirs]),
                               **ratio))
            log(f"{name} P={length} B={batch} {comparison}: {mine} / {theirs} decode {ratio['decode_ratio']:.2f}x "
                f"({ratio['decode_spread'][0]:.2f}-{ratio['decode_spread'][1]:.2f}), CPU {ratio['decode_cpu_ratio']:.2f}x")
        if "ours auto" in runs and "ours plain" in runs:
            # The floor: auto must not decode slower than our plain decoding, whatever the base.
            ratio = run_by_run(runs["ours auto"], runs["ours plain"])
            floor.append(dict(target=name, prompt=length, batch=batch, **ratio))
            log(f"{name} P={length} B={batch} ours auto / ours plain decode {ratio['decode_ratio']:.2f}x "
                f"({ratio['decode_spread'][0]:.2f}-{ratio['decode_spread'][1]:.2f}), CPU {ratio['decode_cpu_ratio']:.2f}x")
    return rows, versus, floor


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

    systems = {"ours": lambda: ours(spec, [prompt], 1, 0), "mlx-lm": lambda: mlx_lm_plain(lm_model, prompt, 1),
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


def markdown(rows, versus, floor, memory_rows, header) -> str:
    lines = header + ["", "| target | prompt | B | system | prefill tok/s | vs base (min-max) | decode tok/s "
                      "| vs base (min-max) | decode CPU ms/token | vs base (min-max) | base | run wall s | run CPU s "
                      "| identical |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['prompt']} | {r['batch']} | {r['system']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['prefill_vs_base']:.2f}x ({r['prefill_spread'][0]:.2f}-{r['prefill_spread'][1]:.2f}) | "
                     f"{r['decode_tok_s']:.1f} | {r['decode_vs_base']:.2f}x "
                     f"({r['decode_spread'][0]:.2f}-{r['decode_spread'][1]:.2f}) | {r['decode_cpu_ms_per_token']:.2f} | "
                     f"{r['decode_cpu_vs_base']:.2f}x ({r['decode_cpu_spread'][0]:.2f}-{r['decode_cpu_spread'][1]:.2f}) | "
                     f"{r['base']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {'yes' if r['identical'] else 'NO'} |")
    if versus:
        lines += ["", "Against mlx-vlm's MTP path (ratios > 1: ours faster; run-by-run, median (min-max); \"best\": the "
                  "highest median decode tok/s among the fixed k / block sizes measured, chosen alike on both sides):",
                  "", "| target | prompt | B | comparison | ours | mlx-vlm | decode, wall | decode, CPU | identical |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {v['target']} | {v['prompt']} | {v['batch']} | {v['comparison']} | {v['ours']} | {v['mlx_vlm']} | "
                  f"{v['decode_ratio']:.2f}x ({v['decode_spread'][0]:.2f}-{v['decode_spread'][1]:.2f}) | "
                  f"{v['decode_cpu_ratio']:.2f}x ({v['decode_cpu_spread'][0]:.2f}-{v['decode_cpu_spread'][1]:.2f}) | "
                  f"{'yes' if v['identical'] else 'NO'} |" for v in versus]
    if floor:
        lines += ["", "Ours auto against ours plain (the floor; run by run, median (min-max)):", "",
                  "| target | prompt | B | decode, wall | decode, CPU |", "|---|---|---|---|---|"]
        lines += [f"| {f['target']} | {f['prompt']} | {f['batch']} | "
                  f"{f['decode_ratio']:.2f}x ({f['decode_spread'][0]:.2f}-{f['decode_spread'][1]:.2f}) | "
                  f"{f['decode_cpu_ratio']:.2f}x ({f['decode_cpu_spread'][0]:.2f}-{f['decode_cpu_spread'][1]:.2f}) |"
                  for f in floor]
    if memory_rows:
        lines += ["", "| target | prefill of | system | peak MB over resting | seconds (wall, to the first token) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m['target']} | {m['prompt']} tokens | {m['system']} | {m['prefill_peak_mb']:.1f} | "
                  f"{m['seconds']:.2f} |" for m in memory_rows]
    return "\n".join(lines) + "\n"


def mlx_vlm_version() -> str | None:
    """mlx-vlm's installed version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-vlm")
    except PackageNotFoundError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="demo,large")
    parser.add_argument("--prompts", default="32,512", help="prompt lengths")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo-modes", help="our modes on the demo pair (default: plain, auto and the fixed k "
                        "of every --mlx-vlm-blocks value, k = block - 1, so both sides' best comes from the same depths)")
    parser.add_argument("--large-modes", default="0,1,auto", help="our modes on the large random pair")
    parser.add_argument("--demo-batch-sizes", default="1,4",
                        help="batch sizes on the demo pair (B>1: ours and mlx-vlm's MTP path only)")
    parser.add_argument("--mlx-vlm-blocks", default="2,3,4,6",
                        help="mlx-vlm MTP draft_block_size values (block N drafts N-1 tokens), each a row; "
                             "its default block size is always measured as well")
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

    vlm_version = mlx_vlm_version() if args.mlx_vlm else None
    if not args.mlx_vlm:
        vlm_line = "mlx-vlm left out (--no-mlx-vlm): no mlx-vlm rows"
    elif vlm_version is None:
        vlm_line = "mlx-vlm not installed (pip install 'mlx-specdec[peers]'): no mlx-vlm rows"
    else:
        vlm_line = f"mlx-vlm {vlm_version}"
    blocks = [int(b) for b in args.mlx_vlm_blocks.split(",")]
    rows, versus, floors, mem = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.targets.split(","):
            if name == "demo" and vlm_version is not None:
                # mlx-vlm runs the MTP drafter only on a multimodal target: every system loads
                # this one folder (same fp32 weights; ours and mlx-lm skip the vision tower).
                folder = write_multimodal(demo_path(), Path(tmp) / "demo-multimodal")
            elif name == "demo":
                folder = demo_path()
            else:
                folder = write_large(Path(tmp) / "large")
            spec = load(folder, dtype="float32", policy_cache=False)
            # EOS ignored, as by mlx-lm's generate_step: every system times the same tokens.
            spec = dataclasses.replace(spec, eos_token_ids=frozenset(), policy=DraftPolicy())
            lm_model, _ = load_model(Path(folder))
            lm_model.set_dtype(mx.float32)
            # mlx-vlm's MTP path on the demo pair only: the large target is written text-only.
            vlm = load_mlx_vlm(folder, with_drafter=name == "demo") if vlm_version is not None else None
            log(f"{name}: {folder}, target {parameters(spec.target) / 1e6:.1f}M parameters fp32, drafter "
                f"{parameters(spec.drafter) / 1e6:.1f}M")
            if vlm is not None and vlm.drafter is not None:
                vlm_line = (f"mlx-vlm {vlm_version}; its MTP default block size (the drafter config's) is "
                            f"{vlm.drafter.config.block_size}, i.e. {vlm.drafter.config.block_size - 1} drafted "
                            "tokens a round; block sizes above it are a ceiling it reaches only when most rounds "
                            "accept the default depth")
            if name == "demo":
                # Like with like: a best picked from more candidates is flattered more by noise.
                same_depths = ",".join(str(b - 1) for b in blocks)
                chosen = modes(args.demo_modes or f"0,{same_depths},auto")
            else:
                chosen = modes(args.large_modes)
            batches = [int(b) for b in args.demo_batch_sizes.split(",")] if name == "demo" else [1]
            for batch in batches:
                got, against, floor = bench_target(name, spec, lm_model, vlm, [int(p) for p in args.prompts.split(",")],
                                            batch, args.max_tokens, args.repeats, chosen, blocks, log)
                rows += got
                versus += against
                floors += floor
            if args.memory_prompt:
                mem += memory(name, spec, lm_model, args.memory_prompt, 3, log)
            del spec, lm_model, vlm
    header = [
        f"command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"MLX {mx.__version__} ({mx.default_device()}), {platform.machine()}, {args.max_tokens} new tokens, "
        f"greedy, fp32, medians of {args.repeats} runs taking turns (each turn starting one system further on); "
        "ratios are run-by-run against the row's base "
        "(>1: faster than it): mlx-lm plain at B=1, ours plain at B>1 (mlx-lm's and mlx-vlm's plain "
        "generate_step decode one sequence; mlx-vlm's MTP path takes a batch)",
        vlm_line,
    ]
    text = markdown(rows, versus, floors, mem, header)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(
            json.dumps(dict(rows=rows, versus_mlx_vlm_mtp=versus, auto_vs_plain=floors, memory=mem, header=header), indent=1))


if __name__ == "__main__":
    main()
