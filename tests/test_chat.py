"""`mlx-specdec chat`: the prompt cache reused across turns, and the real program in a terminal."""

import json
import os
import re
import subprocess
import sys

import pexpect
import pytest

from mlx_specdec import load
from mlx_specdec.api import Settings
from mlx_specdec.commands.chat import ChatSession
from mlx_specdec.loading import SpecModel
from tests.cli_model import make_pair

CLI = [sys.executable, "-m", "mlx_specdec.commands.cli"]
STATUS = re.compile(r"(\d+) tokens · [\d.]+ tok/s · acceptance \S+ · [\d.]+ tokens/round · (draft [^·]+?) · "
                    r"prefill (\d+) of (\d+) tokens \((\d+) reused\)")
QUESTIONS = ["Hello there", "And what else?", "Tell me more"]
# Prompts whose greedy answers from the test pair run long (hundreds of tokens) on the first.
STORIES = ["Once upon a time", "Write a very long poem about the sea", "Tell me a long story", "Go on", "More"]


@pytest.fixture(scope="module")
def model(checkpoints, tmp_path_factory):
    return make_pair(checkpoints, tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def spec(model):
    return load(model)


def _ask(session, text, chunks=None):
    """The answer's tokens; with ``chunks``, stop reading after that many (as Ctrl-C would)."""
    tokens, stream = [], session.ask(text)
    for i, chunk in enumerate(stream):
        tokens += chunk.tokens
        if chunks is not None and i + 1 == chunks:
            break
    stream.close()
    return tokens


def _sessions(spec, **settings):
    return [ChatSession(spec, Settings(**settings), reuse_cache=reuse) for reuse in (True, False)]


def test_each_turn_prefills_only_its_own_tokens_and_answers_as_a_full_prefill_would(spec):
    reused, fresh = _sessions(spec, max_tokens=12, draft_tokens=2)
    for q in QUESTIONS:
        assert _ask(reused, q) == _ask(fresh, q)
    first, *later = reused.reports
    assert first.prefill_tokens == first.prompt_tokens
    for before, turn in zip(reused.reports, later):
        own = turn.prompt_tokens - before.prompt_tokens - before.stats.generated_tokens
        # The new turn's tokens, plus the answer's last token when it stopped at max_tokens
        # (the last generated token is never in the cache: it would be the next step's input).
        assert own <= turn.prefill_tokens <= own + 1 < turn.prompt_tokens
    assert [t.prefill_tokens for t in fresh.reports] == [t.prompt_tokens for t in fresh.reports]

    # A new system prompt changes the conversation's first tokens: the sliding-window ring no
    # longer holds what a rewind that far needs, so the turn starts a fresh cache, and still agrees.
    for s in (reused, fresh):
        s.set_system("Be brief.")
    assert _ask(reused, "Again") == _ask(fresh, "Again")
    assert reused.reports[-1].prefill_tokens == reused.reports[-1].prompt_tokens


class _Interrupting:
    """Wraps a model; raises KeyboardInterrupt on its n-th call, after (target) or instead of
    (drafter) doing the work: the cache is then written past what the session committed."""

    def __init__(self, inner, at, after):
        self.inner, self.at, self.after, self.calls = inner, at, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at and not self.after:
            raise KeyboardInterrupt
        out = self.inner(*args)
        if self.calls == self.at:
            raise KeyboardInterrupt
        return out


@pytest.mark.parametrize("where", ["target", "drafter", "reader"])
def test_an_interrupted_answer_stays_in_the_conversation_and_the_cache_stays_true(spec, where):
    sessions = _sessions(spec, max_tokens=40, draft_tokens=3)
    for s in sessions:
        _ask(s, QUESTIONS[0])
        if where == "reader":  # the REPL stops reading the stream (Ctrl-C outside the model)
            _ask(s, QUESTIONS[1], chunks=3)
            continue
        wrapped = _Interrupting(getattr(spec, where), at=4, after=where == "target")
        s.spec = SpecModel(**{**vars(spec), where: wrapped})
        with pytest.raises(KeyboardInterrupt):
            _ask(s, QUESTIONS[1])
        s.spec = spec
    reused, fresh = sessions
    assert reused.reports[-1].interrupted and reused.messages == fresh.messages
    assert len(reused.messages) == 4 and reused.messages[-1]["role"] == "assistant"
    assert _ask(reused, QUESTIONS[2]) == _ask(fresh, QUESTIONS[2])
    assert reused.reports[-1].prefill_tokens < reused.reports[-1].prompt_tokens


def test_a_late_ctrl_c_returns_to_the_prompt(spec, monkeypatch):
    """Ctrl-C that lands after an answer ended (status line, cache bookkeeping) or during a slash
    command is not a crash: the REPL goes back to the prompt and the turn stays committed."""
    from rich.console import Console

    from mlx_specdec.commands import chat

    lines = iter(["Hello there", "/stats", "/quit"])
    monkeypatch.setattr(chat, "_read_line", lambda group: next(lines))
    real_command = chat.command

    def late(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "status_line", late)
    monkeypatch.setattr(chat, "command", lambda s, line, c: late() if line == "/stats" else real_command(s, line, c))
    session = ChatSession(spec, Settings(max_tokens=4))
    console = Console(record=True, width=200)
    chat.run(session, console)
    assert console.export_text().rstrip().endswith("bye")
    assert len(session.reports) == 1 and [m["role"] for m in session.messages] == ["user", "assistant"]


def _status(child):
    child.expect(STATUS)
    m = child.match
    return dict(tokens=int(m.group(1)), draft=m.group(2), prefill=int(m.group(3)), prompt=int(m.group(4)),
                reused=int(m.group(5)))


def test_chat_in_a_terminal(model, tmp_path):
    # Alongside: the same program reading a pipe, which ends with EOF (Ctrl-D in a terminal).
    piped = subprocess.Popen(CLI + ["chat", "--model", str(model), "--max-tokens", "5", "--history",
                                    str(tmp_path / "piped_history")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = pexpect.spawn(CLI[0], CLI[1:] + ["chat", "--model", str(model), "--max-tokens", "12", "--draft-tokens",
                                            "2", "--history", str(tmp_path / "history")],
                          encoding="utf-8", timeout=90, dimensions=(40, 250),
                          env={**os.environ, "COLUMNS": "250"})  # pytest exports COLUMNS=80, which rich obeys
    prompt = ">>> "

    def send(line, expect=None, error=None):
        child.sendline(line)
        if expect:
            child.expect_exact(expect)
        if error:  # one line: "error: <message>" (the word styled red)
            child.expect(r"error:(\x1b\[0m)? " + re.escape(error) + r"[^\n]*\r\n" + re.escape(prompt))
            return
        child.expect_exact(prompt)

    try:
        child.expect_exact("mlx-specdec chat")
        child.expect_exact(prompt)
        send("/help", "/draft auto|off|N")
        child.sendline(QUESTIONS[0])
        first = _status(child)
        child.expect_exact(prompt)
        assert first["reused"] == 0 and first["prefill"] == first["prompt"] and first["draft"] == "draft k=2"
        child.sendline(QUESTIONS[1])
        second = _status(child)
        child.expect_exact(prompt)
        own = second["prompt"] - first["prompt"] - first["tokens"]  # this turn's own tokens
        assert own <= second["prefill"] <= own + 1 and second["reused"] == second["prompt"] - second["prefill"]

        send("/draft auto", "draft: auto")
        send("/draft bogus", error="draft length must be auto, off or an integer")
        send("/temp hot", error="usage: /temp X")
        send("/frobnicate", error="unknown command /frobnicate (try /help)")
        send("/max 100000", "max tokens: 100000")

        # Ctrl-C stops a long answer; the conversation keeps what was said. The tiny model answers
        # hundreds of tokens a second and its answers end at a random EOS, so an answer can finish
        # before the signal lands: then the signal meets the prompt (a fresh prompt, nothing else)
        # and the next story is asked. Ctrl-C that never stops an answer fails after 5 stories.
        finished = 0
        for story_prompt in STORIES:
            child.sendline(story_prompt)
            child.expect_exact(story_prompt)
            child.expect(r"[a-z<>]{3}")  # the answer is streaming (escape sequences have no 3 such in a row)
            child.sendintr()
            if child.expect_exact(["stopped", "reused)"]) == 0:
                story = _status(child)
                child.expect_exact(prompt)
                break
            finished += 1
            child.expect_exact(prompt)
            child.expect_exact(prompt)  # the late Ctrl-C's fresh prompt
        else:
            pytest.fail(f"Ctrl-C stopped none of {len(STORIES)} answers")
        assert 0 < story["tokens"] < 100000
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, nothing else
        child.expect_exact(prompt)

        send("/max 12", "max tokens: 12")
        send("/temp 0.7", "temperature: 0.7")
        child.sendline("And now?")
        after = _status(child)
        child.expect_exact(prompt)
        # The cut answer stays in the cache: all of it but its last token (never in the cache).
        assert after["reused"] >= story["prompt"] + story["tokens"] - 1 and after["draft"].startswith("draft auto")
        send("/stats", f"session: {4 + finished} turns")
        send(f"/save {tmp_path / 'chat.json'}", f"saved {8 + 2 * finished} messages")
        send("/system Be brief.", "system prompt set")
        send("/reset", "conversation cleared")
        child.sendline("/quit")
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * (4 + finished)
    assert [t["interrupted"] for t in saved["turns"]] == [False, False] + [False] * finished + [True, False]
    assert saved["turns"][1]["prefill_tokens"] == second["prefill"]

    stdout, stderr = piped.communicate("Hello there\n/stats\n", timeout=60)
    assert piped.returncode == 0, stderr
    assert STATUS.search(stdout) and "session: 1 turns" in stdout and stdout.rstrip().endswith("bye")
