"""Distillation: the vectorised training forward is the inference drafter, training lowers the
loss, checkpoints resume to the same weights, the output folder loads and drafts exactly, and
bad input fails with one clear line."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_specdec import InputError, generate, load
from mlx_specdec.commands import distill as D
from mlx_specdec.commands.distill_cli import distill_command

WORDS = "the quick brown fox jumps over a lazy dog while seven zebras quietly vex jim".split()


def _text(seed: int, n: int = 400) -> str:
    rng = np.random.default_rng(seed)
    # Repeated phrases make the text learnable, random words keep it from being trivial.
    phrases = [" ".join(rng.choice(WORDS, 4)) for _ in range(6)]
    return " ".join(phrases[i] if rng.random() < 0.7 else rng.choice(WORDS) for i in rng.integers(0, 6, n))


@pytest.fixture(scope="module")
def pair(checkpoints):
    target = checkpoints.target("dense")
    return target, checkpoints.assistant(target)


@pytest.fixture(scope="module")
def spec(pair):
    return load(pair[0], drafter=pair[1], dtype="float32")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(_text(i))
    return folder


SMALL = dict(steps=6, lr=3e-3, batch_size=2, seq_len=24, draft_steps=3, warmup=1, eval_every=3,
             checkpoint_every=3, eval_sequences=2, eval_prompts=2, eval_prompt_len=10, eval_new_tokens=8)


def _data(spec, data_dir, settings):
    docs = D.read_documents([data_dir], spec.tokenizer)
    return D.Data.from_documents(docs, min(spec.eos_token_ids), settings)


def _fresh(spec, pair):
    drafter, config = D.start_drafter(spec, pair[1], hidden_size=0, layers=0, seed=0)
    return drafter, config


def _params(drafter):
    return {k: np.array(v) for k, v in tree_flatten(drafter.parameters())}


@pytest.mark.parametrize("centroids", [False, True])
def test_vectorised_unroll_equals_the_inference_drafter(checkpoints, pair, centroids):
    """Every position's unrolled steps give the logits and hidden Drafter.__call__ gives when
    a round starts there (queries past the sliding window included)."""
    spec = load(pair[0], drafter=checkpoints.assistant(pair[0], centroids=centroids), dtype="float32")
    drafter = spec.drafter
    L, S = 21, 3  # window 8: positions well past it
    tokens = mx.array([[int(t) for t in np.random.default_rng(1).integers(3, 96, L)]])
    t = D.teacher(spec.target, tokens, drafter.config.sliding_window)
    steps = list(D.unroll(drafter, t, S, "data"))
    for p in (1, 2, 9, L - S):
        tok, hidden = tokens[:, p], t.hidden[:, p - 1 : p]
        for s, logits, _, _, _ in steps:
            draft = drafter(tok, hidden, mx.array([p]), t.kv)
            got = logits[:, p - 1]
            if draft.candidates is not None:  # the centroid head scores only its candidates
                got = mx.take_along_axis(got, draft.candidates, axis=-1)
            np.testing.assert_allclose(np.array(got), np.array(draft.logits), rtol=1e-4, atol=1e-4)
            if s < S:
                tok, hidden = tokens[:, p + s], draft.hidden


def test_loss_decreases_and_output_loads_and_drafts_exactly(spec, pair, data_dir, tmp_path):
    settings = D.Settings(**{**SMALL, "steps": 25, "eval_every": 25, "checkpoint_every": 25})
    data = _data(spec, data_dir, settings)
    drafter, config = _fresh(spec, pair)
    fixed = D.teacher(spec.target, data.batch(0, settings), drafter.config.sliding_window)
    before = D.loss_terms(drafter, fixed, settings)[0].item()
    events = list(D.distill(spec, drafter, config, data, settings, tmp_path, save_dtype="float32"))
    after = D.loss_terms(drafter, fixed, settings)[0].item()
    assert after < 0.8 * before
    report = events[-1]
    assert isinstance(report, D.Report) and set(report.after) == {"teacher-forced", "loop"}
    assert len(report.after["loop"].by_position) == settings.draft_steps
    assert events[-2].eval is not None and events[-2].step == 25
    assert json.loads((tmp_path / "distill_report.json").read_text())["steps"] == 25

    loaded = load(pair[0], drafter=tmp_path, dtype="float32")
    for k, v in _params(drafter).items():
        np.testing.assert_array_equal(_params(loaded.drafter)[k], v)
    ids = [int(t) for t in data.held_out[:12]]
    plain = generate(loaded, ids, max_tokens=16, draft_tokens=0).tokens
    for k in (1, 3):
        assert generate(loaded, ids, max_tokens=16, draft_tokens=k).tokens == plain


def test_resume_reproduces_an_uninterrupted_run(spec, pair, data_dir, tmp_path):
    settings = D.Settings(**SMALL)
    data = _data(spec, data_dir, settings)
    straight, config = _fresh(spec, pair)
    list(D.distill(spec, straight, config, data, settings, tmp_path / "a", evaluate_before=False))

    interrupted, _ = _fresh(spec, pair)
    for event in D.distill(spec, interrupted, config, data, settings, tmp_path / "b", evaluate_before=False):
        if event.step == 3:  # checkpointed at 3, then "killed"
            break
    resumed, config_b, state = D.resume_drafter(spec, tmp_path / "b")
    assert state["step"] == 3 and config_b == config
    events = list(D.distill(spec, resumed, config_b, data, settings, tmp_path / "b", resume=True))
    assert [e.step for e in events[:-1]] == [4, 5, 6]
    want, got = _params(straight), _params(resumed)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_an_interrupted_run_keeps_its_last_step_and_its_before(spec, pair, data_dir, tmp_path):
    settings = D.Settings(**{**SMALL, "checkpoint_every": 100})  # no checkpoint but the last, normally
    data = _data(spec, data_dir, settings)
    drafter, config = _fresh(spec, pair)
    events = D.distill(spec, drafter, config, data, settings, tmp_path)
    for event in events:
        if event.step == 4:
            events.close()  # what Ctrl-C in the command does once its progress bar is closed
            break
    state = D.read_checkpoint_state(tmp_path)
    assert state["step"] == 4 and set(state["before"]) == {"teacher-forced", "loop"}
    resumed, config, _ = D.resume_drafter(spec, tmp_path)
    events = list(D.distill(spec, resumed, config, data, settings, tmp_path, resume=True))
    report = events[-1]
    assert [e.step for e in events[:-1]] == [5, 6]
    assert report.steps == 6 and report.resumed_from == 4
    assert {m: a.as_dict() for m, a in report.before.items()} == state["before"]


def test_from_scratch_centroid_training_and_transformers_names(checkpoints, pair, spec, data_dir, tmp_path):
    """A drafter built from sizes trains and saves under transformers' parameter names; a
    centroid drafter's cluster scores are trained too."""
    from tests import oracle

    settings = D.Settings(**{**SMALL, "steps": 3})
    data = _data(spec, data_dir, settings)
    base = load(pair[0], drafter=False, dtype="float32")
    drafter, config = D.start_drafter(base, None, hidden_size=48, layers=2, seed=0)
    # As wide as the target: its head starts as the target's.
    np.testing.assert_array_equal(np.array(drafter.lm_head.weight), np.array(base.target.embed_tokens.weight))
    list(D.distill(base, drafter, config, data, settings, tmp_path / "scratch", evaluate_before=False))
    hf = oracle.load_model(tmp_path / "scratch")
    ours = D.hf_weights(drafter)
    assert set(hf.state_dict()) - {"lm_head.weight"} == set(ours)

    centroid_spec = load(pair[0], drafter=checkpoints.assistant(pair[0], centroids=True), dtype="float32")
    drafter, config = D.start_drafter(centroid_spec, checkpoints.assistant(pair[0], centroids=True),
                                      hidden_size=0, layers=0, seed=0)
    before = np.array(drafter.masked_embedding.centroids.weight)
    ordering = np.array(drafter.masked_embedding.token_ordering)
    list(D.distill(centroid_spec, drafter, config, data, settings, tmp_path / "centroids", evaluate_before=False))
    assert not np.allclose(np.array(drafter.masked_embedding.centroids.weight), before)
    np.testing.assert_array_equal(np.array(drafter.masked_embedding.token_ordering), ordering)
    reloaded = load(pair[0], drafter=tmp_path / "centroids", dtype="float32")
    np.testing.assert_array_equal(np.array(reloaded.drafter.masked_embedding.token_ordering), ordering)


