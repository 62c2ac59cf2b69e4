"""`scripts/convert_weights.py` / `mlx-specdec convert`: one MLX folder that `load()` reads,
the shared embedding stored once, checked against the source; clear refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_specdec import ConfigError, DrafterMismatchError, generate, load
from mlx_specdec.commands import convert as C
from tests.cli_model import TARGET, make_pair

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "convert_weights.py"
PROMPT = [2, 14, 30, 9, 22, 40, 17, 5, 61, 33]


@pytest.fixture(scope="module")
def source(checkpoints, tmp_path_factory):
    """A HF-style target with its assistant in drafter/ (found by default)."""
    return make_pair(checkpoints, tmp_path_factory.mktemp("convert"))


def _arrays(folder: Path) -> dict:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(mx.load(str(file)))
    return out


def test_script_writes_one_folder_that_loads_and_decodes_like_the_source(source, tmp_path):
    out = tmp_path / "mlx"
    run = subprocess.run([sys.executable, str(SCRIPT), str(source), "--out", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and "max |logit difference| vs the source 0," in run.stdout
    assert "3/3 greedy drafts the same" in run.stdout

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and config["dtype"] == "float32" and "quantization" not in config
    for name in ("tokenizer.json", "tokenizer_config.json", "drafter/config.json", "drafter/model.safetensors"):
        assert (out / name).exists(), name
    # The embedding table is stored once, with the target; the drafter keeps only its own head.
    target, drafter = _arrays(out), _arrays(out / "drafter")
    table = target["model.embed_tokens.weight"]
    assert not any(a.shape == table.shape for a in drafter.values())
    assert "lm_head.weight" in drafter and all(not k.startswith("model.") for k in drafter)

    converted, original = load(out), load(source)
    assert converted.drafter_name == str(out / "drafter")
    for k in (0, 3):
        assert generate(converted, PROMPT, max_tokens=12, draft_tokens=k).tokens == \
            generate(original, PROMPT, max_tokens=12, draft_tokens=k).tokens


def test_quantized_and_cast_separately_for_target_and_drafter(source, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("replaced with --force")
    steps = []
    report = C.convert(C.Plan(source=source, out=out, dtype="bfloat16", bits=8, group_size=32, drafter_bits=4,
                              drafter_group_size=32, drafter_dtype="float16", force=True),
                       lambda step, done, total: steps.append(step))
    assert not (out / "old.txt").exists() and not list(tmp_path.glob(".q.partial-*"))
    assert {"checking", "writing the target", "writing the drafter", "checking the result"} <= set(steps)
    config = json.loads((out / "config.json").read_text())
    dconfig = json.loads((out / "drafter" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"} and config["dtype"] == "bfloat16"
    assert dconfig["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"} and dconfig["dtype"] == "float16"
    target = _arrays(out)
    assert target["model.embed_tokens.weight"].dtype == mx.uint32 and "model.embed_tokens.scales" in target
    assert target["model.norm.weight"].dtype == mx.bfloat16
    assert report.target_bytes < (out / "model.safetensors").stat().st_size * 1.1
    # Quantization moves the logits a little, and the report says how much.
    assert 0 < report.max_logit_diff < 10 and 0.5 <= report.top1_agreement <= 1
    spec = load(out)
    assert spec.drafter is not None and len(generate(spec, PROMPT, max_tokens=6, draft_tokens=2).tokens) == 6


def test_multimodal_checkpoint_becomes_a_text_folder(checkpoints, tmp_path):
    geometry = TARGET["geometry"]
    path = checkpoints.target(geometry, multimodal=True, hidden_size=TARGET["hidden_size"])
    out = tmp_path / "text"
    report = C.convert(C.Plan(source=path, out=out, drafter=False))
    assert report.max_logit_diff == 0 and report.drafter_dtype is None
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_text"
    assert not any("vision" in k or "audio" in k or "language_model" in k for k in _arrays(out))
    assert not (out / "drafter").exists()


def _copy(src, dst, **config):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_refusals_say_why(source, tmp_path, monkeypatch):
    def refuses(error, match, **plan):
        with pytest.raises(error, match=match):
            C.convert(C.Plan(**{"source": source, "out": tmp_path / "out", **plan}))
        assert not (tmp_path / "out").exists()

    llama = _copy(source, tmp_path / "llama", model_type="llama")
    refuses(ConfigError, r"is not a Gemma 4 checkpoint: model_type 'llama'", source=llama)
    refuses(ConfigError, "holds a gemma4_assistant drafter, not a target", source=source / "drafter")
    other = _copy(source / "drafter", tmp_path / "wide-drafter", backbone_hidden_size=128)
    refuses(DrafterMismatchError, "drafter expects a target hidden size of 128, target has 64", drafter=other)
    refuses(C.ConvertError, "would overwrite the source", out=source)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(C.ConvertError, match=r"is not empty \(pass --force to replace it\)"):
        C.convert(C.Plan(source=source, out=tmp_path / "used"))
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    refuses(C.ConvertError, "--group-size must be one of 32, 64, 128", bits=4, group_size=16)

    monkeypatch.setattr(C.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    refuses(C.ConvertError, r"not enough disk space in .*: the converted model needs about [\d.]+ KB, 1 KB is free")


def test_size_estimate_matches_what_is_written(source):
    fp32 = C.estimate_bytes(source, "float32", None, 64)
    assert fp32 == sum(a.nbytes for a in _arrays(source).values())
    assert C.estimate_bytes(source, "bfloat16", None, 64) == fp32 // 2
    assert C.source_dtype(source) == "float32"
