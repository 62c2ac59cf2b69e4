"""The tiny model pair the command-line tests drive: a random target with a Gemma-style chat
template (the assistant turn rendered as "model", content trimmed, as Gemma's templates do)
and its drafter in a drafter/ folder inside it, where `load()` finds it by default."""

import json
import shutil
from pathlib import Path

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
# Hidden size 64: divisible by MLX's smallest quantization group (32), for the convert tests.
TARGET = dict(geometry="dense", hidden_size=64)


def make_pair(checkpoints, root: Path, *, centroids: bool = False, **options) -> Path:
    """Copy the session's tiny target and assistant into ``root/model`` (+ ``drafter/``).

    ``options`` override `TARGET`'s checkpoint options (geometry, multimodal, published); the
    assistant is written in the same config style as the target."""
    options = {**TARGET, **options}
    target = checkpoints.target(**options)
    drafter = checkpoints.assistant(target, centroids=centroids, published=options.get("published", False))
    path = Path(root) / "model"
    shutil.copytree(target, path)
    shutil.copytree(drafter, path / "drafter")
    config = path / "tokenizer_config.json"
    tokenizer_config = json.loads(config.read_text())
    tokenizer_config["chat_template"] = GEMMA_TEMPLATE
    config.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return path
