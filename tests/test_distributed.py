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
from pathlib import Path

import numpy as np
import pytest

from mlx_specdec import load
from tests.dist_cases import STANDIN_KS, cases, run_plan

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
