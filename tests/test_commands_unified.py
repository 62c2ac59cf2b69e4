"""The commands on a Gemma 4 12B pair (gemma4_unified target, gemma4_unified_assistant with
a centroid head): generate, chat, bench, convert and distill through the CLI, on a tiny
multimodal checkpoint whose config.json files are written the way Google publishes them."""

import json

import pytest
from typer.testing import CliRunner

from mlx_specdec import generate, load
from mlx_specdec.commands.cli import app
from tests import oracle
from tests.cli_model import make_pair
from tests.helpers import first_drafts, prompt

PROMPT = "Hello there"


@pytest.fixture(scope="module")
def model(checkpoints, tmp_path_factory):
    return make_pair(checkpoints, tmp_path_factory.mktemp("unified"), geometry="unified", multimodal=True,
                     published=True, centroids=True)


def _run(*args, input=None):
    """The command's stdout (status lines and hints go to stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_generate_drafts_and_equals_plain_decoding(model):
    def run(k):
        return json.loads(_run("generate", PROMPT, "--model", model, "--max-tokens", 10, "--draft-tokens", k, "--json"))

    drafted, plain = run(3), run(0)
    assert drafted["tokens"] == plain["tokens"] and drafted["stats"]["drafted"] > 0


def test_chat_answers_with_the_drafter(model):
    output = _run("chat", "--model", model, "--max-tokens", 6, "--draft-tokens", 2,
                  input=f"{PROMPT}\nAnd more?\n/quit\n")
    assert f"drafter {model / 'drafter'}" in output
    assert output.count("tokens/round · draft k=2") == 2


def test_bench_measures_drafting(model, tmp_path):
    _run("bench", "--model", model, "--workloads", "qa", "--batch-sizes", "1,2", "--modes", "2", "--max-tokens", 4,
         "--repeats", 1, "--warmup", 0, "--json", tmp_path / "bench.json")
    cells = json.loads((tmp_path / "bench.json").read_text())["cells"]
    assert {(c["batch_size"], c["mode"]) for c in cells} == {(b, m) for b in (1, 2) for m in ("plain", "k=2")}
    assert all(c["acceptance"] is not None for c in cells if c["mode"] == "k=2")


def test_convert_keeps_the_unified_family_and_decodes_like_the_source(model, tmp_path):
    out = tmp_path / "mlx"
    output = _run("convert", model, "--out", out)
    assert "3/3 greedy drafts the same" in output
    config, drafter = (json.loads((p / "config.json").read_text()) for p in (out, out / "drafter"))
    assert (config["model_type"], config["architectures"]) == ("gemma4_unified_text", ["Gemma4UnifiedForCausalLM"])
    assert drafter["model_type"] == "gemma4_unified_assistant"
    converted, original = load(out), load(model)
    ids = prompt(30, 3)
    for k in (0, 3):
        assert generate(converted, ids, max_tokens=12, draft_tokens=k).tokens == \
            generate(original, ids, max_tokens=12, draft_tokens=k).tokens
    quantized = tmp_path / "q"
    _run("convert", model, "--out", quantized, "--q-bits", 8, "--q-group-size", 32, "--drafter-q-bits", 8,
         "--drafter-q-group-size", 32)
    spec = load(quantized)
    assert generate(spec, ids, max_tokens=12, draft_tokens=3).tokens == \
        generate(spec, ids, max_tokens=12, draft_tokens=0).tokens


def test_distill_writes_a_unified_assistant_that_transformers_loads(model, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 40))
    out = tmp_path / "drafter"
    _run("distill", "--model", model, "--data", data, "--out", out, "--steps", 4, "--batch-size", 2, "--seq-len", 24,
         "--draft-steps", 2, "--hidden-size", 32, "--eval-every", 2, "--checkpoint-every", 2, "--dtype", "float32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_unified_assistant"
    assert config["text_config"]["model_type"] == "gemma4_unified_text"
    # transformers reads it (strictly) as the 12B's assistant, and drafts as we do.
    ids = prompt(20, 5)
    reference = oracle.reference_draft(model, out, ids, 3)
    assert [int(d.greedy_tokens().item()) for d in first_drafts(load(model, drafter=out), ids, 3)] == \
        reference["tokens"]


def test_the_server_answers_like_generate(model, tmp_path):
    """`mlx-specdec serve --model <12B pair>`: a completion over HTTP is generate()'s greedy answer."""
    from tests.test_server import MODEL, Served

    expected = generate(load(model, policy_cache=False), PROMPT, max_tokens=8, draft_tokens=2)
    server = Served(tmp_path, "--model", str(model))
    try:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "draft_tokens": 2}
        response = server.post("/v1/completions", body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["choices"][0]["text"] == expected.text
        assert answer["usage"]["completion_tokens"] == len(expected.tokens)
        assert answer["speculative"]["drafted"] > 0
    finally:
        server.stop()
