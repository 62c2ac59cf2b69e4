"""The shipped demo pair: `load()` with no arguments gives a target with its drafter and
tokenizer, drafting leaves greedy output unchanged, transformers reads the same checkpoints
and computes the same logits and drafts, and the files stay within the size budget."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_specdec import generate, generate_batch, load
from mlx_specdec.demo import DEMO_DIR
from tests.helpers import first_drafts

SIZE_BUDGET = 40 * 2**20
# Held-out module style (textwrap is never trained on).
CODE = 'def dedent(text):\n    """Remove any common leading whitespace from every line in `text`.\n    """\n'
QUESTION = "What does textwrap.dedent do?"


@pytest.fixture(scope="module")
def demo():
    return load()


def test_the_files_are_half_precision_and_within_budget():
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    names = {str(p.relative_to(DEMO_DIR)) for p in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "drafter/config.json", "drafter/model.safetensors"} <= names
    assert sum(p.stat().st_size for p in files) <= SIZE_BUDGET
    for name in ("model.safetensors", "drafter/model.safetensors"):
        assert {v.dtype for v in mx.load(str(DEMO_DIR / name)).values()} == {mx.float16}
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["model_type"] == "gemma4_text"
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert json.loads((DEMO_DIR / "drafter" / "config.json").read_text())["model_type"] == "gemma4_assistant"


def test_load_without_arguments_gives_the_pair(demo):
    assert demo.drafter is not None and demo.tokenizer is not None
    assert demo.drafter.input_embedding is demo.target.embed_tokens  # one shared table
    assert {1, 5} <= demo.eos_token_ids  # <eos> and the end-of-turn marker
    if mx.default_device().type == mx.DeviceType.cpu:
        assert demo.target.embed_tokens.weight.dtype == mx.float32


def test_drafting_is_greedy_identical_and_accepts(demo):
    plain = generate(demo, CODE, max_tokens=32, draft_tokens=0)
    assert plain.text and len(plain.tokens) == 32
    for k in (1, 3, 4):
        out = generate(demo, CODE, max_tokens=32, draft_tokens=k)
        assert out.tokens == plain.tokens
    # A trained drafter: most of its first drafts are the target's own next token.
    assert generate(demo, CODE, max_tokens=32, draft_tokens=1).stats.acceptance_rate >= 0.5
    batch = generate_batch(demo, [CODE, "import os\n"], max_tokens=16, draft_tokens=2)
    assert batch[0].tokens == plain.tokens[:16]


def test_chat_template_and_end_of_turn(demo):
    ids = demo.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    assert demo.tokenizer.decode(ids) == f"<bos><|turn>user\n{QUESTION}<turn|>\n<|turn>model\n"
    plain = generate(demo, ids, max_tokens=48, draft_tokens=0)
    assert generate(demo, ids, max_tokens=48, draft_tokens=3).tokens == plain.tokens
    assert plain.text.strip()


def test_transformers_reads_the_pair_and_agrees(demo):
    """The target's logits and the drafter's first round match transformers' Gemma 4 and
    Gemma4Assistant on the shipped files (both upcast the half weights to fp32)."""
    from transformers import AutoTokenizer

    from tests import oracle

    ids = demo.tokenizer.encode(CODE)
    assert AutoTokenizer.from_pretrained(DEMO_DIR).encode(CODE) == ids
    ref = oracle.reference_forward(DEMO_DIR, ids)
    cache = demo.target.make_cache(1, max_step=len(ids))
    from mlx_specdec.cache import Step

    ours = demo.target.logits(demo.target(mx.array([ids]), Step((0,), len(ids)), cache))[0]
    np.testing.assert_allclose(np.array(ours), ref["logits"], rtol=1e-3, atol=1e-3)
    draft = oracle.reference_draft(DEMO_DIR, DEMO_DIR / "drafter", ids, 3)
    mine = first_drafts(demo, ids, 3)
    assert [int(d.greedy_tokens().item()) for d in mine] == draft["tokens"]
    np.testing.assert_allclose(np.stack([np.array(d.logits[0]) for d in mine]), draft["logits"], rtol=1e-3, atol=1e-3)
