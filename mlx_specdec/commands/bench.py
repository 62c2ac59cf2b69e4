"""`mlx-specdec bench`: tokens/s of speculative decoding against plain decoding, per workload,
batch size and draft mode, measured in one process so the comparisons are like for like.

Reading order: workloads, the measurement of one cell, the whole run, then what turns a run into
a table, markdown, JSON and a chart. Nothing here prints; the CLI renders.

What a cell reports, for one workload, batch size B and mode (plain = k 0, fixed k, or auto):
- tokens/s: the median over repeated runs (warm-up runs excluded) of generated tokens over
  decode time (wall time minus the prefill; each row's first token comes from the prefill and
  is not counted, as in mlx-lm). A run sends every prompt of the workload once, B at a time.
  Answers run to max_tokens, EOS ignored (unless ``stop_at_eos``), so every mode of a workload
  times the same tokens, and rows of a batch finish together.
- speedup: over plain decoding, same workload and B: the median over runs of each run's
  tokens/s over plain's in the same round of runs (the modes take turns, so a burst of load
  from other processes falls on one round of all modes, and the ratio cancels most of it).
- acceptance a: the chance a draft position is accepted given all before it were, pooled over
  positions (the estimate of a constant rate that the geometric model below assumes).
- tokens/round: what each target pass yielded per row (accepted drafts + the target's token).
- ceiling E(k) = (1 - a^(k+1)) / (1 - a): tokens per round expected at acceptance a; it is the
  speedup drafting could give if drafting were free and verifying k + 1 tokens cost as much as
  one (Leviathan et al. 2023). For auto, E is averaged over the k it chose, round by round.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from ..api import generate, generate_batch
from ..distributed import Footprint
from ..errors import InputError
from ..loading import SpecModel
from .common import human, openblas_loaded
from ..prompt import encode_messages, encode_text, user_turn
from ..policy import K_MAX, DraftPolicy, expected_tokens, parse_draft_tokens

WORKLOADS_FILE = Path(__file__).with_name("bench_workloads.json")
DEFAULT_BATCH_SIZES = (1, 2, 4)
DEFAULT_MODES: tuple[int | str, ...] = (0, 1, 2, 3, 4, 5, 6, "auto")

# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    prompts: tuple[str, ...]
    chat: bool = False  # each prompt is a user turn through the chat template
    max_tokens: int | None = None  # the workload's own answer length (e.g. short answers)


def load_workloads(path: str | Path | None = None, names: Sequence[str] | None = None) -> list[Workload]:
    """The built-in workloads (or those in ``path``), optionally only ``names``, in file order."""
    path = Path(path) if path else WORKLOADS_FILE
    try:
        raw = json.loads(path.read_text())["workloads"]
        workloads = [Workload(w["name"], w.get("description", ""), tuple(w["prompts"]), bool(w.get("chat", False)),
                              w.get("max_tokens")) for w in raw]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"could not read workloads from {path}: {type(e).__name__}: {e}") from None
    if names:
        known = {w.name for w in workloads}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"unknown workload(s) {', '.join(unknown)}: expected some of {', '.join(sorted(known))}")
        workloads = [w for w in workloads if w.name in names]
    if not workloads or any(not w.prompts for w in workloads):
        raise InputError(f"{path} has a workload without prompts")
    return workloads


def parse_modes(text: str) -> list[int | str]:
    """'plain,1-6,auto' -> [0, 1, ..., 6, 'auto']: draft lengths as `parse_draft_tokens` reads
    them, and ranges a-b of k."""
    modes: list[int | str] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        lo, dash, hi = part.partition("-")
        if dash:
            a, b = parse_draft_tokens(lo), parse_draft_tokens(hi)
            if "auto" in (a, b):
                raise InputError(f"a range of draft lengths is a-b of integers, got {part!r}")
            modes += list(range(a, b + 1))
        else:
            modes.append(parse_draft_tokens(part))
    if not modes:
        raise InputError("no modes given: expected e.g. plain,1-6,auto")
    if 0 not in modes:
        modes.insert(0, 0)  # speedups are against plain decoding in the same run
    return list(dict.fromkeys(modes))


def mode_name(mode: int | str) -> str:
    return "plain" if mode == 0 else "auto" if mode == "auto" else f"k={mode}"


def encode_prompts(spec: SpecModel, workload: Workload) -> list[list[int]]:
    tok = spec.tokenizer
    if tok is None:
        raise InputError(f"bench needs a tokenizer, and {spec.name} has no tokenizer files")
    if workload.chat and tok.has_chat_template:
        return [encode_messages(tok, user_turn(p)) for p in workload.prompts]
    return [encode_text(tok, p) for p in workload.prompts]


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Cell:
    """One workload x batch size x mode, aggregated over its timed runs."""

    workload: str
    batch_size: int
    mode: str
    runs_tokens_per_second: list[float]
    generated_tokens: int  # per run (the last one)
    rounds: int = 0  # row-rounds over all timed runs
    drafted: int = 0
    accepted: int = 0
    reached_by_position: list[int] = field(default_factory=lambda: [0] * K_MAX)
    accepted_by_position: list[int] = field(default_factory=lambda: [0] * K_MAX)
    k_histogram: dict[int, int] = field(default_factory=dict)
    speedup: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return statistics.median(self.runs_tokens_per_second)

    @property
    def spread(self) -> float | None:
        """Fastest run over slowest (None with one run)."""
        runs = self.runs_tokens_per_second
        return max(runs) / min(runs) if len(runs) > 1 and min(runs) > 0 else None

    @property
    def acceptance(self) -> float | None:
        reached = sum(self.reached_by_position)
        return sum(self.accepted_by_position) / reached if reached else None

    @property
    def tokens_per_round(self) -> float | None:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else None

    @property
    def ceiling(self) -> float | None:
        """E(k) at the measured acceptance, averaged over the rounds' k."""
        a = self.acceptance
        drafting = {k: n for k, n in self.k_histogram.items() if k}
        if a is None or not drafting:
            return None
        total = sum(self.k_histogram.values())
        return sum(n * expected_tokens([a] * k, k) for k, n in self.k_histogram.items()) / total

    @property
    def auto_choice(self) -> str:
        """The rounds' k as 'k=3: 80%, k=0: 20%' (what auto chose; a fixed k shows itself)."""
        total = sum(self.k_histogram.values())
        if not total:
            return "-"
        top = sorted(self.k_histogram.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"k={k}: {n / total:.0%}" for k, n in top)

    def add(self, stats) -> None:
        for s in stats:
            self.rounds += s.rounds
            self.drafted += s.drafted
            self.accepted += s.accepted
            for i in range(K_MAX):
                self.reached_by_position[i] += s.reached_by_position[i]
                self.accepted_by_position[i] += s.accepted_by_position[i]
            for k, n in s.k_histogram.items():
                self.k_histogram[k] = self.k_histogram.get(k, 0) + n

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("reached_by_position", "accepted_by_position")}
        out.update(tokens_per_second=self.tokens_per_second, acceptance=self.acceptance,
                   acceptance_rate=self.accepted / self.drafted if self.drafted else None,
                   tokens_per_round=self.tokens_per_round, ceiling=self.ceiling,
                   k_histogram={str(k): n for k, n in sorted(self.k_histogram.items())})
        return out