def test_reading_folders_and_jsonl(spec, tmp_path):
    tok = spec.tokenizer
    folder = tmp_path / ".cache" / "corpus"  # a hidden parent is fine; hidden files inside are not read
    (folder / ".git").mkdir(parents=True)
    (folder / "a.txt").write_text("the quick brown fox")
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (folder / "blob.bin").write_bytes(bytes([0xFF, 0xFE, 0x00]))
    rows = [{"text": "a lazy dog"}, {"prompt": "the fox ", "completion": "jumps"}, "seven zebras",
            {"messages": [{"role": "user", "content": "vex jim"}]}]
    (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = D.read_documents([folder], tok)
    assert docs[0] == tok.encode("the quick brown fox")
    assert docs[1:4] == [tok.encode("a lazy dog"), tok.encode("the fox jumps"), tok.encode("seven zebras")]
    assert docs[4] == list(tok.apply_chat_template(rows[3]["messages"], tokenize=True))
    assert len(docs) == 5


def test_bad_input_is_one_clear_error(spec, pair, data_dir, tmp_path, capsys):
    tok = spec.tokenizer
    with pytest.raises(D.DataError, match="does not exist"):
        D.read_documents([tmp_path / "missing"], tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2 is not valid JSON"):
        D.read_documents([bad], tok)
    (tmp_path / "odd.jsonl").write_text('{"label": 3}\n')
    with pytest.raises(D.DataError, match="expected a string or an object with 'text'"):
        D.read_documents([tmp_path / "odd.jsonl"], tok)
    short = tmp_path / "short.txt"
    short.write_text("the fox")
    with pytest.raises(D.DataError, match="need at least seq len"):
        D.Data.from_documents(D.read_documents([short], tok), 1, D.Settings(seq_len=64))
    with pytest.raises(InputError, match="draft steps"):
        D.Settings(draft_steps=0)
    with pytest.raises(InputError, match="nothing to resume"):
        D.resume_drafter(spec, tmp_path)

    # Bad flags are usage errors (exit 2, one line), found before the target loads.
    code, line = _usage(capsys, ["--model", str(pair[0]), "--data", str(tmp_path / "missing"), "--out",
                                 str(tmp_path / "o")])
    assert code == 2 and "--data" in line and f"{tmp_path / 'missing'} does not exist" in line
    code, line = _usage(capsys, ["--model", str(pair[0]), "--data", str(data_dir), "--out", str(tmp_path / "o"),
                                 "--draft-steps", "99"])
    assert code == 2 and "draft steps must be in 1..8" in line


def _usage(capsys, args: list[str]) -> tuple[int, str]:
    """`mlx-specdec distill ARGS` as the command line runs it, expected to fail: (exit code, its one line)."""
    from mlx_specdec.commands.cli import app

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        app(["distill", *args], prog_name="mlx-specdec")
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return exit.value.code, line


def test_cli_distills_and_resumes(pair, data_dir, tmp_path, capsys):
    import typer

    app = typer.Typer()
    app.command()(distill_command)
    args = ["--model", str(pair[0]), "--drafter", str(pair[1]), "--data", str(data_dir), "--out", str(tmp_path),
            "--steps", "4", "--batch-size", "2", "--seq-len", "24", "--draft-steps", "2", "--eval-every", "2",
            "--checkpoint-every", "2", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "a1" in result.output and (tmp_path / "model.safetensors").exists()
    code, line = _usage(capsys, args)
    assert code == 2 and "pass --resume" in line
    resumed = CliRunner().invoke(app, args[:-2] + ["--dtype", "float32", "--resume", "--steps", "6"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from step 4 of 6" in resumed.output and "6 steps, resumed from step 4" in resumed.output
    assert "before (loop)" in resumed.output
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 6
    assert load(pair[0], drafter=tmp_path).drafter is not None
