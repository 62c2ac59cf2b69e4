"""`mlx-specdec bench`: the real command on a tiny model, and the numbers it derives."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_specdec.commands import bench, common
from mlx_specdec.commands.bench import Cell, load_workloads, parse_modes
from mlx_specdec.errors import InputError
from tests.cli_model import make_pair


@pytest.fixture(scope="module")
def model(checkpoints, tmp_path_factory):
    return make_pair(checkpoints, tmp_path_factory.mktemp("bench"))


@pytest.mark.slow
def test_bench_command_writes_table_json_markdown_and_chart(model, tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_specdec.commands.cli", "bench", "--model", str(model), "--workloads", "qa,short",
         "--batch-sizes", "1,2", "--modes", "2,auto", "--max-tokens", "6", "--repeats", "2", "--warmup", "1",
         "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"), "--chart", str(out / "bench.png")],
        capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    # Environment header, then the table.
    assert run.stdout.startswith("MLX ") and f"target  {model}" in run.stdout and "drafter " in run.stdout
    assert "speedup" in run.stdout and "ceiling E(k)" in run.stdout

    result = json.loads((out / "bench.json").read_text())
    cells = {(c["workload"], c["batch_size"], c["mode"]): c for c in result["cells"]}
    # plain is always measured: speedups are against it, in the same run.
    assert set(cells) == {(w, b, m) for w in ("qa", "short") for b in (1, 2) for m in ("plain", "k=2", "auto")}
    for (w, b, m), c in cells.items():
        assert len(c["runs_tokens_per_second"]) == 2 and c["tokens_per_second"] > 0
        # Every answer runs to max_tokens (EOS ignored; "short" sets 16): 4 prompts, first tokens not timed.
        assert c["generated_tokens"] == 4 * ((16 if w == "short" else 6) - 1)
        # The median of run-by-run ratios to plain (the modes take turns run by run).
        ratios = sorted(t / p for t, p in zip(c["runs_tokens_per_second"],
                                              cells[(w, b, "plain")]["runs_tokens_per_second"]))
        assert c["speedup"] == pytest.approx((ratios[0] + ratios[1]) / 2)
        if m == "plain":
            assert c["k_histogram"] == {"0": c["rounds"]} and c["ceiling"] is None
        if m == "k=2":  # every round drafts 2 but the last of each answer (capped by max_tokens)
            assert set(c["k_histogram"]) <= {"0", "1", "2"} and c["acceptance"] is not None
    assert result["settings"]["modes"] == ["plain", "k=2", "auto"]
    assert result["environment"]["model"]["parameters"] > 0 and result["command"].removeprefix(
        f"LD_PRELOAD={os.environ['LD_PRELOAD']} " if os.environ.get("LD_PRELOAD") else "").startswith("mlx-specdec bench")
    markdown = (out / "bench.md").read_text()
    assert "| workload | B | mode | tok/s | speedup |" in markdown and markdown.count("\n| qa |") == 6
    # auto against plain (the floor) and the best fixed k (here the only one, k=2): the table's speedups,
    # and auto over k=2 run by run; held out, k=2 is picked on either run and auto compared on the other.
    for w in ("qa", "short"):
        for b in (1, 2):
            auto, k2 = cells[(w, b, "auto")]["speedup"], cells[(w, b, "k=2")]["speedup"]
            versus = sum(x / y for x, y in zip(cells[(w, b, "auto")]["runs_tokens_per_second"],
                                               cells[(w, b, "k=2")]["runs_tokens_per_second"])) / 2
            assert (f"| {w}, B={b} | {auto:.2f}x | k=2 | {k2:.2f}x | {versus:.2f}x | {versus:.2f}x |") in markdown
    assert "auto against the floor and the ceiling" in run.stdout
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ceiling_is_the_expected_tokens_per_round_at_the_measured_acceptance():
    cell = Cell("w", 1, "k=3", [10.0], 8, rounds=4, k_histogram={3: 4})
    cell.reached_by_position[:3] = [4, 2, 1]
    cell.accepted_by_position[:3] = [2, 1, 0]
    a = 3 / 7
    assert cell.acceptance == pytest.approx(a)
    assert cell.ceiling == pytest.approx((1 - a**4) / (1 - a))
    # auto: averaged over the k of its rounds (k = 0 rounds yield 1 token).
    cell.k_histogram = {0: 2, 3: 2}
    assert cell.ceiling == pytest.approx((1 + (1 - a**4) / (1 - a)) / 2)
    assert cell.auto_choice in ("k=0: 50%, k=3: 50%", "k=3: 50%, k=0: 50%")


def test_modes_and_workloads_parse():
    assert parse_modes("plain,1-3,auto") == [0, 1, 2, 3, "auto"]
    assert parse_modes("auto,k=4") == [0, "auto", 4]  # plain is added: speedups need it
    with pytest.raises(InputError, match="draft length must be auto, off or an integer 1..8"):
        parse_modes("9")
    names = [w.name for w in load_workloads()]
    assert names == ["code", "prose", "qa", "short"]
    with pytest.raises(InputError, match="unknown workload"):
        load_workloads(names=["poetry"])


def test_wide_workloads_follow_the_built_in_recipes_with_sixteen_prompts_each():
    # bench/workloads_wide.json (bench/wide_workloads.py): what --workload-file reads.
    wide = load_workloads(Path(__file__).resolve().parent.parent / "bench" / "workloads_wide.json")
    built_in = load_workloads()
    assert [(w.name, w.chat, w.max_tokens) for w in wide] == [(w.name, w.chat, w.max_tokens) for w in built_in]
    for w in wide:
        assert len(set(w.prompts)) == 16 and all(p.strip() for p in w.prompts)


def test_reference_blas_is_detected_and_openblas_named(monkeypatch):
    monkeypatch.setattr(common, "openblas_loaded", lambda: False)
    monkeypatch.setattr(common, "matmul_seconds", lambda: 0.09)
    warning = common.reference_blas_warning()
    assert "slow reference BLAS" in warning and "90 ms" in warning and f"LD_PRELOAD={common.OPENBLAS}" in warning
    monkeypatch.setattr(common, "matmul_seconds", lambda: 0.003)
    assert common.reference_blas_warning() is None
    monkeypatch.setattr(common, "openblas_loaded", lambda: True)
    monkeypatch.setattr(common, "matmul_seconds", lambda: 1 / 0)  # not even timed
    assert common.reference_blas_warning() is None


def test_header_says_whether_auto_starts_from_a_kept_policy(model, tmp_path):
    from mlx_specdec import generate, load

    spec = load(model, policy_cache=tmp_path)
    fresh = bench.environment_lines(bench.environment(spec, None))
    assert f"policy  {spec.policy_file}: auto starts from nothing measured yet" in "\n".join(fresh)
    generate(spec, [5, 6, 7], max_tokens=12)  # enough steady plain rounds to time plain decoding
    kept = bench.environment_lines(bench.environment(load(model, policy_cache=tmp_path), None))
    assert f"policy  {spec.policy_file}: auto starts from what earlier runs measured" in "\n".join(kept)
    off = bench.environment_lines(bench.environment(load(model, policy_cache=False), None))
    assert not any(line.startswith("policy") for line in off)


def test_cells_whose_runs_spread_widely_are_named():
    cells = [Cell("code", 1, "k=3", [10.0, 17.0, 12.0], 8), Cell("qa", 2, "plain", [10.0, 11.0], 8)]
    warning = bench.spread_warning(cells)
    assert "1 cell(s)" in warning and "code B=1 k=3 1.7x" in warning and "qa" not in warning
    assert bench.spread_warning(cells[1:]) is None
    assert "median of run-by-run ratios" in bench.FOOTNOTE and "need not equal" in bench.FOOTNOTE


# bench/peers.py is a script, not part of the package: run it as one, with the smallest settings.
PEERS = Path(__file__).resolve().parent.parent / "bench" / "peers.py"
PEERS_TINY = ["--targets", "demo", "--prompts", "8", "--max-tokens", "4", "--repeats", "1", "--memory-prompt", "0",
              "--demo-modes", "0,2,auto", "--demo-batch-sizes", "1,2"]


def run_peers(tmp_path, *flags):
    run = subprocess.run([sys.executable, str(PEERS), *PEERS_TINY, *flags, "--out", str(tmp_path / "peers")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads((tmp_path / "peers.json").read_text()), (tmp_path / "peers.md").read_text()


def test_peers_without_mlx_vlm_says_so_and_compares_batches_with_ours_plain(tmp_path):
    result, markdown = run_peers(tmp_path, "--no-mlx-vlm")
    assert "mlx-vlm left out (--no-mlx-vlm): no mlx-vlm rows" in result["header"]
    systems = {(r["batch"], r["system"]): r["base"] for r in result["rows"]}
    # mlx-lm's generate_step decodes one sequence: at B=2 the base is ours plain.
    assert systems == {(1, "mlx-lm plain"): "mlx-lm plain", (1, "ours plain"): "mlx-lm plain",
                       (1, "ours k=2"): "mlx-lm plain", (1, "ours auto"): "mlx-lm plain",
                       (2, "ours plain"): "ours plain", (2, "ours k=2"): "ours plain", (2, "ours auto"): "ours plain"}
    assert all(r["identical"] for r in result["rows"]) and result["versus_mlx_vlm_mtp"] == []
    assert "Against mlx-vlm's MTP path" not in markdown
    # The floor, auto against our plain decoding, is reported at every batch size, also at B=1
    # where the rows' base is mlx-lm; at B=2 it is the auto row's own ratio to its base.
    floor = {f["batch"]: f for f in result["auto_vs_plain"]}
    rows = {(r["batch"], r["system"]): r for r in result["rows"]}
    assert set(floor) == {1, 2} and all(f["decode_ratio"] > 0 and f["decode_cpu_ratio"] > 0 for f in floor.values())
    assert floor[2]["decode_ratio"] == rows[2, "ours auto"]["decode_vs_base"]
    assert "Ours auto against ours plain (the floor" in markdown and "| demo | 8 | 2 | " in markdown


def test_peers_runs_mlx_vlm_mtp_on_the_multimodal_demo_exactly(tmp_path):
    result, markdown = run_peers(tmp_path, "--mlx-vlm-blocks", "2,3")
    assert result["header"][-1].startswith("mlx-vlm ") and "MTP default block size" in result["header"][-1]
    systems = {(r["batch"], r["system"]) for r in result["rows"]}
    vlm_mtp = {"mlx-vlm MTP default", "mlx-vlm MTP block=2", "mlx-vlm MTP block=3"}
    assert systems == ({(1, s) for s in {"mlx-lm plain", "mlx-vlm plain", "ours plain", "ours k=2", "ours auto"} | vlm_mtp}
                       | {(2, s) for s in {"ours plain", "ours k=2", "ours auto"} | vlm_mtp})
    # Every system, mlx-vlm's MTP path at B=1 and B=2 included, matches ours plain token for token.
    assert all(r["identical"] for r in result["rows"])
    versus = {(v["batch"], v["comparison"]): v for v in result["versus_mlx_vlm_mtp"]}
    assert set(versus) == {(b, c) for b in (1, 2) for c in ("ours best fixed k vs mlx-vlm MTP best block",
                                                             "ours auto vs mlx-vlm MTP default")}
    for (_, comparison), v in versus.items():
        assert v["identical"] and v["decode_ratio"] > 0
        if comparison.startswith("ours best"):  # one fixed k measured; the best of the two blocks
            assert v["ours"] == "ours k=2" and v["mlx_vlm"] in ("mlx-vlm MTP block=2", "mlx-vlm MTP block=3")
    assert "| demo | 8 | 2 | ours auto vs mlx-vlm MTP default | ours auto | mlx-vlm MTP default |" in markdown


BATCH_TAIL = Path(__file__).resolve().parent.parent / "bench" / "batch_tail.py"


def _run_script(path: Path, *args: str) -> str:
    """A bench/ script run as a user runs it: its stdout, once it exited cleanly."""
    run = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_batch_tail_reports_rounds_after_the_first_row_finished():
    out = _run_script(BATCH_TAIL, "--prompt", "8", "--batch", "3", "--max-tokens", "12", "--repeats", "2",
                      "--warmup", "0", "--modes", "2,auto")
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in out.splitlines()
            if line.startswith(("| plain", "| k=", "| auto"))}
    assert set(rows) == {"plain", "k=2", "auto"}
    # Plain decoding moves every row a token a round: the first token comes from the prefill.
    assert rows["plain"][3] == "11, 11, 11" and rows["plain"][5].startswith("0.00 ") and rows["plain"][2] == "1.00x"
    for mode, cells in rows.items():
        finished = [int(n) for n in cells[3].split(", ")]
        # No tail without rows finishing apart, and the rows that finish first leave one.
        assert (len(set(finished)) == 1) == cells[5].startswith("0.00 "), (mode, cells)


BATCH_GROUPS = Path(__file__).resolve().parent.parent / "bench" / "batch_groups.py"


def test_batch_groups_times_each_static_batch_of_a_workload():
    out = _run_script(BATCH_GROUPS, "--workload", "short", "--batch", "3", "--max-tokens", "10", "--repeats", "2",
                      "--warmup", "0", "--modes", "2,auto")
    header = next(line for line in out.splitlines() if line.startswith("| batch |"))
    assert header == "| batch | k=2 vs plain | auto vs plain | k=2 lost / spread | auto lost / spread | auto chose |"
    rows = [line.strip("|").split(" | ") for line in out.splitlines() if re.match(r"\| (\d+|all) \|", line)]
    # The built-in short workload's four prompts, three at a time: a batch of three and one of one.
    assert [r[0].strip() for r in rows] == ["0", "1", "all"]
    for cells in rows:
        for ratio in cells[1:3]:
            median, low, high = map(float, re.fullmatch(r"([\d.]+)x \(([\d.]+)-([\d.]+)\)", ratio).groups())
            assert 0 < low <= median <= high
    # A batch of one row has no rows to finish apart: nothing lost per unit of spread.
    assert rows[1][3] in ("0.00", "-") and rows[1][4] in ("0.00", "-")
    for cells in rows[:2]:
        assert all(0 <= int(k) <= 8 for k in re.findall(r"k=(\d+):", cells[5])) and cells[5] != "-"


def _bench_script(path: Path, monkeypatch):
    """A script of bench/ imported as a module under its own name."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, path.stem, module)  # its dataclasses resolve annotations through it
    module_spec.loader.exec_module(module)
    return module


