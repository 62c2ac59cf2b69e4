"""What the commands share: the BLAS hint, sizes in words, and the one-line answer summary."""

from __future__ import annotations

import os
import sys
import time
from functools import cache
from pathlib import Path

import mlx.core as mx

# ---------------------------------------------------------------------------------------------
# The BLAS on Linux

SLOW_MATMUL_SECONDS = 0.02
"""A 512x512 fp32 matmul slower than this means MLX's bundled reference BLAS: it takes ~70-110 ms
on a 2-core x86 machine where OpenBLAS takes 2-7 ms."""

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def openblas_loaded() -> bool:
    """Is OpenBLAS mapped into this process as the BLAS (e.g. through LD_PRELOAD)? numpy's own
    bundled copy (libscipy_openblas*) does not count: MLX does not call it."""
    try:
        paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    except OSError:
        return False
    return any("openblas" in p.lower() and Path(p).name.startswith(("libblas", "libopenblas")) for p in paths)


def matmul_seconds(n: int = 512, tries: int = 3) -> float:
    """Best time of an n x n fp32 matmul on the default device."""
    a = mx.random.normal((n, n))
    mx.eval(a)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        mx.eval(a @ a)
        best = min(best, time.perf_counter() - start)
    return best


def reference_blas_warning() -> str | None:
    """On Linux's CPU backend: a line saying how to leave MLX's slow bundled BLAS, if it is in use.
    (MLX's Linux wheel bundles a reference BLAS: decoding runs at about half the speed.)"""
    if not sys.platform.startswith("linux") or mx.default_device().type != mx.DeviceType.cpu:
        return None
    if openblas_loaded():
        return None
    seconds = matmul_seconds()
    if seconds < SLOW_MATMUL_SECONDS:
        return None
    have = Path(OPENBLAS).exists()
    return (f"MLX is using its slow reference BLAS (a 512x512 fp32 matmul takes {seconds * 1000:.0f} ms): "
            + ("" if have else "install OpenBLAS (Debian/Ubuntu: apt install libopenblas0-pthread), then ")
            + f"run with LD_PRELOAD={OPENBLAS}")


@cache
def blas_hint() -> str | None:
    """`reference_blas_warning`, measured once per process: every command that computes prints
    it, and bench also records it in its results. MLX_SPECDEC_BLAS_HINT=off silences it (where
    OpenBLAS cannot be had, and in the tests, whose output must not depend on the machine)."""
    if os.environ.get("MLX_SPECDEC_BLAS_HINT", "").lower() == "off":
        return None
    return reference_blas_warning()


def print_blas_hint() -> None:
    """The BLAS hint on stderr, one line, when there is one."""
    hint = blas_hint()
    if hint:
        print(f"warning: {hint}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Words


def human(n: float, unit: str = "") -> str:
    """Counts and sizes in words, decimal prefixes: 6912345 -> '6.91M'; (7.5e6, 'B') -> '7.5 MB'."""
    space = " " if unit else ""
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{space}{suffix}{unit}" if suffix else f"{n:.0f}{space}{unit}"
        n /= 1000
    return f"{n:.3g}{space}P{unit}"


def draft_label(stats, draft_tokens: int | str, has_drafter: bool) -> str:
    """What drafting did in a request: off, a fixed k, or what auto mostly chose."""
    if not has_drafter:
        return "draft off (no drafter)"
    if draft_tokens == 0:
        return "draft off"
    if draft_tokens != "auto":
        return f"draft k={draft_tokens}"
    used = {k: n for k, n in stats.k_histogram.items() if k}
    kept = ", policy kept from earlier runs" if stats.policy_kept else ""
    if not used:
        return f"draft auto: off{' (' + kept[2:] + ')' if kept else ''}"  # the off reason follows
    drafting, rounds = sum(used.values()), sum(stats.k_histogram.values())
    if 2 * drafting < rounds:
        return f"draft auto: mostly off (drafted in {drafting} of {rounds} rounds{kept})"
    return f"draft auto: on (mostly k={max(used, key=used.get)}{kept})"


def status_line(stats, draft_tokens: int | str, has_drafter: bool, prompt: str, width: int | None = None) -> str:
    """One line after an answer (generate's summary, chat's status): tokens, speed, acceptance,
    tokens per round, drafting, and ``prompt`` (how the prompt was read). With ``width``, the
    least telling parts go first until it fits, so it never wraps in a terminal."""
    per_round = 1 + stats.mean_accepted_per_round if stats.rounds else 1.0
    parts = [
        f"{stats.generated_tokens} tokens",
        f"{stats.tokens_per_second:.1f} tok/s",
        f"acceptance {stats.acceptance_rate:.0%}" if stats.drafted else "acceptance -",
        f"{per_round:.2f} tokens/round",
        draft_label(stats, draft_tokens, has_drafter),
        prompt,
    ]
    mostly_off = 2 * sum(n for k, n in stats.k_histogram.items() if k) < stats.rounds
    if draft_tokens == "auto" and has_drafter and stats.off_reason and mostly_off:
        parts.append(f"off because {stats.off_reason}")
    line = " · ".join(parts)
    if width is None:
        return line
    # why it stayed off, the prompt, tokens/round, then the draft label
    for drop in ([6] if len(parts) > 6 else []) + [5, 3, 4]:
        if len(line) <= width:
            break
        parts[drop] = ""
        line = " · ".join(p for p in parts if p)
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"
