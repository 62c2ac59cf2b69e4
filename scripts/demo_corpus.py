"""The demo pair's corpus: the Python standard library's own source, and question -> answer
chats built from its docstrings. Every machine with Python has it; nothing is downloaded.

Reading order: which files (and which are held out), the question -> answer pairs, the
tokenizer. Everything is deterministic in the seed and the Python version's stdlib.
"""

from __future__ import annotations

import ast
import inspect
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Folders of the stdlib that are not library code worth learning from: test suites,
# generated codec tables, bundled wheels, demos and pydoc's pickled topic strings.
SKIPPED_DIRS = frozenset(
    {"site-packages", "test", "tests", "idle_test", "encodings", "ensurepip", "turtledemo",
     "pydoc_data", "__pycache__", "__phello__", "lib-dynload"}
)
SKIPPED_DIR_PREFIXES = ("config-",)
MAX_FILE_BYTES = 250_000  # a few generated giants (e.g. tables) add bulk, not code

# Modules never trained on, by target or drafter: the held-out code continuation prompts
# and held-out questions come from these. Ordinary, mid-sized, unlike one another.
HELD_OUT = (
    "calendar.py", "colorsys.py", "difflib.py", "fractions.py", "graphlib.py", "ipaddress.py",
    "mailbox.py", "netrc.py", "sched.py", "shlex.py", "statistics.py", "tabnanny.py",
    "textwrap.py", "wave.py",
)

# Special tokens, Gemma's ids for the first four and Gemma 4's chat-turn markers.
PAD, EOS, BOS, UNK, TURN_START, TURN_END = "<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, TURN_START, TURN_END]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
MAX_ANSWER_CHARS = 400


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class SourceFile:
    path: Path
    module: str  # dotted name, e.g. "email.mime.text"
    held_out: bool


def source_files(root: Path | None = None) -> list[SourceFile]:
    """The stdlib's library .py files, sorted by path, each marked train or held out."""
    root = root or stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in SKIPPED_DIRS or p.startswith(SKIPPED_DIR_PREFIXES) for p in rel.parts[:-1]):
            continue
        if path.stat().st_size > MAX_FILE_BYTES or path.stat().st_size == 0:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(SourceFile(path, ".".join(parts), str(rel) in HELD_OUT))
    return out


def read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# Question -> answer pairs from docstrings


def _first_paragraph(doc: str) -> str | None:
    para = inspect.cleandoc(doc).split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines()).strip()
    if len(text) < 12 or text.startswith((">>>", "..")):
        return None
    if len(text) > MAX_ANSWER_CHARS:
        cut = text[:MAX_ANSWER_CHARS].rsplit(". ", 1)[0]
        text = cut if cut.endswith(".") or len(cut) < 40 else cut + "."
    return text


def _public(name: str) -> bool:
    return not name.startswith("_")


_WHAT = ("What does {name} do?", "Explain {name}.", "What is {name} for?", "Describe {name}.")
_CLASS = ("What is {name}?", "Explain the class {name}.", "What is {name} for?")
_MODULE = ("What is the {name} module?", "What is the {name} module for?", "Describe the {name} module.")


def qa_pairs(source: str, module: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs for the public, documented names of one module.

    "What does json.dumps do?" -> the first paragraph of its docstring, "What is the
    signature of json.dumps?" -> its def line; classes, their methods and the module too.
    The question wording is drawn from a few templates with ``rng``.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    if not all(_public(p) for p in module.split(".")):
        return []
    pairs = []
    doc = ast.get_docstring(tree)
    if doc and (answer := _first_paragraph(doc)):
        pairs.append((rng.choice(_MODULE).format(name=module), answer))

    def function(node, qualname):
        doc = ast.get_docstring(node)
        if doc and (answer := _first_paragraph(doc)):
            pairs.append((rng.choice(_WHAT).format(name=qualname), answer))
        args = ast.unparse(node.args)
        pairs.append((f"What is the signature of {qualname}?", f"{qualname}({args})"))

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            function(node, f"{module}.{node.name}")
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            qual = f"{module}.{node.name}"
            doc = ast.get_docstring(node)
            if doc and (answer := _first_paragraph(doc)):
                pairs.append((rng.choice(_CLASS).format(name=qual), answer))
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(item.name):
                    function(item, f"{qual}.{item.name}")
    return pairs


def chat_text(question: str, answer: str) -> str:
    """One exchange in the chat template's format, without <bos> (documents get theirs)."""
    return f"{TURN_START}user\n{question}{TURN_END}\n{TURN_START}model\n{answer}{TURN_END}\n"


@dataclass
class Corpus:
    train_code: list[str]
    held_out_code: list[tuple[str, str]]  # (module, source)
    train_qa: list[tuple[str, str]]
    held_out_qa: list[tuple[str, str]]
    train_paths: list[Path]


def build_corpus(seed: int, root: Path | None = None) -> Corpus:
    rng = random.Random(seed)
    corpus = Corpus([], [], [], [], [])
    for f in source_files(root):
        source = read(f.path)
        if source is None:
            continue
        pairs = qa_pairs(source, f.module, rng)
        if f.held_out:
            corpus.held_out_code.append((f.module, source))
            corpus.held_out_qa += pairs
        else:
            corpus.train_code.append(source)
            corpus.train_paths.append(f.path)
            corpus.train_qa += pairs
    rng.shuffle(corpus.train_qa)
    return corpus


def write_qa_jsonl(pairs: list[tuple[str, str]], path: Path) -> Path:
    """As the distill command reads it: one {"text": ...} chat per line (encoding adds <bos>)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for q, a in pairs:
            f.write(json.dumps({"text": chat_text(q, a)}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """A byte-level BPE (GPT-2 style pre-tokenizer, no unknown bytes) with Gemma's special
    tokens at ids 0-5; encoding prepends <bos>. Writes tokenizer.json,
    tokenizer_config.json and chat_template.jinja into ``out``; returns the Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tok