def test_multimodal_demo_holds_the_same_weights_for_ours(tmp_path, monkeypatch):
    from mlx.utils import tree_flatten

    from mlx_specdec import load
    from mlx_specdec.demo import demo_path

    peers = _bench_script(PEERS, monkeypatch)
    folder = peers.write_multimodal(Path(demo_path()), tmp_path / "multimodal")
    text, multimodal = load(demo_path(), dtype="float32"), load(folder, dtype="float32")
    for a, b in ((text.target, multimodal.target), (text.drafter, multimodal.drafter)):
        left, right = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
        assert left.keys() == right.keys() and all((left[k] == right[k]).all().item() for k in left)


def test_held_out_ceiling_picks_the_best_fixed_k_on_other_runs():
    from mlx_specdec.commands.bench import _held_out

    plain = Cell("w", 1, "plain", [10.0, 10.0, 10.0, 10.0], 8)
    # k=1 is the best on even runs only (a lucky pair), k=2 on odd runs; auto matches neither.
    k1 = Cell("w", 1, "k=1", [20.0, 10.0, 20.0, 10.0], 8)
    k2 = Cell("w", 1, "k=2", [10.0, 16.0, 10.0, 16.0], 8)
    auto = Cell("w", 1, "auto", [12.0, 12.0, 12.0, 12.0], 8)
    # Picked on the even runs (k=1), judged on the odd (12/10); then k=2 judged on the even (12/10).
    assert _held_out(auto, [k1, k2], plain) == pytest.approx(1.2)
    assert _held_out(Cell("w", 1, "auto", [12.0], 8), [k1], plain) is None