@dataclass(frozen=True)
class Settings:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    modes: tuple[int | str, ...] = DEFAULT_MODES
    max_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    temperature: float = 0.0
    seed: int = 0
    stop_at_eos: bool = False

    def __post_init__(self):
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise InputError(f"batch sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if self.repeats < 1 or self.warmup < 0 or self.max_tokens < 2:
            raise InputError("repeats must be >= 1, warmup >= 0 and max_tokens >= 2")


def one_run(spec: SpecModel, prompts: list[list[int]], batch: int, mode: int | str, max_tokens: int,
            settings: Settings) -> tuple[float, int, list]:
    """Send every prompt once, ``batch`` at a time: (tokens/s, tokens, per-row stats)."""
    groups = [[prompts[(i + j) % len(prompts)] for j in range(batch)] for i in range(0, len(prompts), batch)]
    kw = dict(max_tokens=max_tokens, temperature=settings.temperature, seed=settings.seed, draft_tokens=mode)
    tokens, seconds, stats = 0, 0.0, []
    for group in groups:
        start = time.perf_counter()
        results = [generate(spec, group[0], **kw)] if batch == 1 else generate_batch(spec, group, **kw)
        wall = time.perf_counter() - start
        rows = [r.stats for r in results]
        seconds += wall - max(s.prefill_seconds for s in rows)
        tokens += sum(max(s.generated_tokens - 1, 0) for s in rows)
        stats += rows
    return (tokens / seconds if seconds > 0 else 0.0), tokens, stats


@dataclass
class BenchResult:
    environment: dict
    settings: dict
    workloads: list[dict]
    cells: list[Cell]
    command: str = ""

    def as_dict(self) -> dict:
        return dict(command=self.command, environment=self.environment, settings=self.settings,
                    workloads=self.workloads, cells=[c.as_dict() for c in self.cells])


def total_runs(workloads: list[Workload], settings: Settings) -> int:
    return len(workloads) * len(settings.batch_sizes) * len(settings.modes) * (settings.repeats + settings.warmup)


def run(spec: SpecModel, workloads: list[Workload], settings: Settings,
        on_run: Callable[[str], None] | None = None) -> list[Cell]:
    """Measure every cell; ``on_run(description)`` after each run (warm-ups included).

    The modes of one workload and batch size take turns, run by run, so that a change in the
    machine's load (other processes) falls on all of them alike rather than on whichever
    mode happened to run then."""
    if spec.drafter is None and any(m != 0 for m in settings.modes):
        raise InputError(f"{spec.name} has no drafter: only plain decoding can be measured (pass --drafter)")
    # Copies that share the weights: their own EOS set, and for auto its own draft policy.
    model = replace(spec, eos_token_ids=spec.eos_token_ids if settings.stop_at_eos else frozenset())
    cells = []
    for w in workloads:
        prompts = encode_prompts(spec, w)
        max_tokens = w.max_tokens or settings.max_tokens
        for batch in settings.batch_sizes:
            auto = replace(model, policy=DraftPolicy())  # learns from scratch in its warm-up
            row = {mode: Cell(w.name, batch, mode_name(mode), [], 0) for mode in settings.modes}
            for i in range(settings.warmup + settings.repeats):
                for mode, cell in row.items():
                    tps, tokens, stats = one_run(auto if mode == "auto" else model, prompts, batch, mode,
                                                 max_tokens, settings)
                    if i >= settings.warmup:
                        cell.runs_tokens_per_second.append(tps)
                        cell.generated_tokens = tokens
                        cell.add(stats)
                    if on_run:
                        on_run(f"{w.name} B={batch} {mode_name(mode)}")
            plain = row[0].runs_tokens_per_second if 0 in row else None
            for cell in row.values():
                if plain:
                    cell.speedup = statistics.median(t / p for t, p in zip(cell.runs_tokens_per_second, plain))
                cells.append(cell)
    return cells


# ---------------------------------------------------------------------------------------------
# The environment


def _params(module) -> tuple[int, int, set[str]]:
    """(parameters, bytes, dtypes) of a module; quantized weights count their unpacked size."""
    count, size, dtypes = 0, 0, set()
    quantized = {}
    for name, m in module.named_modules():
        if hasattr(m, "bits") and "scales" in m:
            quantized[f"{name}.weight" if name else "weight"] = m.bits
    for name, a in tree_flatten(module.parameters()):
        size += a.nbytes
        if name in quantized:
            count += a.size * 32 // quantized[name]
            dtypes.add(f"{quantized[name]}-bit")
        elif not name.endswith((".scales", ".biases")) or name.rsplit(".", 1)[0] + ".weight" not in quantized:
            count += a.size
            if mx.issubdtype(a.dtype, mx.floating):
                dtypes.add(str(a.dtype).removeprefix("mlx.core."))
    return count, size, dtypes


def environment(spec: SpecModel, blas_warning: str | None) -> dict:
    device = mx.default_device()
    env = {
        "mlx": mx.__version__,
        "device": str(device.type).rsplit(".", 1)[-1],
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }
    if device.type == mx.DeviceType.gpu and hasattr(mx, "metal") and mx.metal.is_available():
        env["device_name"] = mx.metal.device_info().get("device_name", "")
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["cpus"] = os.cpu_count()
        if sys.platform.startswith("linux"):
            env["blas"] = "OpenBLAS" if openblas_loaded() else "MLX's bundled BLAS"
    n, size, dtypes = _params(spec.target)
    env["model"] = {"name": spec.name, "parameters": n, "bytes": size, "dtype": "/".join(sorted(dtypes))}
    if spec.drafter is not None:
        n, size, dtypes = _params(spec.drafter)
        env["drafter"] = {"name": spec.drafter_name, "parameters": n, "bytes": size,
                          "dtype": "/".join(sorted(dtypes))}
    else:
        env["drafter"] = None
    # "auto" starts from what earlier processes measured when the policy is kept on disk.
    env["policy_file"] = str(spec.policy_file) if spec.policy_file else None
    env["policy_measured_before"] = bool(spec.policy.costs.verify)
    env["blas_warning"] = blas_warning
    env["footprint"] = spec.footprint.as_dict() if spec.footprint is not None else None
    return env


def environment_lines(env: dict) -> list[str]:
    lines = [f"MLX {env['mlx']} on {env['device']} ({env['device_name']}"
             + (f", {env['cpus']} CPUs" if env.get("cpus") else "") + (f", {env['blas']}" if env.get("blas") else "")
             + f"), {env['platform']}, Python {env['python']}"]
    m = env["model"]
    lines.append(f"target  {m['name']}: {human(m['parameters'])} parameters, {human(m['bytes'], 'B')}, {m['dtype']}")
    d = env.get("drafter")
    if d:
        lines.append(f"drafter {d['name']}: {human(d['parameters'])} parameters, {human(d['bytes'], 'B')}, "
                     f"{d['dtype']}")
    else:
        lines.append("drafter none")
    if env.get("policy_file"):
        before = "what earlier runs measured" if env["policy_measured_before"] else "nothing measured yet"
        lines.append(f"policy  {env['policy_file']}: auto starts from {before} (MLX_SPECDEC_CACHE=off: fresh)")
    footprint = env.get("footprint")
    if footprint and footprint["processes"] > 1:
        lines.append("sharded " + Footprint(**footprint).line())
    if env.get("blas_warning"):
        lines.append("warning: " + env["blas_warning"])
    return lines


# ---------------------------------------------------------------------------------------------
# Rendering

COLUMNS = ("workload", "B", "mode", "tok/s", "speedup", "accept a", "tok/round", "ceiling E(k)", "k chosen")

FOOTNOTE = ("tok/s: median decode tokens/s over the runs. speedup: over plain, same workload and B, the median of "
            "run-by-run ratios (the modes take turns, so load from other processes falls on all of them alike); it "
            "need not equal the ratio of the tok/s medians, and is the better estimate. accept a: acceptance of a "
            "draft position given the ones before it were accepted. tok/round: tokens per target pass per row. "
            "ceiling E(k) = (1 - a^(k+1)) / (1 - a): the speedup if drafting were free and verifying k + 1 tokens "
            "cost one. k chosen: the draft lengths auto used, by share of rounds.")

SPREAD_WARNING = 1.5
"""Runs of one cell whose fastest is this many times the slowest: the machine was busy, the median
of few runs may mislead, and more --repeats (or a quieter machine) are needed."""


def spread_warning(cells: list[Cell]) -> str | None:
    """One line naming the cells whose runs spread widely, or None."""
    wide = [c for c in cells if c.spread is not None and c.spread >= SPREAD_WARNING]
    if not wide:
        return None
    worst = sorted(wide, key=lambda c: -c.spread)
    named = ", ".join(f"{c.workload} B={c.batch_size} {c.mode} {c.spread:.1f}x" for c in worst[:4])
    more = f" and {len(wide) - 4} more" if len(wide) > 4 else ""
    return (f"the runs of {len(wide)} cell(s) spread by {SPREAD_WARNING}x or more (fastest/slowest): {named}{more}; "
            "the machine was busy: read those with care, or rerun with more --repeats")


def row(cell: Cell) -> list[str]:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    return [cell.workload, str(cell.batch_size), cell.mode, f"{cell.tokens_per_second:.1f}",
            f(cell.speedup, ".2f") + ("x" if cell.speedup is not None else ""), f(cell.acceptance, ".2f"),
            f(cell.tokens_per_round, ".2f"), f(cell.ceiling, ".2f"),
            cell.auto_choice if cell.mode == "auto" else "-"]


AUTO_COLUMNS = ("workload, B", "auto vs plain", "best fixed k", "its speedup", "auto vs best fixed k",
                "vs best, held out")
AUTO_FOOTNOTE = ("auto vs plain: the floor (auto should never be slower than plain decoding); auto vs best fixed k: the "
                 "ceiling, the median of auto's tokens/s over the best fixed k's run by run (as the speedups), where "
                 "the best is picked after the fact from the same noisy runs (so it is flattered: with several k of "
                 "equal worth the luckiest one is picked); held out: the best picked on every other run and auto "
                 "compared with it on the runs in between, and the other way round.")


def _ratios(a: Cell, b: Cell, runs: Sequence[int] | None = None) -> list[float]:
    """a's tokens/s over b's in the same repeat, for every run (or those indexed)."""
    pairs = list(zip(a.runs_tokens_per_second, b.runs_tokens_per_second))
    return [x / y for x, y in (pairs if runs is None else [pairs[i] for i in runs])]


def _versus(a: Cell, b: Cell, runs: Sequence[int] | None = None) -> float:
    """The median of `_ratios`: a against b run by run, as the speedups are."""
    return statistics.median(_ratios(a, b, runs))


def _held_out(auto: Cell, fixed: list[Cell], plain: Cell) -> float | None:
    """auto over the best fixed k, the best picked on the even runs and compared on the odd ones,
    then the other way round: a pick that is not flattered by the runs it is judged on."""
    n = len(auto.runs_tokens_per_second)
    if n < 2:
        return None
    ratios = []
    for half in (0, 1):
        pick, judge = [i for i in range(n) if i % 2 == half], [i for i in range(n) if i % 2 != half]
        best = max(fixed, key=lambda c: _versus(c, plain, pick))
        ratios += _ratios(auto, best, judge)
    return statistics.median(ratios)


def auto_summary(cells: list[Cell]) -> list[list[str]]:
    """Per workload and batch size with an auto cell: auto against plain (the floor) and against
    the best fixed k (the ceiling), run by run, and against a best fixed k picked on other runs."""
    rows = []
    keys = list(dict.fromkeys((c.workload, c.batch_size) for c in cells))
    for workload, batch in keys:
        mine = [c for c in cells if (c.workload, c.batch_size) == (workload, batch) and c.speedup is not None]
        auto = next((c for c in mine if c.mode == "auto"), None)
        plain = next((c for c in mine if c.mode == "plain"), None)
        fixed = [c for c in mine if c.mode.startswith("k=")]
        if auto is None:
            continue
        best = max(fixed, key=lambda c: c.speedup, default=None)
        held = _held_out(auto, fixed, plain) if best and plain else None
        rows.append([f"{workload}, B={batch}", f"{auto.speedup:.2f}x",
                     best.mode if best else "-", f"{best.speedup:.2f}x" if best else "-",
                     f"{_versus(auto, best):.2f}x" if best else "-", f"{held:.2f}x" if held else "-"])
    return rows


def to_markdown(result: BenchResult) -> str:
    lines = ["# mlx-specdec bench", ""]
    if result.command:
        lines += ["```", result.command, "```", ""]
    lines += [f"- {line}" for line in environment_lines(result.environment)]
    s = result.settings
    decoding = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}"
    length = "stopping at EOS" if s.get("stop_at_eos") else "EOS ignored"
    lines += [f"- {decoding}, answers of {s['max_tokens']} tokens ({length}; workloads may set their own), "
              f"median of {s['repeats']} runs after {s['warmup']} warm-up", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(c)) + " |" for c in result.cells]
    lines += ["", FOOTNOTE, ""]
    summary = auto_summary(result.cells)
    if summary:
        lines += ["## auto against the floor and the ceiling", ""]
        lines += ["| " + " | ".join(AUTO_COLUMNS) + " |", "|" + "---|" * len(AUTO_COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in summary]
        lines += ["", AUTO_FOOTNOTE, ""]
    warning = spread_warning(result.cells)
    if warning:
        lines += [f"Warning: {warning}.", ""]
    return "\n".join(lines)


def chart_title(env: dict) -> str:
    """The model and the machine, for the chart's title."""
    machine = env["device_name"] + (f", {env['cpus']} CPUs" if env.get("cpus") else "") + (
        f", {env['blas']}" if env.get("blas") else "")
    return f"speedup over plain decoding: {Path(env['model']['name']).name} on {env['device']} ({machine})"


def chart(result: BenchResult, path: str | Path) -> Path:
    """Speedup against k per workload, one line per batch size, auto as a dashed level. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(c.workload for c in result.cells))
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False, sharey=True)
    fig.suptitle(chart_title(result.environment), fontsize="medium")
    for ax, name in zip(axes[0], names):
        cells = [c for c in result.cells if c.workload == name]
        for b in sorted({c.batch_size for c in cells}):
            fixed = sorted(((0 if c.mode == "plain" else int(c.mode[2:]), c.speedup) for c in cells
                            if c.batch_size == b and c.mode != "auto" and c.speedup is not None))
            line, = ax.plot([k for k, _ in fixed], [s for _, s in fixed], marker="o", label=f"B={b}")
            for c in cells:
                if c.batch_size == b and c.mode == "auto" and c.speedup is not None:
                    ax.axhline(c.speedup, color=line.get_color(), linestyle="--", linewidth=1)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("draft length k (dashed: auto)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # k is a count
    axes[0][0].set_ylabel("speedup over plain")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
