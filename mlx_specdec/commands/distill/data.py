"""Training text: files, folders or JSONL rows -> token sequences for training and held-out evaluation."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ...errors import InputError

from .settings import Settings


class DataError(InputError):
    """Training text that cannot be read or is too short."""


def _jsonl_texts(path: Path, tokenizer) -> list[list[int]]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON: {e.msg}") from None
        if isinstance(row, str):
            docs.append(tokenizer.encode(row))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            docs.append(list(tokenizer.apply_chat_template(row["messages"], tokenize=True)))
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append(tokenizer.encode(row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            reply = next((row[k] for k in ("completion", "response", "answer") if isinstance(row.get(k), str)), "")
            docs.append(tokenizer.encode(row["prompt"] + reply))
        else:
            raise DataError(
                f"{path}:{n}: expected a string or an object with 'text', 'prompt' or 'messages', "
                f"found {type(row).__name__}{' with keys ' + ', '.join(row) if isinstance(row, dict) else ''}"
            )
    return docs


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if path.is_file():
        return [path]
    raise DataError(f"data path {path} does not exist")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' "sequence longer than the model's maximum" warning: documents
    are tokenised whole, then cut into windows."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_documents(paths: Sequence[str | Path], tokenizer) -> list[list[int]]:
    """Token ids of every document: a text file is one document, a JSONL line is one
    (a string, {"text"}, {"prompt", "completion"} or chat {"messages"}); folders are read
    recursively (hidden files skipped, files that are not UTF-8 text skipped)."""
    if not paths:
        raise DataError("no training data given")
    if tokenizer is None:
        raise DataError("the target has no tokenizer files: cannot tokenise training text")
    docs = []
    with _quiet_transformers():
        for path in map(Path, paths):
            docs += _read_path(path, tokenizer)
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"no text found in {', '.join(map(str, paths))}")
    return docs


def _read_path(path: Path, tokenizer) -> list[list[int]]:
    docs = []
    files = _files(path)
    for f in files:
        if f.suffix == ".jsonl":
            docs += _jsonl_texts(f, tokenizer)
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if len(files) == 1:
                raise DataError(f"{f} is not UTF-8 text") from None
            continue  # a binary file inside a folder
        if text.strip():
            docs.append(tokenizer.encode(text))
    return docs


@dataclass
class Data:
    """A training token stream and a held-out one (documents end with EOS)."""

    train: np.ndarray
    held_out: np.ndarray

    @classmethod
    def from_documents(cls, docs: list[list[int]], eos: int, settings: Settings,
                       held_out_docs: list[list[int]] | None = None, held_out_fraction: float = 0.05) -> "Data":
        """Without ``held_out_docs``, the last ``held_out_fraction`` of the (seeded) shuffled
        stream is held out, at least enough for the evaluation sequences."""

        def stream(ds):
            return np.array([t for d in ds for t in (*d, eos)], dtype=np.int32)

        need = settings.seq_len + 1
        if held_out_docs is None:
            order = np.random.default_rng(settings.seed).permutation(len(docs))
            all_tokens = stream([docs[i] for i in order])
            n_held = max(int(len(all_tokens) * held_out_fraction), min(settings.eval_sequences, 2) * need)
            train, held = all_tokens[:-n_held], all_tokens[-n_held:]
        else:
            train, held = stream(docs), stream(held_out_docs)
        if len(train) < need:
            raise DataError(
                f"training data has {len(train)} tokens (after holding out {len(held)}); "
                f"need at least seq len + 1 = {need}: add text or lower --seq-len"
            )
        if len(held) < need:
            raise DataError(f"held-out data has {len(held)} tokens; need at least seq len + 1 = {need}")
        return cls(train, held)

    def windows(self, stream: np.ndarray, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        starts = rng.integers(0, len(stream) - length + 1, size=n)
        return np.stack([stream[s : s + length] for s in starts])

    def batch(self, step: int, settings: Settings) -> mx.array:
        """Step ``step``'s rows: a function of (seed, step) only, so resuming replays the
        batches an uninterrupted run would have seen."""
        rng = np.random.default_rng([settings.seed, 0, step])
        return mx.array(self.windows(self.train, rng, settings.batch_size, settings.seq_len))

    def eval_sequences(self, settings: Settings) -> mx.array:
        rng = np.random.default_rng([settings.seed, 1])
        return mx.array(self.windows(self.held_out, rng, settings.eval_sequences, settings.seq_len))

    def eval_prompts(self, settings: Settings) -> list[list[int]]:
        rng = np.random.default_rng([settings.seed, 2])
        length = min(settings.eval_prompt_len, len(self.held_out))
        return self.windows(self.held_out, rng, settings.eval_prompts, length).tolist()