# bench/policy_sim.py: the real DraftPolicy deciding rounds in a synthetic world (no model).
POLICY_SIM = Path(__file__).resolve().parent.parent / "bench" / "policy_sim.py"


def test_policy_sim_holds_the_floor_and_the_ceiling_in_a_world_without_noise(tmp_path):
    from mlx_specdec.policy import PROBE_OVERHEAD_BUDGET

    out = tmp_path / "sim.json"
    run = subprocess.run([sys.executable, str(POLICY_SIM), "--workloads", "never,prose", "--seeds", "3", "--runs", "4",
                          "--sigma", "0", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    cells = {(c["workload"], c["batch"]): c for c in json.loads(out.read_text())["cells"]}
    assert set(cells) == {(w, b) for w in ("never", "prose") for b in (1, 4)}
    for b in (1, 4):
        # A drafter that never agrees costs auto no more than its probes are budgeted.
        assert cells["never", b]["auto_vs_plain"] >= 1 - PROBE_OVERHEAD_BUDGET
        assert cells["never", b]["best"] == "k=1" and cells["never", b]["tokens_per_second"]["k=1"] < \
            cells["never", b]["tokens_per_second"]["plain"]
        # Where drafting pays, auto comes within 5% of the best fixed k, known here, not guessed from noisy runs.
        assert cells["prose", b]["auto_vs_plain"] > 1.0 and cells["prose", b]["auto_vs_best"] >= 0.95


def test_policy_sim_batch_waits_for_its_slowest_row(monkeypatch):
    sim = _bench_script(POLICY_SIM, monkeypatch)

    def rounds(factors):
        batch_sizes = []

        class Counting(sim.Machine):
            def factor(self):
                return 1.0

        class Rounds:  # a fixed k's run asks a policy only whether to time drafts apart, and tells it each round
            def draft_timing_due(self, b):
                return False

            def record(self, b, *args, **kwargs):
                batch_sizes.append(b)

        machine = Counting(0, 0.0, 1.0, 0.0)
        sim.run([0.9] * 8, 2, 40, 3, Rounds(), machine, random.Random(0), set(), row_factors=factors)
        return batch_sizes

    alike = rounds(None)
    assert len(alike) < 20  # both rows accept 90% of drafts: about 3.4 tokens a round each
    # A row whose drafts are all rejected takes one token a round, 40 rounds, the last ones alone.
    held = rounds([1.0, 0.0])
    assert len(held) == 40 and held.count(2) < 20 and held[-1] == 1


# bench/serve_bench.py: the requests of a run and the paired ratios it reports (no server).
SERVE_BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve_bench.py"


def test_serve_bench_passes_never_repeat_a_request(monkeypatch):
    sb = _bench_script(SERVE_BENCH, monkeypatch)
    one, three = sb.requests_from_workloads(64), sb.requests_from_workloads(64, 3)
    assert len(one) == 16 and len(three) == 3 * len(one)
    assert [r.body for r in three[:16]] == [r.body for r in one]  # the first pass is the prompts as they are
    bodies = [json.dumps(r.body, sort_keys=True) for r in three]
    assert len(set(bodies)) == len(bodies)  # a repeat would skip its prefill in the prefix store
    assert three[16].path == one[0].path and three[16].body["max_tokens"] == one[0].body["max_tokens"]


def test_serve_bench_compares_each_run_with_plains_run_of_the_same_repeat(monkeypatch):
    sb = _bench_script(SERVE_BENCH, monkeypatch)

    def runs(system, rates):  # tok/s by repeat: 100 tokens over 100/rate seconds
        return [sb.Run(system, "c=1", i, 100 / rate, 100, 1.0, []) for i, rate in enumerate(rates)]

    plain = runs("plain", [100, 50, 100])
    # Auto's median rate (90) is below plain's (100), yet run by run it is ahead in two repeats of
    # three: the second repeat was slow for both.
    row = sb.summarize(runs("auto", [110, 60, 90]), plain)
    assert row["throughput"] == pytest.approx(90) and row["vs_plain"] == pytest.approx(1.1)
    assert (row["vs_plain_min"], row["vs_plain_max"]) == (pytest.approx(0.9), pytest.approx(1.2))
