"""`mlx-specdec convert`: a Gemma 4 target and its assistant -> one MLX folder.

The folder holds the target at the top (safetensors with our port's parameter names, a
``gemma4_text`` config.json (``gemma4_unified_text`` for the 12B), tokenizer files and chat
template) and the drafter in ``drafter/``, where `load()` finds it. The shared embedding is
stored once, with the target: the drafter's input embedding *is* the target's table (its own
``lm_head`` is a separate, narrower output head, and it keeps that). Each model gets its own
dtype and, optionally, affine quantization (4 or 8 bits), recorded in config.json the way
mlx-lm does (``quantization: {group_size, bits, mode}`` plus per-layer overrides), which our
loader reads.

Reading order: the plan and the checks that refuse early (not Gemma 4, a drafter for another
target, an output folder in use, too little disk), then conversion, then the check of the
result against the source on a probe prompt.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..cache import Step
from .common import human
from ..decode import new_cache
from ..errors import ConfigError, DrafterMismatchError, LoadError, SpecDecError
from ..loading import (
    DRAFTER_TYPES, DTYPES, TARGET_TYPES, SpecModel, _text_config, load, locate_drafter, read_config, resolve,
)
from ..models import assistant, gemma4

PROBE = "The quick brown fox jumps over the lazy dog. def fibonacci(n):"
DRAFT_PROBE_STEPS = 3
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GROUP_SIZES = (32, 64, 128)
SHARD_BYTES = 5 << 30  # mlx-lm's shard size
ROUTER_QUANT = {"group_size": 64, "bits": 8}
"""The MoE router picks which experts run; like mlx-lm's gemma4 conversion, it stays at 8 bits."""
DISK_MARGIN = 1.05
"""Free space wanted beyond the estimated output: configs, the index and filesystem slack."""
# What travels with the target besides weights and config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


class ConvertError(SpecDecError):
    """The conversion was refused (output folder, disk space, options)."""


Progress = Callable[[str, float, float], None]


@dataclass(frozen=True)
class Plan:
    source: str | Path
    out: Path
    drafter: str | Path | bool | None = None  # None: the target's own; False: none
    dtype: str | None = None  # None: the source's
    bits: int | None = None
    group_size: int = 64
    drafter_dtype: str | None = None  # None: the target's output dtype
    drafter_bits: int | None = None
    drafter_group_size: int = 64
    force: bool = False
    probe: str = PROBE


@dataclass
class Report:
    out: Path
    target_dtype: str
    target_quantization: dict | None
    target_bytes: int
    drafter_dtype: str | None = None
    drafter_quantization: dict | None = None
    drafter_bytes: int = 0
    embedding_bytes: int = 0
    probe_tokens: int = 0
    max_logit_diff: float = 0.0
    top1_agreement: float = 1.0
    drafter_max_logit_diff: float | None = None
    drafts_agree: tuple[int, int] | None = None
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Checks that refuse before any weight is read


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _tensors(path: Path) -> list[tuple[str, str, int]]:
    """(name, dtype, elements) of every tensor in a folder's safetensors, towers left out."""
    out = []
    for file in sorted(path.glob("*.safetensors")):
        for name, info in _header(file).items():
            if name == "__metadata__" or any(t in name for t in ("vision", "audio", "multi_modal_projector")):
                continue
            out.append((name, info["dtype"], int(np.prod(info["shape"], dtype=np.int64))))
    if not out:
        raise LoadError(f"no *.safetensors weights in {path}")
    return out


def source_dtype(path: Path) -> str:
    """The floating dtype most of a checkpoint's weights are stored in."""
    counts = Counter()
    for _, dtype, n in _tensors(path):
        if dtype in _SAFETENSORS_DTYPES:
            counts[_SAFETENSORS_DTYPES[dtype]] += n
    return counts.most_common(1)[0][0] if counts else "bfloat16"


def estimate_bytes(path: Path, dtype: str, bits: int | None, group_size: int) -> int:
    """Bytes the converted weights will take: every floating tensor at ``dtype``; with ``bits``,
    matrices pay bits/8 per weight plus a scale and a bias per group. Packed (already
    quantized) tensors keep their size."""
    total = 0
    for name, src, n in _tensors(path):
        if src not in _SAFETENSORS_DTYPES:
            total += n * 4 if src in ("U32", "I32") else n
        elif bits and name.endswith("weight") and n >= group_size * 8:
            total += n * bits // 8 + 2 * (n // group_size) * _BYTES[dtype]
        else:
            total += n * _BYTES[dtype]
    return total


