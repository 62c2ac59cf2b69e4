"""`mlx-specdec` as a user runs it: real processes, their stdout, stderr and exit codes.

The processes start together (each pays ~3 s of imports) and the tests read their results.
"""

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlx_specdec import generate, load
from mlx_specdec.prompt import encode_rendered, render
from mlx_specdec.commands.cli import app
from mlx_specdec.policy import K_MAX
from tests.cli_model import make_pair

CLI = [sys.executable, "-m", "mlx_specdec.commands.cli"]


@pytest.fixture(scope="module")
def model(checkpoints, tmp_path_factory):
    return make_pair(checkpoints, tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """Start every process at once; {name: CompletedProcess (returncode, stdout, stderr)}."""
    other = tmp_path_factory.mktemp("other") / "drafter"  # a drafter made for a wider target
    shutil.copytree(model / "drafter", other)
    config = json.loads((other / "config.json").read_text())
    config["backbone_hidden_size"] = 2 * config["backbone_hidden_size"]
    (other / "config.json").write_text(json.dumps(config))
    m = ["--model", str(model)]
    commands = {
        "stream": (CLI + ["generate", "Hello there", *m, "--max-tokens", "7", "--draft-tokens", "2"], None),
        # mlx-lm's spellings of the same flags
        "aliases": (CLI + ["generate", "-p", "Hello there", *m, "-m", "7", "--num-draft-tokens", "2",
                           "--draft-model", str(model / "drafter")], None),
        "json_stdin": (CLI + ["generate", *m, "--max-tokens", "7", "-k", "2", "--json"], "Hello there"),
        "usage": (CLI + ["generate", "hi", *m, "--draft-tokens", "nine"], None),
        "mismatch": (CLI + ["generate", "hi", *m, "--drafter", str(other)], None),
        "verbose": (CLI + ["generate", "hi", "--model", str(model / "missing"), "--verbose"], None),
    }
    procs = {name: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, (cmd, _) in commands.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(commands[name][1], timeout=300)  # seven at once on a loaded machine
        out[name] = subprocess.CompletedProcess(commands[name][0], proc.returncode, stdout, stderr)
    return out


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_generate_streams_the_answer_and_ends_with_one_summary_line(runs, model):
    run = runs["stream"]
    assert run.returncode == 0, run.stderr
    # The text on stdout is what the Python API generates for the chat-templated prompt.
    spec = load(model)
    ids = encode_rendered(spec.tokenizer, render(spec.tokenizer, [{"role": "user", "content": "Hello there"}]))
    expected = generate(spec, ids, max_tokens=7, draft_tokens=2)
    assert run.stdout == expected.text + "\n"
    [summary] = _lines(run.stderr)
    assert summary.startswith(f"{len(expected.tokens)} tokens · ") and "tok/s" in summary
    assert "acceptance" in summary and "tokens/round" in summary and "draft k=2" in summary


def test_generate_reads_stdin_and_prints_json(runs):
    run = runs["json_stdin"]
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["text"] + "\n" == runs["stream"].stdout  # same prompt, same greedy answer
    assert len(out["tokens"]) == out["stats"]["generated_tokens"] <= 7
    assert out["stats"]["k_histogram"] and out["finish_reason"] in ("stop", "length")
    assert out["drafter"].endswith("drafter")  # found inside the model folder by default
    assert run.stderr == ""


def test_mlx_lm_flag_spellings_do_the_same(runs):
    run = runs["aliases"]
    assert run.returncode == 0, run.stderr
    assert run.stdout == runs["stream"].stdout
    [summary] = _lines(run.stderr)
    assert "draft k=2" in summary


def test_usage_errors_exit_2_with_one_line(runs):
    run = runs["usage"]
    assert run.returncode == 2 and run.stdout == ""
    [line] = _lines(run.stderr)
    assert line.startswith("error: ") and "--draft-tokens" in line and "nine" in line


def test_model_errors_exit_1_with_one_line(runs):
    run = runs["mismatch"]
    assert run.returncode == 1 and run.stdout == ""
    [line] = _lines(run.stderr)
    assert line.startswith("error: drafter does not match the target")


def test_verbose_adds_the_traceback(runs):
    run = runs["verbose"]
    assert run.returncode == 1
    assert "Traceback (most recent call last)" in run.stderr
    assert _lines(run.stderr)[-1].startswith("error: ") and "missing" in _lines(run.stderr)[-1]


# In-process checks of the same app (no model to run, so no need for a process each).

def test_help_of_every_command_names_the_common_flags():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for name in ("generate", "chat", "bench", "convert", "distill"):
        assert name in top.output
    for name in ("generate", "chat"):
        text = runner.invoke(app, [name, "--help"]).output
        for flag in ("--model", "--drafter", "--max-tokens", "--temp", "--top-p", "--seed", "--draft-tokens"):
            assert flag in text, (name, flag)
    convert_help = runner.invoke(app, ["convert", "--help"]).output
    for flag in ("-q", "--quantize", "--q-bits", "--q-group-size"):
        assert flag in convert_help
    assert "--batch-sizes" in runner.invoke(app, ["bench", "--help"]).output


def test_without_a_model_the_missing_demo_is_one_clear_line(monkeypatch, tmp_path):
    import mlx_specdec.demo

    monkeypatch.setattr(mlx_specdec.demo, "DEMO_DIR", tmp_path / "absent")
    result = CliRunner().invoke(app, ["generate", "hi"])
    assert result.exit_code == 1
    assert "error: the embedded demo model is missing" in result.output


def test_version_and_python_dash_m():
    from mlx_specdec import __version__

    run = subprocess.run([sys.executable, "-m", "mlx_specdec", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"mlx-specdec {__version__}"
    assert "Usage: mlx-specdec" in CliRunner().invoke(app, ["-h"]).output


@pytest.mark.parametrize("args", [
    ["generate", "hi", "--chat-template-config", "{not json"],
    ["generate", "hi", "--chat-template-config", "[1]"],
    ["convert", "src", "--out", "x", "--q-bits", "3"],
])
def test_bad_flag_values_are_usage_errors_before_loading(args, monkeypatch):
    import mlx_specdec.loading

    monkeypatch.setattr(mlx_specdec.loading, "load", lambda *a, **k: pytest.fail("loaded weights"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert args[-2] in result.output  # names the flag


def test_blas_hint_is_printed_by_a_command_that_computes(model, monkeypatch):
    from mlx_specdec.commands import common

    monkeypatch.setattr(common, "blas_hint", lambda: "MLX is using its slow reference BLAS (test)")
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(model), "-m", "2"])
    assert result.exit_code == 0, result.output
    assert "warning: MLX is using its slow reference BLAS (test)" in result.output


def test_draft_tokens_values():
    from mlx_specdec.commands.cli import parse_draft_tokens

    assert parse_draft_tokens("auto") == "auto"
    assert parse_draft_tokens("off") == 0
    assert parse_draft_tokens(str(K_MAX)) == K_MAX
    for bad in ("-1", str(K_MAX + 1), "x"):
        with pytest.raises(Exception, match="must be auto, off or an integer"):
            parse_draft_tokens(bad)
