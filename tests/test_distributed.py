"""Two processes over the loopback (`mlx.launch -n 2 --backend ring`) give the one-process output.

One launch runs every case on tiny checkpoints of the three geometries beyond plain attention
(per-layer inputs with KV sharing and a centroid drafter; k=v with one global K/V head, which
every rank keeps whole; MoE), on the 12B's unified decoder (KV-shared layers with a double-wide
MLP, a centroid drafter) and on a MoE target quantized to 4 bits by mlx-lm: greedy output of the sharded
models equals the single-process output, plain and speculative, k = 1..8 and auto, batches
included; both ranks agree on every token, on every k and, bit for bit, on the logits; a sampled
generation is the same on both ranks with a seed and without one; each rank holds its slices of
the weights plus the replicated parts, and no more memory than that.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from mlx_specdec import load
from tests.dist_cases import STANDIN_KS, cases, run_plan
from tests.helpers import wait_healthy
from tests.test_server import MODEL, Served, _wait_idle, ask, shared_rounds

ROOT = Path(__file__).resolve().parent.parent
RANKS = 2
# Minutes on a busy 2-core machine (every all-reduce waits for both processes to be scheduled),
# seconds on a quiet one.
LAUNCH_TIMEOUT_S = 900
# Memory MLX holds beyond the weights once loading is done (RoPE tables and the like), per rank.
ACTIVE_SLACK_BYTES = 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A 26B-A4B-like pair (k=v, one global K/V head, MoE) whose sharded arrays are large enough
# (over 16 KB) that MLX's small-buffer pool does not blur the memory count.
WIDE = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 32, "global_head_dim": 64,
        "moe_intermediate_size": 256}


@pytest.fixture(scope="module")
def memory_pair(checkpoints):
    target = checkpoints.target("26b", **WIDE)
    return {"name": "wide", "target": str(target), "drafter": str(checkpoints.assistant(target, hidden_size=128))}


# A 26B-A4B-like target quantized to 4 bits by mlx-lm, wide enough that every slice keeps whole
# quantization groups of 32.
QUANTIZABLE = {"hidden_size": 64, "head_dim": 32, "global_head_dim": 64, "intermediate_size": 128,
               "moe_intermediate_size": 64}


@pytest.fixture(scope="module")
def pairs(checkpoints, tmp_path_factory):
    out = {}
    for geometry, centroids in (("e2b", True), ("31b", False), ("26b", False), ("unified-shared", True)):
        target = checkpoints.target(geometry)
        out[geometry] = {"name": geometry, "target": str(target),
                         "drafter": str(checkpoints.assistant(target, centroids=centroids))}
    import mlx_lm

    source = checkpoints.target("26b", published=True, **QUANTIZABLE)
    quantized = tmp_path_factory.mktemp("quantized") / "q4"
    mlx_lm.convert(str(source), str(quantized), quantize=True, q_group_size=32, q_bits=4)
    out["26b-q4"] = {"name": "26b-q4", "target": str(quantized), "drafter": str(checkpoints.assistant(source)),
                     "light": True}
    return out


@pytest.fixture(scope="module")
def ranks(pairs, memory_pair, tmp_path_factory):
    """What each rank of one `mlx.launch -n 2 --backend ring` run returned."""
    work = tmp_path_factory.mktemp("distributed")
    plan = work / "plan.json"
    plan.write_text(json.dumps({"pairs": list(pairs.values()), "memory": memory_pair}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLX_SPECDEC_CACHE="off")
    # mlx.launch is installed beside the interpreter (its console script), in a venv too.
    command = [str(Path(sys.executable).with_name("mlx.launch")),
               "-n", str(RANKS), "--backend", "ring", "--starting-port", str(_free_port()),
               sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(plan), str(work)]
    # Its own session, so that a run past the timeout ends with all its ranks.
    launch = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        output, _ = launch.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        output, _ = launch.communicate()
        pytest.fail(f"mlx.launch ran past {LAUNCH_TIMEOUT_S} s:\n{output[-3000:]}")
    assert launch.returncode == 0, f"mlx.launch failed ({launch.returncode}):\n{output[-3000:]}"
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(RANKS)]


@pytest.mark.parametrize("geometry", ["e2b", "31b", "26b", "unified-shared", "26b-q4"])
def test_two_ranks_give_the_single_process_output(pairs, ranks, geometry):
    pair = pairs[geometry]
    light = pair.get("light", False)
    alone = run_plan(load(pair["target"], drafter=pair["drafter"], policy_cache=False), light=light)
    got = [r["pairs"][geometry] for r in ranks]
    # The ranks agree with each other on everything, bit for bit.
    assert got[0] == got[1]
    # Logits of the sharded sums are the one-process logits up to the order of a sum.
    for name in ("target", "draft"):
        np.testing.assert_allclose(got[0]["logits"][name], alone["logits"][name], atol=1e-4, rtol=1e-4)
    # Greedy and seeded-sampled output is the one-process output; an unseeded one differs by seed.
    for case, mine, theirs in zip(cases(light), got[0]["cases"], alone["cases"], strict=True):
        if case.get("temp") and case.get("seed") is None:
            continue
        assert mine["tokens"] == theirs["tokens"], case
        if case["k"] != "auto":
            assert mine["k_histogram"] == theirs["k_histogram"], case
    if not light:
        assert [c["tokens"] for c in got[0]["standin"]] == [c["tokens"] for c in alone["standin"]]


def test_every_k_ran_and_drafts_were_accepted(ranks):
    """Every k from 1 to 8 drafted, and the stand-in drafter's drafts were accepted (the random
    drafters' almost never are), so multi-token acceptance was agreed on too."""
    for name, result in ranks[0]["pairs"].items():
        if "standin" not in result:
            continue
        ks = {k for case in result["cases"] for hist in case["k_histogram"] for k, _ in hist}
        assert set(range(0, 9)) <= ks, name
        for k, case in zip(STANDIN_KS, result["standin"]):
            assert min(case["accepted"]) >= 2, (name, k)