def check_dtype(name: str | None, flag: str) -> None:
    if name is not None and name not in DTYPES:
        raise ConvertError(f"{flag} must be one of {', '.join(DTYPES)}, got {name!r}")


def check_output(out: Path, force: bool, sources: list[Path]) -> None:
    out = out.expanduser().resolve()
    for src in sources:
        src = src.resolve()
        if out == src or out in src.parents:
            raise ConvertError(f"output folder {out} would overwrite the source {src}: choose another --out")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output path {out} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"output folder {out} is not empty (pass --force to replace it)")


def check_disk(out: Path, need: int) -> None:
    where = out.expanduser().resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need * DISK_MARGIN:
        raise ConvertError(f"not enough disk space in {where}: the converted model needs about "
                           f"{human(need, 'B')}, {human(free, 'B')} is free")


def check_pair(target_path: Path, drafter_path: Path | None) -> tuple[dict, dict | None]:
    """Both configs, refusing a non-Gemma-4 target and a drafter made for another target."""
    cfg = read_config(target_path)
    kind = cfg.get("model_type")
    if kind in DRAFTER_TYPES:
        raise ConfigError(f"{target_path} holds a {kind} drafter, not a target: pass the target "
                          "(its drafter is found beside it, or give it with --drafter)")
    if kind not in TARGET_TYPES:
        raise ConfigError(f"{target_path} is not a Gemma 4 checkpoint: model_type {kind!r}, expected one of "
                          f"{', '.join(TARGET_TYPES)}")
    target = gemma4.TextConfig.from_dict(_text_config(cfg))
    if drafter_path is None:
        return cfg, None
    dcfg = read_config(drafter_path)
    if dcfg.get("model_type") not in DRAFTER_TYPES:
        raise DrafterMismatchError(f"{drafter_path} is not a Gemma 4 assistant: model_type "
                                   f"{dcfg.get('model_type')!r}, expected one of {', '.join(DRAFTER_TYPES)}")
    sources = {kind: target.last_layer_of(kind) for kind in set(target.layer_types)}
    assistant.check_compatible(assistant.AssistantConfig.from_dict(dcfg), target, sources)
    return cfg, dcfg


# ---------------------------------------------------------------------------------------------
# Conversion


def dequantize(model: nn.Module) -> None:
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)


def quantize(model: nn.Module, bits: int, group_size: int) -> None:
    """Affine-quantize every layer that can be (weights' last dim divisible by the group)."""

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        if path.endswith("router.proj"):
            return ROUTER_QUANT if module.weight.shape[-1] % ROUTER_QUANT["group_size"] == 0 else False
        return True

    nn.quantize(model, group_size, bits, class_predicate=predicate)


def quantization_config(model: nn.Module) -> dict | None:
    """mlx-lm's config entry for the model as it is: the common {group_size, bits, mode} and a
    per-layer entry for every quantized layer that differs from it."""
    layers = {path: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
              for path, m in model.named_modules() if hasattr(m, "bits") and "scales" in m}
    if not layers:
        return None
    common = Counter(tuple(v.items()) for v in layers.values()).most_common(1)[0][0]
    out = dict(common)
    out.update({path: v for path, v in sorted(layers.items()) if tuple(v.items()) != common})
    return out


def cast(model: nn.Module, dtype: str) -> None:
    to = DTYPES[dtype]
    model.apply(lambda x: x.astype(to) if mx.issubdtype(x.dtype, mx.floating) else x)


def write_weights(folder: Path, weights: dict[str, mx.array], progress: Progress, step: str) -> list[str]:
    """model.safetensors, or mlx-lm's shards plus an index past SHARD_BYTES."""
    shards, size = [{}], 0
    for name, array in weights.items():
        if shards[-1] and size + array.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    total = sum(a.nbytes for a in weights.values())
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    done = 0
    progress(step, 0, total)
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        done += sum(a.nbytes for a in shard.values())
        progress(step, done, total)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _config_out(cfg: dict, dtype: str, quant: dict | None) -> dict:
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config", "torch_dtype",
                                                      "transformers_version")}
    cfg["dtype"] = dtype
    if quant:
        cfg["quantization"] = quant
        cfg["quantization_config"] = quant  # the key Hugging Face tools read
    return cfg


