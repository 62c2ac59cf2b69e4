"""Prompts and answers as text: what the model reads, from a string, token ids or chat
messages, and the text of what it writes.

The one place that decides how a conversation becomes token ids: the tokenizer's chat template
renders the messages to text (the template writes its own BOS, so the text is encoded without
adding special tokens again). The API, chat and every command go through here.

A ``str`` prompt is raw text that the model continues, as in mlx-lm's API; a list of message
dicts (``[{"role": "user", "content": ...}]``) is a conversation the model answers.
"""

from __future__ import annotations

from typing import Any

from .errors import InputError

Messages = list[dict]


def is_messages(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def check_messages(messages: Any) -> Messages:
    if not is_messages(messages):
        raise InputError('messages must be a non-empty list of {"role": ..., "content": ...} dicts')
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or "content" not in m:
            raise InputError(f'messages[{i}] needs a "role" string and a "content", got keys {sorted(m)}')
    return list(messages)


def render(tokenizer, messages: Messages, *, add_generation_prompt: bool = True,
           template_config: dict | None = None) -> str:
    """The conversation as text through the tokenizer's chat template.

    ``template_config`` goes to the template as extra variables (e.g. Gemma 4's
    ``{"enable_thinking": true}``), like mlx-lm's ``--chat-template-config``."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer files: pass the prompt as a list of token ids")
    if not getattr(tokenizer, "has_chat_template", False):
        raise InputError("this model's tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
    return tokenizer.apply_chat_template(check_messages(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False, **(template_config or {}))


def check_text(text: str) -> str:
    """Refuse text that is not Unicode through and through (lone surrogates: undecodable bytes
    that Python smuggled in from stdin or argv), which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the text is not valid UTF-8 (undecodable bytes at character {e.start})") from None
    return text


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Ids of rendered template text (the template writes its own BOS)."""
    return list(tokenizer.encode(check_text(text), add_special_tokens=False))


def encode_messages(tokenizer, messages: Messages, template_config: dict | None = None) -> list[int]:
    return encode_rendered(tokenizer, render(tokenizer, messages, template_config=template_config))


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of raw text the model continues (with the tokenizer's BOS, as mlx-lm encodes it)."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer files: pass the prompt as a list of token ids")
    if not text:
        raise InputError("prompt is empty")
    return list(tokenizer.encode(check_text(text)))


def user_turn(text: str, system: str | None = None) -> Messages:
    """A one-question conversation, with a system turn first when ``system`` is given."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# Answer text


def special_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (BOS, pad, Gemma's ``<|turn>`` and the like)."""
    added = tokenizer.added_tokens_decoder
    return frozenset(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


def answer_text(tokenizer, tokens: list[int]) -> str:
    """An answer's text: special tokens are control, not words, and never appear in it (a
    sampled ``<|turn>`` mid-answer stays in the ids the model saw, not in the text)."""
    return tokenizer.decode(tokens, skip_special_tokens=True)


class TextStream:
    """An answer's text piece by piece as tokens arrive, special tokens left out as in
    `answer_text`."""

    def __init__(self, tokenizer):
        self._detok = tokenizer.detokenizer
        self._detok.reset()
        self._skip = special_ids(tokenizer)

    def add(self, tokens: list[int], finished: bool) -> str:
        """The text new since the last call."""
        for t in tokens:
            if t not in self._skip:
                self._detok.add_token(t)
        if finished:
            self._detok.finalize()
        return self._detok.last_segment