def test_each_rank_holds_its_slices_and_the_replicated_parts(ranks):
    for r in ranks:
        m = r["memory"]
        assert m["processes"] == RANKS
        assert m["weight_bytes"] == m["replicated_bytes"] + m["split_bytes"] // RANKS
        assert m["weight_bytes"] < m["unsharded_bytes"]
        assert m["unsharded_bytes"] == m["replicated_bytes"] + m["split_bytes"]
        assert m["active_bytes"] <= m["weight_bytes"] + ACTIVE_SLACK_BYTES


# ---------------------------------------------------------------------------------------------
# `mlx-specdec serve` under mlx.launch: rank 0 serves HTTP, rank 1 follows its engine's steps.

# Short answers: every round of two ranks on a busy 2-core machine waits for both to be scheduled.
SERVE_REQUESTS = [
    dict(kind="chat", via="openai", stream=False, content="What is the difflib module for?", max_tokens=12),
    dict(kind="chat", via="http", stream=True, content="Describe statistics.median.", max_tokens=12, draft_tokens=3),
    dict(kind="completion", via="openai", stream=True, prompt="def median(data):", max_tokens=16),
    dict(kind="completion", via="http", stream=False, prompt="class Queue:\n    def put(self, item):", max_tokens=10,
         draft_tokens="off"),
    dict(kind="completion", via="http", stream=False, prompt="def mean(xs):", max_tokens=12, draft_tokens=2),
]
# Seeded sampling with a fixed draft length ("auto" may pick another k, and k decides how many
# random numbers a round draws).
SEEDED = dict(prompt="import os\nimport sys\n\nclass", max_tokens=12, temperature=1.0, seed=7, draft_tokens=2)
SERVE_TIMEOUT_S = 300


class LaunchedServer(Served):
    """`mlx.launch -n 2 --backend ring` running `mlx-specdec serve`; `interrupt` is Ctrl-C in its terminal."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "launch.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT), MLX_SPECDEC_CACHE="off")
        # --verbose: the launcher says how each rank ended ("completed" for exit code 0).
        command = [str(Path(sys.executable).with_name("mlx.launch")), "--verbose",
                   "-n", str(RANKS), "--backend", "ring", "--starting-port", str(_free_port()),
                   sys.executable, "-m", "mlx_specdec.commands.cli", "serve", "--port", str(self.port),
                   "--served-model-name", MODEL]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if not wait_healthy(self.url, self.proc, SERVE_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"the sharded server did not start:\n{self.log.read_text()[-3000:]}")

    def interrupt(self, timeout: float) -> str:
        """Ctrl-C: SIGINT to the launcher and both ranks; the launcher's output once all ended."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the ranks did not stop within {timeout} s of Ctrl-C:\n{self.log.read_text()[-3000:]}")
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.mark.slow
def test_serve_under_mlx_launch_answers_as_one_process_and_stops_on_ctrl_c(tmp_path):
    """Concurrent requests (greedy at fixed k, auto and off, one seeded sampled) get the answers
    a one-process server gives; a client that leaves mid-stream and requests rank 0 refuses
    leave both ranks in step; Ctrl-C ends both ranks."""
    seeded = dict(model=MODEL) | SEEDED
    alone = Served(tmp_path, "--max-batch", "8")
    try:
        expected = [ask(alone, r) for r in SERVE_REQUESTS]
        expected_seeded = alone.post("/v1/completions", seeded).json()["choices"][0]["text"]
    finally:
        alone.stop()
    for (text, n, finish), r in zip(expected, SERVE_REQUESTS):
        assert text and finish in ("stop", "length") and (finish == "stop" or n == r["max_tokens"])

    server = LaunchedServer(tmp_path)
    try:
        before = server.metrics()

        def staggered(i: int):
            time.sleep(0.3 * i)  # later ones join a batch already decoding: news shared mid-run
            if i == len(SERVE_REQUESTS):
                return server.post("/v1/completions", seeded).json()["choices"][0]["text"]
            return ask(server, SERVE_REQUESTS[i])

        with ThreadPoolExecutor(len(SERVE_REQUESTS) + 1) as pool:
            *together, together_seeded = pool.map(staggered, range(len(SERVE_REQUESTS) + 1))
        assert together == expected
        assert together_seeded == expected_seeded
        assert shared_rounds(before, server.metrics()) > 0, "the requests never shared a batch"

        # Refused on rank 0 before anything is shared.
        assert server.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}).status_code == 400
        assert server.post("/v1/completions", {"model": MODEL, "prompt": [5, 999999]}).status_code == 400
        # A client that leaves mid-stream: its row leaves on both ranks (else the next round hangs).
        body = dict(model=MODEL, prompt="def median(data):", max_tokens=3000, stream=True)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=SERVE_TIMEOUT_S) as response:
            assert response.status_code == 200
            assert [line for line, _ in zip(response.iter_lines(), range(4)) if line.startswith("data: ")]
        _wait_idle(server, SERVE_TIMEOUT_S)
        assert ask(server, SERVE_REQUESTS[1]) == expected[1]

        output = server.interrupt(timeout=60)
    finally:
        server.kill()
    # Rank 1 leaves on rank 0's word (exit 0); rank 0 exits as Ctrl-C ends the command, 130.
    assert "Node with rank 1 completed" in output, output[-3000:]
    assert "Node with rank 0 exited with code 130" in output, output[-3000:]
    assert "was killed" not in output, output[-3000:]
