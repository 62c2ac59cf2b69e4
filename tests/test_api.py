"""The Python API's prompt forms (chat messages, raw text, token ids), its options, answer text
without special tokens, and the README's Python examples run as a user would."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from mlx_specdec import generate, generate_batch, load, stream_generate
from mlx_specdec.api import Settings
from mlx_specdec.errors import InputError
from mlx_specdec.prompt import TextStream, answer_text, encode_messages, special_ids, user_turn
from tests.cli_model import make_pair

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def spec(checkpoints, tmp_path_factory):
    return load(make_pair(checkpoints, tmp_path_factory.mktemp("api")))


def test_messages_are_answered_through_the_chat_template(spec):
    messages = user_turn("Hello there", system="Be brief.")
    ids = encode_messages(spec.tokenizer, messages)
    assert ids[0] == spec.tokenizer.bos_token_id and ids.count(spec.tokenizer.bos_token_id) == 1
    expected = generate(spec, ids, max_tokens=6, draft_tokens=2)
    assert generate(spec, messages, max_tokens=6, draft_tokens=2).tokens == expected.tokens
    assert generate(spec, messages=messages, max_tokens=6, draft_tokens=2).tokens == expected.tokens
    streamed = [t for c in stream_generate(spec, messages=messages, max_tokens=6, draft_tokens=2) for t in c.tokens]
    assert streamed == expected.tokens
    # A str stays raw text to continue, as in mlx-lm's API.
    raw = generate(spec, "Hello there", max_tokens=6, draft_tokens=2)
    assert raw.tokens == generate(spec, list(spec.tokenizer.encode("Hello there")), max_tokens=6,
                                  draft_tokens=2).tokens


def test_generate_batch_takes_conversations_beside_other_prompts(spec):
    messages = user_turn("Hello there")
    results = generate_batch(spec, [messages, "def f(x):", [5, 6, 7]], max_tokens=5, draft_tokens=2)
    assert results[0].tokens == generate(spec, messages, max_tokens=5, draft_tokens=2).tokens
    assert results[2].tokens == generate(spec, [5, 6, 7], max_tokens=5, draft_tokens=2).tokens
    with pytest.raises(InputError, match="list of conversations"):
        generate_batch(spec, messages)


@pytest.mark.parametrize("call, message", [
    (lambda s: generate(s, "hi", temprature=0.5), "unknown option temprature"),
    (lambda s: generate(s, "hi", messages=user_turn("hi")), "one of them"),
    (lambda s: generate(s), "one of them"),
    (lambda s: generate(s, [{"content": "no role"}]), "role"),
    (lambda s: generate_batch(s, "hello"), "list of prompts"),
])
def test_bad_prompts_and_options_are_input_errors(spec, call, message):
    with pytest.raises(InputError, match=message):
        call(spec)


def test_chat_template_config_reaches_the_template(spec, monkeypatch):
    seen = {}
    original = spec.tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        seen.update(kwargs)
        return original(messages, **kwargs)

    monkeypatch.setattr(spec.tokenizer, "apply_chat_template", spy)
    generate(spec, user_turn("hi"), max_tokens=2, chat_template_config={"enable_thinking": True})
    assert seen["enable_thinking"] is True


def test_settings_are_the_one_spelling_of_the_options():
    assert Settings.of({"temperature": 0.5, "draft_tokens": 3}).options().draft_tokens == 3
    with pytest.raises(InputError, match="top_p"):
        Settings(top_p=2.0).options()


def test_special_tokens_never_reach_answer_text(spec):
    tok = spec.tokenizer
    turn = tok.convert_tokens_to_ids("<|turn>")
    assert turn in special_ids(tok)
    words = list(tok.encode("hello world", add_special_tokens=False))
    tokens = words[:1] + [turn] + words[1:]
    assert "<|turn>" not in answer_text(tok, tokens) and answer_text(tok, tokens) == tok.decode(words)
    stream = TextStream(tok)
    assert "".join(stream.add([t], i == len(tokens) - 1) for i, t in enumerate(tokens)) == tok.decode(words)


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_every_readme_python_example_prints_an_answer():
    """Run as written, on the default (embedded demo) model. The examples that talk to a running
    `mlx-specdec serve` (the openai client) run in test_server.py, against a live server."""
    blocks = [b for b in _readme_python_blocks() if "from openai import" not in b]
    assert len(blocks) >= 2
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "README.md", "exec"), {})
        printed = [line for line in out.getvalue().splitlines() if line.strip()]
        assert printed and all(line.strip() for line in printed), block