# transformers' text-only class for each text decoder, named in the converted config.json.
_CAUSAL_LM = {gemma4.GEMMA4_TEXT: "Gemma4ForCausalLM", gemma4.UNIFIED_TEXT: "Gemma4UnifiedForCausalLM"}


def _target_config(cfg: dict) -> dict:
    text = dict(_text_config(cfg))
    text["model_type"] = TARGET_TYPES[cfg["model_type"]]
    text["architectures"] = [_CAUSAL_LM[text["model_type"]]]
    return text


def probe_ids(spec: SpecModel, text: str) -> list[int]:
    if spec.tokenizer is not None:
        ids = list(spec.tokenizer.encode(text))
    else:
        vocab = spec.target.config.vocab_size
        ids = [(3 + 7 * i) % vocab for i in range(16)]
    return ids


def probe(spec: SpecModel, ids: list[int]) -> dict[str, np.ndarray]:
    """Target logits at every probe position, and the drafter's first greedy draft steps."""
    from ..decode import target_kv

    cache = new_cache(spec, 1, max_step=len(ids))
    hidden = spec.target(mx.array([ids]), Step((0,), len(ids)), cache)
    logits = spec.target.logits(hidden)[0].astype(mx.float32)
    out = {"logits": np.array(logits)}
    if spec.drafter is not None:
        kv, position = target_kv(spec, cache), mx.array([len(ids)])
        token, h = mx.argmax(logits[-1:], axis=-1), hidden[:, -1:]
        steps, tokens = [], []
        for _ in range(DRAFT_PROBE_STEPS):
            draft = spec.drafter(token, h, position, kv)
            dense = draft.logits.astype(mx.float32)
            if draft.candidates is not None:  # centroid head: unscored tokens are -inf
                full = mx.full((1, spec.target.config.vocab_size), -np.inf, dtype=mx.float32)
                dense = mx.put_along_axis(full, draft.candidates, dense, axis=-1)
            steps.append(np.array(dense[0]))
            token, h = draft.greedy_tokens(), draft.hidden
            tokens.append(int(token.item()))
        out["draft_logits"], out["drafts"] = np.stack(steps), np.array(tokens)
    return out


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[both] - b[both]).max()) if both.any() else float("inf")


def convert(plan: Plan, progress: Progress | None = None) -> Report:
    """Check, convert, write, then load the result and compare it with the source."""
    progress = progress or (lambda step, done, total: None)
    started = time.perf_counter()
    check_dtype(plan.dtype, "--dtype")
    check_dtype(plan.drafter_dtype, "--drafter-dtype")
    for bits, flag in ((plan.bits, "--quantize"), (plan.drafter_bits, "--drafter-quantize")):
        if bits is not None and bits not in (4, 8):
            raise ConvertError(f"{flag} must be 4 or 8, got {bits}")
    for size, flag in ((plan.group_size, "--group-size"), (plan.drafter_group_size, "--drafter-group-size")):
        if size not in GROUP_SIZES:
            raise ConvertError(f"{flag} must be one of {', '.join(map(str, GROUP_SIZES))} (MLX's affine "
                               f"quantization), got {size}")
    out = Path(plan.out).expanduser()

    progress("checking", 0, 1)
    target_path = resolve(plan.source)
    drafter_path = locate_drafter(plan.source, target_path, plan.drafter)
    cfg, dcfg = check_pair(target_path, drafter_path)
    check_output(out, plan.force, [p for p in (target_path, drafter_path) if p is not None])
    dtype = plan.dtype or source_dtype(target_path)
    ddtype = plan.drafter_dtype or plan.dtype or (source_dtype(drafter_path) if drafter_path else None)
    need = estimate_bytes(target_path, dtype, plan.bits, plan.group_size)
    if drafter_path is not None:
        need += estimate_bytes(drafter_path, ddtype, plan.drafter_bits, plan.drafter_group_size)
    check_disk(out, need)
    progress("checking", 1, 1)

    progress("loading the source", 0, 1)
    spec = load(target_path, drafter_path or False)
    ids = probe_ids(spec, plan.probe)
    reference = probe(spec, ids)
    progress("loading the source", 1, 1)

    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        report = _write(spec, cfg, dcfg, target_path, work, dtype, ddtype, plan, progress)
        del spec
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report.out = out

    progress("checking the result", 0, 1)
    converted = load(out)
    got = probe(converted, ids)
    report.probe_tokens = len(ids)
    report.max_logit_diff = _max_diff(reference["logits"], got["logits"])
    report.top1_agreement = float((reference["logits"].argmax(-1) == got["logits"].argmax(-1)).mean())
    if "drafts" in reference and "drafts" in got:
        report.drafter_max_logit_diff = _max_diff(reference["draft_logits"][0], got["draft_logits"][0])
        report.drafts_agree = (int((reference["drafts"] == got["drafts"]).sum()), DRAFT_PROBE_STEPS)
    progress("checking the result", 1, 1)
    report.seconds = time.perf_counter() - started
    return report


