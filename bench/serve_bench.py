"""Serving benchmark: `mlx-specdec serve` (auto, plain, fixed k) against `mlx_lm.server`.

Both servers run at once, as separate processes, on the same target (the embedded demo pair;
mlx_lm.server gets a plain-text copy of the target folder and uses its own batching). The
load generator drives one system at a time, taking turns run by run: closed-loop (C clients,
each sending its next request when the last one ends) at each concurrency, and open-loop
(Poisson arrivals at a fixed rate, whatever the server's pace). The requests are the
built-in workloads' prompts (mlx_specdec/commands/bench_workloads.json), ``--passes`` times over,
greedy, streamed: one pass is 16 requests, mostly ended early by EOS, about 280 tokens and 2 s at
concurrency 8, where one hiccup of the shared machine moved a run's rate by 5-10%.
The three mlx-specdec modes are one server: each request says its ``draft_tokens``.

Reported per system and load: aggregate throughput (completion tokens over the run's wall
time; median of the repeats and their range, and the median of run-by-run ratios to plain),
time to first token and inter-token latency (p50 and p99 over every request of every repeat; a
speculative chunk can carry several tokens, so ITL is the gap between streamed chunks divided
by the tokens it carried, estimated as the request's mean), and the server process's CPU time
per wall second. Greedy answers of every system are checked against mlx-specdec auto's before
timing.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 nice -n -10 \\
        python bench/serve_bench.py --markdown bench/results/serve_bench.md --json bench/results/serve_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ROOT / "mlx_specdec" / "commands" / "bench_workloads.json"
DEMO = ROOT / "mlx_specdec" / "demo" / "model"


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, name: str, argv: list[str], port: int, log: Path):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                                     env=dict(os.environ, PYTHONPATH=str(ROOT), MLX_SPECDEC_CACHE="off"))

    def wait_ready(self, path: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not start in {timeout:.0f} s:\n{self.log.read_text()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all its threads."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def mlx_lm_copy(into: Path) -> Path:
    """The demo target as a folder mlx_lm loads (gemma4_text): the target's files, no drafter."""
    out = into / "demo-target"
    out.mkdir()
    for f in DEMO.iterdir():
        if f.is_file() and f.name != "README.md":
            os.symlink(f, out / f.name)
    return out


# ---------------------------------------------------------------------------------------------
# Requests and one run


@dataclass
class Request:
    workload: str
    path: str  # /v1/completions or /v1/chat/completions
    body: dict


def requests_from_workloads(max_tokens: int, passes: int = 1) -> list[Request]:
    """Every workload prompt, ``passes`` times over; pass p > 1 numbers its prompts "p. ", so that
    no request repeats an earlier one (a repeated prompt would skip its prefill in the prefix store)."""
    one = _workload_requests(max_tokens)
    return [Request(r.workload, r.path, _numbered(r.body, p)) for p in range(1, passes + 1) for r in one]


def _numbered(body: dict, p: int) -> dict:
    if p == 1:
        return body
    if "prompt" in body:
        return body | {"prompt": f"{p}. {body['prompt']}"}
    return body | {"messages": [m | {"content": f"{p}. {m['content']}"} for m in body["messages"]]}


def _workload_requests(max_tokens: int) -> list[Request]:
    out = []
    for w in json.loads(WORKLOADS.read_text())["workloads"]:
        n = w.get("max_tokens") or max_tokens
        for prompt in w["prompts"]:
            if w["chat"]:
                out.append(Request(w["name"], "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": prompt}], "max_tokens": n}))
            else:
                out.append(Request(w["name"], "/v1/completions", {"prompt": prompt, "max_tokens": n}))
    return out


@dataclass
class Sample:
    """One request as the client saw it."""

    text: str
    tokens: int
    ttft: float
    itl: list[float]  # per token, after the first
    finished: float  # seconds since the run started


@dataclass
class System:
    name: str
    process: Process
    extra: dict = field(default_factory=dict)  # added to every request body


