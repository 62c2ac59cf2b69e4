"""Bad input and untrusted files: a typed error or a one-line exit, never a crash or a wrong answer.

The models are the embedded demo pair and copies of it with one file changed, so no test here
needs torch. CLI cases are real processes, started together; those that must fail before any
weights load are given a --model that does not exist: failing on the flag (exit 2) rather than on
the model (exit 1) shows the flag was judged first.
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console

from mlx_specdec import ConfigError, InputError, LoadError, generate, generate_batch, load, loading
from mlx_specdec.commands import chat as chat_mod
from mlx_specdec.commands.chat import ChatSession, Settings
from mlx_specdec.decode import decode, new_cache
from mlx_specdec.loading import human_bytes
from mlx_specdec.demo import demo_path
from mlx_specdec.sampling import SamplingParams, make_key

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "mlx_specdec.commands.cli"]
DEMO = demo_path()
# A prompt longer than the demo model's 4096 positions (about 8 tokens a line).
LONG_TEXT = "def add(left, right):\n    return left + right\n" * 800


@pytest.fixture(scope="module")
def spec():
    return load()


def copy_demo(root: Path, *, positions: int | None = None) -> Path:
    """The demo pair in ``root/model``, weights linked rather than copied; ``positions`` shrinks
    max_position_embeddings so that the limit is reached in a few tokens."""
    out = Path(root) / "model"
    shutil.copytree(DEMO, out, ignore=shutil.ignore_patterns("*.safetensors"))
    for rel in ("model.safetensors", "drafter/model.safetensors"):
        (out / rel).symlink_to(DEMO / rel)
    if positions is not None:
        for rel in ("config.json", "drafter/config.json"):
            edit_config(out / rel, max_position_embeddings=positions)
    return out


def edit_config(file: Path, **changes) -> None:
    cfg = json.loads(file.read_text())
    inner = cfg["text_config"] if "text_config" in cfg else cfg
    inner.update(changes)
    file.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """The demo pair with a 64-position limit."""
    return load(copy_demo(tmp_path_factory.mktemp("short"), positions=64))


# ---------------------------------------------------------------------------------------------
# The command line: every case a process, all started at once.


# Usage errors run in one process (they load nothing, so only the imports would repeat): each
# case calls the command-line app as `python -m mlx_specdec.commands.cli` would, with its stderr
# and exit code captured.
USAGE_DRIVER = """
import contextlib, io, json, sys
from mlx_specdec.commands.cli import app
results = {}
for name, argv in json.load(sys.stdin).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            app(argv, prog_name="mlx-specdec")
            code = 0
        except SystemExit as e:
            code = e.code
    results[name] = [code, "", err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bad_config = copy_demo(root)
    edit_config(bad_config / "config.json", sliding_window=0)
    missing = str(root / "no-such-model")
    gen = ["generate", "hi", "--model", missing]
    distill = ["distill", "--data", str(REPO / "README.md"), "--out", str(root / "out"), "--model", missing]
    usage = {
        # Usage errors: exit 2, found before the (missing) model is looked at.
        "top_p_0": gen + ["--top-p", "0"],
        "min_p_1": gen + ["--min-p", "1"],
        "temp_inf": gen + ["--temp", "inf"],
        "temp_nan": gen + ["--temp", "nan"],
        "dtype_fp8": gen + ["--dtype", "fp8"],
        "chat_top_p_0": ["chat", "--model", missing, "--top-p", "0"],
        "chat_dtype": ["chat", "--model", missing, "--dtype", "fp8"],
        "bench_modes_9": ["bench", "--model", missing, "--modes", "9"],
        "bench_workload": ["bench", "--model", missing, "--workloads", "nonsense"],
        "bench_temp_inf": ["bench", "--model", missing, "--temp", "inf"],
        "distill_steps_0": distill + ["--steps", "0"],
        "distill_bits_7": distill + ["--quantize-bits", "7"],
        "distill_dtype": distill + ["--dtype", "fp8"],
        "distill_feed": distill + ["--feed", "nonsense"],
        "distill_layers_0": distill + ["--layers", "0"],
        "distill_hidden_0": distill + ["--hidden-size", "0"],
        "distill_lr_0": distill + ["--lr", "0"],
        "distill_resume": distill + ["--resume"],
        "distill_no_data": ["distill", "--data", str(root / "absent.txt"), "--out", str(root / "out"),
                            "--model", missing],
    }
    commands = {
        "usage": (CLI[:1] + ["-c", USAGE_DRIVER], json.dumps(usage).encode()),
        # Seeds: any integer is accepted (reduced to the key's 64 bits); these run the demo model.
        "seed_negative": (CLI + ["generate", "hi", "--max-tokens", "3", "--temp", "0.7", "--seed", "-5", "-k", "2", "--json"],
                          None),
        "seed_huge": (CLI + ["generate", "hi", "--max-tokens", "3", "--temp", "0.7", "--seed", str(2**64 - 5),
                             "-k", "2", "--json"], None),
        # Input and model errors: exit 1.
        "stdin_not_utf8": (CLI + ["generate", "--model", missing], b"hello \xff\xfe there"),
        "too_long": (CLI + ["generate", "--ignore-chat-template", "--max-tokens", "2"], LONG_TEXT.encode()),
        "bad_config": (CLI + ["generate", "hi", "--model", str(bad_config)], None),
    }
    procs = {name: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=REPO) for name, (cmd, _) in commands.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(commands[name][1], timeout=300)
        out[name] = (proc.returncode, stdout.decode(), stderr.decode())
    code, stdout, stderr = out.pop("usage")
    assert code == 0, stderr
    out.update({name: tuple(result) for name, result in json.loads(stdout).items()})
    return out


BLAS_HINT = "warning: MLX is using its slow reference BLAS"  # a fact about the machine, on any command


def one_line(run) -> str:
    code, stdout, stderr = run
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(BLAS_HINT)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize("name, words", [
    ("top_p_0", ["--top-p", "top_p"]), ("min_p_1", ["--min-p", "min_p"]), ("temp_inf", ["--temp", "inf"]),
    ("temp_nan", ["--temp"]), ("dtype_fp8", ["--dtype", "fp8", "float16"]),
    ("chat_top_p_0", ["--top-p"]), ("chat_dtype", ["--dtype", "fp8"]),
    ("bench_modes_9", ["--modes", "9"]), ("bench_workload", ["--workloads", "nonsense"]),
    ("bench_temp_inf", ["--temp", "inf"]),
    ("distill_steps_0", ["--steps"]), ("distill_bits_7", ["--quantize-bits", "7"]),
    ("distill_dtype", ["--dtype", "fp8"]), ("distill_feed", ["--feed", "nonsense"]),
    ("distill_layers_0", ["--layers"]), ("distill_hidden_0", ["--hidden-size"]), ("distill_lr_0", ["--lr"]),
    ("distill_resume", ["--resume", "nothing to resume"]), ("distill_no_data", ["--data", "absent.txt"]),
])
def test_usage_errors_exit_2_before_loading(runs, name, words):
    line = one_line(runs[name])
    assert runs[name][0] == 2, runs[name]
    for word in words:
        assert word in line, line


def test_any_integer_seed_is_accepted_and_reduced_to_64_bits(runs):
    results = [runs[name] for name in ("seed_negative", "seed_huge")]
    for code, stdout, stderr in results:
        assert code == 0, stderr
    # -5 and 2**64 - 5 are the same key (and k is fixed: auto's choices, made by timing, change
    # which random numbers each token uses).
    assert json.loads(results[0][1])["tokens"] == json.loads(results[1][1])["tokens"]


def test_stdin_that_is_not_utf8_is_one_clear_line(runs):
    line = one_line(runs["stdin_not_utf8"])
    assert runs["stdin_not_utf8"][0] == 1 and "UTF-8" in line and "no-such-model" not in line


def test_a_prompt_past_the_position_limit_is_refused(runs):
    line = one_line(runs["too_long"])
    assert runs["too_long"][0] == 1 and "4096" in line and runs["too_long"][1] == ""


def test_a_bad_config_is_one_line_naming_the_file(runs):
    line = one_line(runs["bad_config"])
    assert runs["bad_config"][0] == 1 and "sliding_window" in line and "config.json" in line


# ---------------------------------------------------------------------------------------------
# Seeds and sampling settings through the API


@pytest.mark.parametrize("seed", [-5, 2**64 - 5, 2**64 + 7, -(2**70), np.int64(3), 0])
def test_seeds_any_integer(seed):
    params = SamplingParams(temperature=0.5, seed=seed)
    assert 0 <= params.seed < 2**64
    assert mx.array_equal(make_key(params.seed), make_key(int(seed) % 2**64))


@pytest.mark.parametrize("seed", ["abc", 1.5, True, [1]])
def test_seeds_that_are_not_integers_are_refused(spec, seed):
    with pytest.raises(InputError, match="seed"):
        generate(spec, [5, 6, 7], max_tokens=2, temperature=0.5, seed=seed)


def test_seed_reduction_gives_the_same_samples(spec):
    a = generate(spec, [5, 6, 7], max_tokens=6, temperature=1.0, seed=-1, draft_tokens=2)
    b = generate(spec, [5, 6, 7], max_tokens=6, temperature=1.0, seed=2**64 - 1, draft_tokens=2)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("kwargs, word", [
    ({"temperature": "0.5"}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": None}, "temperature"),
    ({"top_k": 1.5}, "top_k"), ({"top_k": "3"}, "top_k"), ({"top_k": True}, "top_k"),
    ({"top_p": "x"}, "top_p"), ({"min_p": None}, "min_p"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"draft_tokens": True}, "draft_tokens"),
])
def test_wrong_typed_options_are_input_errors(spec, kwargs, word):
    with pytest.raises(InputError, match=word):
        generate(spec, [5, 6, 7], **{"max_tokens": 2, **kwargs})
    with pytest.raises(InputError, match=word):
        generate_batch(spec, [[5, 6, 7]], **{"max_tokens": 2, **kwargs})


# ---------------------------------------------------------------------------------------------
# Prompts through the API


def test_a_string_is_not_a_batch(spec):
    with pytest.raises(InputError, match="list"):
        generate_batch(spec, "hello", max_tokens=2)


def test_numpy_integer_token_ids_are_token_ids(spec):
    expected = generate(spec, [5, 6, 7], max_tokens=3, draft_tokens=0).tokens
    assert generate(spec, [np.int64(5), np.int32(6), np.uint16(7)], max_tokens=3, draft_tokens=0).tokens == expected
    assert generate(spec, np.array([5, 6, 7]), max_tokens=3, draft_tokens=0).tokens == expected
    assert generate_batch(spec, [np.array([5, 6, 7])], max_tokens=3, draft_tokens=0)[0].tokens == expected


@pytest.mark.parametrize("bad", [[True, False], [5, 6.0], [5, "6"], [[5, 6]], np.array([[5, 6]]),
                                 np.array([0.5, 1.0]), None, 5])
def test_prompts_that_are_not_token_ids_are_input_errors(spec, bad):
    with pytest.raises(InputError):
        generate(spec, bad, max_tokens=2)
    with pytest.raises(InputError):
        generate_batch(spec, [[5, 6], bad], max_tokens=2)


def test_text_that_cannot_be_utf8_is_an_input_error(spec):
    with pytest.raises(InputError, match="UTF-8"):
        generate(spec, "hello \udcff", max_tokens=2)


# ---------------------------------------------------------------------------------------------
# The position limit


def test_the_limit_is_read_from_the_config(spec, short):
    assert spec.target.config.max_position_embeddings == 4096
    assert short.target.config.max_position_embeddings == 64


@pytest.mark.parametrize("length", [64, 65, 200])
def test_a_prompt_with_no_room_left_is_refused_naming_the_limit(short, length):
    with pytest.raises(InputError, match="64"):
        generate(short, [7] * length, max_tokens=2)
    with pytest.raises(InputError, match="64"):
        generate_batch(short, [[7] * 5, [7] * length], max_tokens=2)


@pytest.mark.parametrize("k", [0, 4, "auto"])
def test_generation_stops_at_the_limit(short, k):
    """Prompt + answer never pass the model's positions; what fits is the plain greedy answer."""
    prompt = [int(t) for t in np.random.RandomState(0).randint(10, 4000, size=58)]
    result = generate(short, prompt, max_tokens=50, draft_tokens=k)
    assert len(prompt) + len(result.tokens) <= 64
    assert result.finish_reason in ("length", "stop")
    if result.finish_reason == "length":
        assert len(result.tokens) == 64 - len(prompt)
    batch = generate_batch(short, [prompt, prompt[:20]], max_tokens=50, draft_tokens=k)
    assert batch[0].tokens == result.tokens
    assert len(batch[1].tokens) <= 44


# ---------------------------------------------------------------------------------------------
# Loading: arguments, configs, weights, memory


def test_an_empty_model_name_is_refused():
    for name in ("", "  "):
        with pytest.raises(LoadError, match="got ''|got '  '"):
            load(name)


def test_drafter_true_means_find_it(tmp_path):
    spec = load(drafter=True)
    assert spec.drafter is not None and spec.drafter_name.endswith("drafter")
    alone = tmp_path / "alone"
    shutil.copytree(DEMO, alone, ignore=shutil.ignore_patterns("drafter"))
    with pytest.raises(LoadError, match="drafter"):
        load(alone, drafter=True)


@pytest.mark.parametrize("kwargs", [{"model": 5}, {"drafter": 3}, {"dtype": "fp8"}, {"dtype": 16}])
def test_wrong_load_arguments_are_refused(kwargs):
    with pytest.raises(LoadError):
        load(**kwargs)


@pytest.mark.parametrize("which, changes, words", [
    ("config.json", {"sliding_window": 0}, ["sliding_window", "0"]),
    ("config.json", {"num_attention_heads": None}, ["num_attention_heads", "None"]),
    ("config.json", {"hidden_size": "256"}, ["hidden_size", "'256'"]),
    ("config.json", {"num_hidden_layers": -1}, ["num_hidden_layers"]),
    ("config.json", {"vocab_size": 0}, ["vocab_size"]),
    ("config.json", {"head_dim": 64.5}, ["head_dim"]),
    ("config.json", {"max_position_embeddings": 0}, ["max_position_embeddings"]),
    ("config.json", {"rms_norm_eps": "small"}, ["rms_norm_eps"]),
    ("config.json", {"final_logit_softcapping": -1}, ["final_logit_softcapping"]),
    ("config.json", {"layer_types": "sliding_attention"}, ["layer_types"]),
    ("config.json", {"rope_parameters": [1, 2]}, ["rope_parameters"]),
    ("config.json", {"eos_token_id": "1"}, ["eos_token_id"]),
    ("config.json", {"num_kv_shared_layers": 9}, ["num_kv_shared_layers"]),
    ("config.json", {"num_kv_shared_layers": 6}, ["num_kv_shared_layers 6", "K/V"]),  # none left to share
    ("drafter/config.json", {"sliding_window": 0}, ["sliding_window", "drafter"]),
    ("drafter/config.json", {"num_attention_heads": None}, ["num_attention_heads", "drafter"]),
])
def test_config_values_are_validated_naming_the_file(tmp_path, which, changes, words):
    model = copy_demo(tmp_path)
    edit_config(model / which, **changes)
    with pytest.raises(ConfigError) as e:
        load(model)
    assert str(model / which) in str(e.value)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("which, content", [
    ("config.json", "[1, 2]"), ("config.json", "null"), ("drafter/config.json", '"gemma4"'),
    ("config.json", '{"model_type": "gemma4", "text_config": [1]}'),
])
def test_a_config_that_is_not_an_object_is_refused_naming_the_file(tmp_path, which, content):
    model = copy_demo(tmp_path)
    (model / which).write_text(content)
    with pytest.raises(ConfigError, match="config.json"):
        load(model)
    assert str(model / which) in str(pytest.raises(ConfigError, load, model).value)


def _damage(file: Path, how: str) -> None:
    data = file.resolve().read_bytes()
    file.unlink()
    if how == "empty":
        file.write_bytes(b"")
    elif how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbled header":
        file.write_bytes(data[:8] + b"\x00\xff" * 40 + data[88:])
    elif how == "huge header length":
        file.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    elif how == "text":
        file.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")


@pytest.mark.parametrize("how", ["empty", "truncated", "garbled header", "huge header length", "text"])
@pytest.mark.parametrize("role, rel", [("target", "model.safetensors"), ("drafter", "drafter/model.safetensors")])
def test_damaged_weights_are_a_load_error_naming_the_file_and_its_role(tmp_path, how, role, rel):
    model = copy_demo(tmp_path)
    _damage(model / rel, how)
    with pytest.raises(LoadError) as e:
        load(model)
    assert str(model / rel) in str(e.value) and role in str(e.value)


def test_weights_that_do_not_fit_in_memory_are_refused_before_loading(monkeypatch):
    monkeypatch.setattr(loading, "available_memory", lambda: (10_000_000, "test memory"))
    with pytest.raises(LoadError) as e:
        load()
    message = str(e.value)
    # The demo pair is 19 MB of fp16 on disk, 37 MB once upcast to fp32 on the CPU.
    assert "needs" in message and "37" in message and "10.0 MB" in message and "test memory" in message
    monkeypatch.setattr(loading, "available_memory", lambda: (100_000_000, "test memory"))
    assert load().drafter is not None


def test_the_memory_estimate_reads_the_headers():
    target = loading.weight_bytes(DEMO, mx.float32)
    drafter = loading.weight_bytes(DEMO / "drafter", mx.float32)
    as_stored = loading.weight_bytes(DEMO, None)
    assert 1.9 * as_stored < target < 2.1 * as_stored  # fp16 upcast
    assert abs(as_stored - (DEMO / "model.safetensors").stat().st_size) < 100_000
    assert 0 < drafter < target
    assert loading.available_memory()[0] > 0


def _cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


@pytest.mark.parametrize("geometry", ["demo", "e2b", "31b"])
def test_the_kv_estimate_is_what_the_cache_takes(checkpoints, geometry):
    """Rings per row, full attention grown to the furthest position, KV-shared layers none,
    k=v layers (31b) both K and V: the estimate is the bytes the cache holds after a decode."""
    if geometry == "demo":
        spec = load()
    else:
        target = checkpoints.target(geometry)
        spec = load(target, drafter=checkpoints.assistant(target))
    for length, max_tokens in ((20, 10), (300, 40)):
        cache = new_cache(spec, 1)
        for _ in decode(spec, [[5] * length], Settings(max_tokens=max_tokens, draft_tokens=4).options(), cache=cache):
            pass
        assert loading.kv_bytes(spec, 1, length + max_tokens) == _cache_bytes(cache) > 0
    assert loading.kv_bytes(spec, 3, 40) == 3 * loading.kv_bytes(spec, 1, 40)
    # Past the position limit nothing more is held, whatever max_tokens says.
    limit = spec.target.config.max_position_embeddings
    assert loading.kv_bytes(spec, 1, 10**12) == loading.kv_bytes(spec, 1, limit)


def _memory_for(spec, longest, rows=1):
    """available_memory as it would read with room for ``rows`` rows of ``longest`` tokens' K/V, less a byte."""
    room = loading.kv_bytes(spec, rows, longest) - 1
    return lambda in_use=0: (room, "test memory")


def test_a_request_whose_kv_does_not_fit_is_refused_before_it_runs(monkeypatch, spec):
    monkeypatch.setattr(loading, "available_memory", _memory_for(spec, 3 + 2000))
    with pytest.raises(InputError) as e:
        generate(spec, [5, 6, 7], max_tokens=2000)
    message = str(e.value)
    assert "K/V" in message and "test memory" in message and "2000" in message
    assert human_bytes(loading.kv_bytes(spec, 1, 2003)) in message
    assert len(generate(spec, [5, 6, 7], max_tokens=2, draft_tokens=0).tokens) == 2  # a short one fits
    with pytest.raises(InputError, match="2 rows"):
        generate_batch(spec, [[5, 6, 7], [8, 9]], max_tokens=2000)
    monkeypatch.setattr(loading, "available_memory", _memory_for(spec, 3 + 2000, rows=2))
    with pytest.raises(InputError, match="K/V"):
        generate_batch(spec, [[5, 6, 7], [8, 9]], max_tokens=2000)
    assert len(generate_batch(spec, [[5, 6, 7]], max_tokens=2, draft_tokens=0)[0].tokens) == 2


def test_the_memory_left_counts_what_mlx_holds(monkeypatch):
    """MLX's limit counts the loaded weights; the system's available memory has them off already."""
    monkeypatch.setattr(mx, "get_memory_limit", lambda: 300_000_000)
    assert loading.available_memory() == (300_000_000, "under MLX's memory limit (mx.set_memory_limit)")
    assert loading.available_memory(in_use=100_000_000) == (200_000_000, "under MLX's memory limit (mx.set_memory_limit)")
    assert loading.available_memory(in_use=400_000_000) == (0, "under MLX's memory limit (mx.set_memory_limit)")


# ---------------------------------------------------------------------------------------------
# The chat REPL survives each bad input with its conversation and cache intact


def _repl(monkeypatch, session, lines):
    """Run the REPL on ``lines`` (a str is typed, an exception is raised by input()); its output."""
    out = io.StringIO()
    feed = iter(lines)

    def typed(prompt=""):
        item = next(feed, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    with monkeypatch.context() as m:
        m.setattr(chat_mod, "input", typed, raising=False)  # found before the builtin
        chat_mod.run(session, Console(file=out, width=200, highlight=False, color_system=None))
    return out.getvalue()


def test_chat_survives_bad_input(monkeypatch, short):
    session = ChatSession(short, Settings(max_tokens=3, draft_tokens=2))
    _repl(monkeypatch, session, ["Hi"])
    messages, cached, settings = list(session.messages), list(session._cached), vars(session.settings).copy()
    cache = session._cache
    assert len(messages) == 2 and cached
    output = _repl(monkeypatch, session, [
        "/temp inf", "/temp nan", "/temp -1", "/max 0", "/draft 99",
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        "hello \udcff",
        "tell me " * 40,  # past the 64 positions
    ])
    assert "Traceback" not in output
    assert output.count("error:") == 8, output
    assert "64" in output and "/reset" in output and "UTF-8" in output
    assert session.messages == messages and session._cached == cached and session._cache is cache
    assert vars(session.settings) == settings
    # ... and goes on where it was: the next turn reuses the cache.
    _repl(monkeypatch, session, ["Ok"])
    assert len(session.messages) == 4 and session.reports[-1].reused_tokens == len(cached)


def test_chat_refuses_a_turn_whose_kv_does_not_fit_and_goes_on(monkeypatch, spec):
    session = ChatSession(spec, Settings(max_tokens=3, draft_tokens=2))
    _repl(monkeypatch, session, ["Hi"])
    messages, cached, cache = list(session.messages), list(session._cached), session._cache
    session.settings.max_tokens = 3000
    monkeypatch.setattr(loading, "available_memory", _memory_for(spec, 1000))  # room for 1000 tokens, not 3000
    output = _repl(monkeypatch, session, ["Tell me more"])
    assert "Traceback" not in output and output.count("error:") == 1 and "K/V" in output, output
    assert session.messages == messages and session._cached == cached and session._cache is cache
    session.settings.max_tokens = 3
    _repl(monkeypatch, session, ["Ok"])
    assert len(session.messages) == 4 and session.reports[-1].reused_tokens == len(cached)


def test_chat_answers_stop_at_the_limit_and_say_so(monkeypatch, short):
    session = ChatSession(short, Settings(max_tokens=200, draft_tokens=2))
    output = _repl(monkeypatch, session, ["word " * 20, "more"])
    assert session.reports[0].prompt_tokens + session.reports[0].stats.generated_tokens <= 64
    assert "64" in output and "/reset" in output


# ---------------------------------------------------------------------------------------------
# What "identical" means: bench/near_ties.py, at its smallest settings


def test_near_ties_measures_shape_noise_and_flips_only_at_near_ties(tmp_path, monkeypatch):
    """README's contract: batch and verify shapes move float32 logits only in their last bits,
    so a greedy token can flip only where the top two were closer than that move."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("near_ties", REPO / "bench" / "near_ties.py")
    near_ties = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, "near_ties", near_ties)
    module_spec.loader.exec_module(near_ties)
    out = tmp_path / "near_ties.md"
    results = near_ties.main(["--random-model", "--random-prompts", "3", "--new-tokens", "8", "--batch", "3",
                              "--k", "2", "--out", str(out)])
    assert set(results) == {"batch", "verify", "verify, batch"}
    for shape, r in results.items():
        assert r["max_diff"] < 1e-3, (shape, r)  # rounding, not a different computation
        assert r["flips"] <= r["could_flip"], (shape, r)  # every flip at a gap the shape crossed
    table = out.read_text()
    assert "24 positions" in table and table.count("| verify") == 2 and "| batch (B=3" in table