def _prepare(model, dtype, bits, group_size, role: str, progress) -> tuple[dict, dict | None]:
    """Cast and (re-)quantize one model as the plan says; its weights, evaluated, and its
    quantization config."""
    progress(f"preparing the {role}", 0, 1)
    if bits is not None and quantization_config(model):
        dequantize(model)  # re-quantizing starts from the dequantized weights
    cast(model, dtype)
    if bits is not None:
        quantize(model, bits, group_size)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(list(weights.values()))
    progress(f"preparing the {role}", 1, 1)
    return weights, quantization_config(model)


def _write(spec, cfg, dcfg, target_path, work, dtype, ddtype, plan, progress) -> Report:
    target = spec.target
    weights, quant = _prepare(target, dtype, plan.bits, plan.group_size, "target", progress)
    files = write_weights(work, weights, progress, "writing the target")
    (work / "config.json").write_text(json.dumps(_config_out(_target_config(cfg), dtype, quant), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (target_path / name).exists():
            shutil.copy2(target_path / name, work / name)
            files.append(name)
    report = Report(out=work, target_dtype=dtype, target_quantization=quant,
                    target_bytes=sum(a.nbytes for a in weights.values()),
                    embedding_bytes=weights["model.embed_tokens.weight"].nbytes
                    + sum(a.nbytes for k, a in weights.items() if k.startswith("model.embed_tokens.")
                          and k != "model.embed_tokens.weight"),
                    files=files)
    if spec.drafter is None:
        return report

    # The drafter's parameters leave out the target's table it reads through: stored once, above.
    dweights, dquant = _prepare(spec.drafter, ddtype, plan.drafter_bits, plan.drafter_group_size, "drafter", progress)
    (work / "drafter").mkdir()
    dfiles = write_weights(work / "drafter", dweights, progress, "writing the drafter")
    (work / "drafter" / "config.json").write_text(json.dumps(_config_out(dcfg, ddtype, dquant), indent=2) + "\n")
    report.files += [f"drafter/{f}" for f in dfiles + ["config.json"]]
    report.drafter_dtype, report.drafter_quantization = ddtype, dquant
    report.drafter_bytes = sum(a.nbytes for a in dweights.values())
    return report


def _quant_text(q: dict | None) -> str:
    if not q:
        return "not quantized"
    extra = sum(isinstance(v, dict) for v in q.values())
    return f"{q['bits']}-bit, group size {q['group_size']}" + (f" ({extra} layers differ)" if extra else "")


def report_lines(r: Report) -> list[str]:
    lines = [f"wrote {r.out}",
             f"  target : {human(r.target_bytes, 'B')}, {r.target_dtype}, {_quant_text(r.target_quantization)}; "
             f"embedding {human(r.embedding_bytes, 'B')}, stored once"]
    if r.drafter_dtype:
        lines.append(f"  drafter: {human(r.drafter_bytes, 'B')} in drafter/, {r.drafter_dtype}, "
                     f"{_quant_text(r.drafter_quantization)}; reads the target's embedding")
    else:
        lines.append("  drafter: none (the result decodes plainly; give one with --drafter)")
    lines.append(f"  check on a {r.probe_tokens}-token probe: max |logit difference| vs the source "
                 f"{r.max_logit_diff:.3g}, same next token at {r.top1_agreement:.0%} of positions")
    if r.drafts_agree is not None:
        lines.append(f"  drafter: max |logit difference| at the first draft step {r.drafter_max_logit_diff:.3g}, "
                     f"{r.drafts_agree[0]}/{r.drafts_agree[1]} greedy drafts the same")
    lines.append(f"  load it: mlx-specdec chat --model {r.out}   ({r.seconds:.1f} s)")
    return lines