async def one(client: httpx.AsyncClient, system: System, request: Request, start: float) -> Sample:
    body = request.body | system.extra | {"temperature": 0.0, "stream": True,
                                          "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    try:
        return await _stream(client, system, request.path, body, sent, start)
    except httpx.TransportError as e:  # say whose connection broke: the run stops, its log is shown
        raise RuntimeError(f"{system.name}: {type(e).__name__} after {time.perf_counter() - sent:.1f} s "
                           f"on {request.path} {str(e)[:200]!r}") from e


async def _stream(client: httpx.AsyncClient, system: System, path: str, body: dict, sent: float,
                  start: float) -> Sample:
    times, pieces, tokens = [], [], None
    async with client.stream("POST", system.process.url + path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{system.name}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            for choice in obj.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                if piece:
                    times.append(time.perf_counter())
                    pieces.append(piece)
    if tokens is None:
        raise RuntimeError(f"{system.name} sent no usage")
    ttft = (times[0] - sent) if times else time.perf_counter() - sent
    itl = []
    if len(times) > 1 and tokens > 1:
        per_chunk = (tokens - 1) / (len(times) - 1)  # tokens a chunk carries, on average
        for a, b in zip(times, times[1:]):
            itl += [(b - a) / per_chunk] * max(1, round(per_chunk))
    return Sample("".join(pieces), tokens, ttft, itl, time.perf_counter() - start)


@dataclass
class Run:
    system: str
    load: str
    repeat: int
    wall: float
    tokens: int
    cpu: float
    samples: list[Sample]

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall


async def closed_loop(system: System, requests: list[Request], concurrency: int) -> tuple[float, list[Sample]]:
    queue = list(requests)
    samples: list[Sample] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()

        async def worker():
            while queue:
                samples.append(await one(client, system, queue.pop(0), start))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, samples


async def open_loop(system: System, requests: list[Request], rate: float, seed: int) -> tuple[float, list[Sample]]:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in requests:
        arrivals.append(t)
        t += rng.expovariate(rate)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()

        async def at(delay: float, request: Request) -> Sample:
            await asyncio.sleep(delay)
            return await one(client, system, request, start)

        samples = await asyncio.gather(*(at(a, r) for a, r in zip(arrivals, requests)))
        return time.perf_counter() - start, list(samples)


def run(system: System, requests: list[Request], load: str, seed: int) -> Run:
    """One run; ``seed`` (the repeat) also draws its open-loop arrivals."""
    cpu = system.process.cpu_seconds()
    kind, value = load.split("=")
    if kind == "c":
        wall, samples = asyncio.run(closed_loop(system, requests, int(value)))
    else:
        wall, samples = asyncio.run(open_loop(system, requests, float(value), seed))
    return Run(system.name, load, seed, wall, sum(s.tokens for s in samples), system.process.cpu_seconds() - cpu,
               samples)


# ---------------------------------------------------------------------------------------------
# Report


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summarize(runs: list[Run], plain: list[Run]) -> dict:
    """``plain``: mlx-specdec plain's runs at the same load, paired with ``runs`` by repeat."""
    tput = [r.throughput for r in runs]
    # Run by run against plain: the two ran back to back, so a slow spell of the machine's weighs
    # on both; the ratio of separate medians would let it fall on one side.
    by_repeat = {r.repeat: r.throughput for r in plain}
    ratios = [r.throughput / by_repeat[r.repeat] for r in runs if r.repeat in by_repeat]
    ttft = [s.ttft for r in runs for s in r.samples]
    itl = [x for r in runs for s in r.samples for x in s.itl]
    return dict(
        throughput=statistics.median(tput), throughput_min=min(tput), throughput_max=max(tput),
        ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99),
        itl_p50=percentile(itl, 50), itl_p99=percentile(itl, 99),
        cpu_per_wall=statistics.median(r.cpu / r.wall for r in runs),
        # What a token costs the server in CPU time: steadier than wall time on a shared machine.
        cpu_ms_per_token=statistics.median(1000 * r.cpu / r.tokens for r in runs),
        tokens=statistics.median(r.tokens for r in runs), repeats=len(runs),
        vs_plain=statistics.median(ratios), vs_plain_min=min(ratios), vs_plain_max=max(ratios),
    )


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,2,4,8,16", help="closed-loop client counts")
    p.add_argument("--rates", default="2,4,8", help="open-loop arrival rates, requests/s")
    p.add_argument("--k", type=int, default=3, help="the fixed draft length compared")
    p.add_argument("--max-tokens", type=int, default=64, help="answer length (a workload may set its own)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passes", type=int, default=4,
                   help="times each run sends the workload prompts (16 requests a pass): longer runs, steadier rates")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--no-mlx-lm", action="store_true", help="leave mlx_lm.server out")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    if args.passes < 1 or args.repeats < 1:
        p.error("--passes and --repeats must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the servers (the finally below)
    levels = [int(x) for x in args.concurrency.split(",")]
    rates = [float(x) for x in args.rates.split(",")] if args.rates else []
    loads = [f"c={c}" for c in levels] + [f"rate={r:g}" for r in rates]

    requests = requests_from_workloads(args.max_tokens, args.passes)
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    python = sys.executable
    port = free_port()
    ours = Process("mlx-specdec", [python, "-m", "mlx_specdec.commands.cli", "serve", "--port", str(port),
                                   "--max-batch", str(args.max_batch), "--max-queue", "256"],
                   port, tmp / "mlx-specdec.log")
    processes = [ours]
    plain = System("mlx-specdec plain", ours, {"draft_tokens": "off"})  # every "vs plain" ratio's base
    systems = [System("mlx-specdec auto", ours, {"draft_tokens": "auto"}), plain,
               System(f"mlx-specdec k={args.k}", ours, {"draft_tokens": args.k})]
    if not args.no_mlx_lm:
        port = free_port()
        theirs = Process("mlx_lm.server", [python, "-m", "mlx_lm.server", "--model", str(mlx_lm_copy(tmp)),
                                           "--port", str(port), "--log-level", "WARNING"], port, tmp / "mlx_lm.log")
        processes.append(theirs)
        systems.append(System("mlx_lm.server", theirs))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = loadavg()
    try:
        ours.wait_ready("/health")
        if not args.no_mlx_lm:
            theirs.wait_ready("/v1/models")
        # Warm up every system (the draft policy measures its costs there) and check the answers agree.
        reference = None
        agree = {}
        for system in systems:
            _, samples = asyncio.run(closed_loop(system, requests, 1))
            _, _ = asyncio.run(closed_loop(system, requests, 4))
            texts = [s.text for s in samples]
            reference = reference or texts
            agree[system.name] = sum(a == b for a, b in zip(texts, reference))
            print(f"warm-up {system.name}: {agree[system.name]}/{len(requests)} answers equal to "
                  f"{systems[0].name}'s", flush=True)
        runs: list[Run] = []
        for repeat in range(args.repeats):
            for i, load in enumerate(loads):
                order = systems[(repeat + i) % len(systems):] + systems[: (repeat + i) % len(systems)]
                for system in order:  # taking turns, the order rotating
                    r = run(system, requests, load, seed=repeat)
                    runs.append(r)
                    print(f"[{repeat + 1}/{args.repeats}] {load:>8} {system.name:<18} {r.throughput:7.1f} tok/s "
                          f"({r.tokens} tokens in {r.wall:.2f} s, server CPU {r.cpu:.1f} s)", flush=True)
    except BaseException:
        for proc in processes:  # the servers' own account of a failed run, before their logs go
            tail = proc.log.read_text(errors="replace").splitlines()[-15:] if proc.log.exists() else []
            print(f"--- {proc.name} (exit code {proc.proc.poll()}), last lines of its log:", *tail,
                  sep="\n", file=sys.stderr)
        raise
    finally:
        for proc in processes:
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = loadavg()

    table = []
    for load in loads:
        for system in systems:
            mine, base = ([r for r in runs if r.load == load and r.system == name] for name in (system.name, plain.name))
            table.append(dict(load=load, system=system.name) | summarize(mine, base))
    env = dict(started=started, machine=f"{platform.machine()} · {os.cpu_count()} CPUs",
               loadavg_before=load_before, loadavg_after=load_after, preload=os.environ.get("LD_PRELOAD", ""),
               nice=os.nice(0), requests=len(requests), max_tokens=args.max_tokens, max_batch=args.max_batch,
               repeats=args.repeats, passes=args.passes, answers_equal=agree)
    command = "python bench/serve_bench.py " + " ".join(sys.argv[1:])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        every = [dict(system=r.system, load=r.load, repeat=r.repeat, wall=r.wall, tokens=r.tokens, cpu=r.cpu)
                 for r in runs]
        args.json.write_text(json.dumps(dict(env=env, command=command, table=table, runs=every), indent=2) + "\n")
    md = markdown(env, command, table, len(requests))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    print(md)


def markdown(env: dict, command: str, table: list[dict], n: int) -> str:
    lines = [
        f"Run {env['started']} on {env['machine']}, load average {env['loadavg_before']} before and "
        f"{env['loadavg_after']} after (other jobs share the machine), nice {env['nice']}, "
        f"LD_PRELOAD={env['preload'] or '(none)'}.",
        f"{n} requests per run (every built-in workload prompt, {env['passes']} times over; answers of up to "
        f"{env['max_tokens']} tokens, greedy, streamed), max batch {env['max_batch']}, {env['repeats']} repeats "
        "taking turns; c=N: N clients in a closed loop; rate=R: Poisson arrivals at R requests/s. "
        "vs plain: the median of run-by-run ratios to mlx-specdec plain at the same load, and their range.",
        "Greedy answers equal to the first system's: " + ", ".join(
            f"{k} {v}/{n}" for k, v in env["answers_equal"].items()) + ".",
        "",
        f"`{command}`",
        "",
        "| load | system | tok/s (median) | range | vs plain | range | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
        "ITL p99 ms | server CPU s / s | server CPU ms / token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['load']} | {row['system']} | {row['throughput']:.1f} | {row['throughput_min']:.1f}-"
            f"{row['throughput_max']:.1f} | {row['vs_plain']:.2f}x | {row['vs_plain_min']:.2f}-{row['vs_plain_max']:.2f} | "
            f"{row['ttft_p50'] * 1000:.0f} | {row['ttft_p99'] * 1000:.0f} | "
            f"{row['itl_p50'] * 1000:.1f} | {row['itl_p99'] * 1000:.1f} | {row['cpu_per_wall']:.2f} | "
            f"{row['cpu_ms_per_token']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
