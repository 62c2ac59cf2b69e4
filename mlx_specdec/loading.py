"""Local folder or hub repo id -> (target, drafter, tokenizer).

Layouts read: Hugging Face originals (text-only ``Gemma4ForCausalLM``, and the
multimodal ``Gemma4ForConditionalGeneration`` whose text weights sit under
``model.language_model.*``; vision and audio towers are skipped, never
materialised), ``gemma4_assistant`` drafters, and mlx-lm conversions including
quantized ones. The drafter is built around the target's embedding module, so
the two models hold one embedding array.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx.utils import tree_flatten

from .distributed import Footprint, parameter_bytes
from .errors import ConfigError, LoadError
from .models import assistant, gemma4
from .policy import DraftPolicy, PolicyFileError

TARGET_TYPES = ("gemma4", "gemma4_text")
DRAFTER_TYPE = "gemma4_assistant"
# Only what loading needs: configs, weights, tokenizer and chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
# Prefixes of multimodal towers, in HF and mlx-lm spellings.
_TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "multi_modal_projector", "vision_embedder")
# Folder names, inside or beside a target, that hold its drafter.
_DRAFTER_SUBDIRS = ("drafter", "assistant")


@dataclass
class SpecModel:
    """A loaded target with its optional drafter and tokenizer."""

    target: gemma4.Model
    drafter: assistant.Drafter | None
    tokenizer: object | None  # mlx_lm TokenizerWrapper
    eos_token_ids: frozenset[int] = frozenset()
    name: str = "model"
    drafter_name: str | None = None
    # What the draft policy measured (costs per batch size, acceptance); it
    # outlives requests, so later ones start informed.
    policy: DraftPolicy = field(default_factory=DraftPolicy, repr=False)
    # Where the policy is kept between processes (None: not kept).
    policy_file: Path | None = None
    # The mx.distributed group the models are sharded over (None: one process holds them whole).
    group: mx.distributed.Group | None = None
    footprint: Footprint | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process talks to the user and keeps what is learned (rank 0, or alone)."""
        return self.group is None or self.group.rank() == 0

    def save_policy(self) -> None:
        """Keep what the policy learned for the next process on this machine."""
        if self.policy_file is not None and self.is_main:
            _write_policy(self.policy_file, self.policy)


def policy_cache_dir(setting: str | Path | bool | None) -> Path | None:
    """The folder policies are kept in: ``setting`` if a path, none if False; by default
    $MLX_SPECDEC_CACHE (``off`` for none) or ~/.cache/mlx-specdec, under ``policy/``."""
    if setting is False:
        return None
    if setting is None or setting is True:
        setting = os.environ.get("MLX_SPECDEC_CACHE") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-specdec"
        if str(setting).lower() in ("off", "0", "none"):
            return None
    return Path(setting).expanduser() / "policy"


def policy_key(target_path: Path, drafter_path: Path | None, dtype: str | None, processes: int = 1) -> str:
    """Names one model pair on one machine: the measured costs hold for nothing else.

    The weight files' sizes and dates stand for their contents (a re-conversion in place is
    another model); the BLAS preloaded on Linux changes CPU costs many times over."""
    def weights(folder: Path) -> list:
        files = sorted(folder.glob("*.safetensors"))
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]

    identity = {
        "target": [str(target_path.resolve()), weights(target_path)],
        "drafter": [str(drafter_path.resolve()), weights(drafter_path)] if drafter_path else None,
        "dtype": dtype,
        "machine": [platform.node(), platform.machine(), platform.system(), str(mx.default_device())],
        "mlx": mx.__version__,
        "blas": os.environ.get("LD_PRELOAD", ""),
        **({"processes": processes} if processes > 1 else {}),  # sharded costs are another model's
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def load_policy(path: Path | None) -> DraftPolicy:
    """The policy kept at ``path``, or a fresh one when there is none.

    The file is checked fully (DraftPolicy.from_json): one that is not exactly what this version
    writes (another version, a torn write, edited by hand) is not used. It is replaced by a fresh
    policy at once, with a one-line warning naming it, so the warning comes once."""
    if path is None or not path.is_file():
        return DraftPolicy()
    try:
        return DraftPolicy.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, PolicyFileError) as e:
        reason = " ".join(str(e).split())
        print(f"warning: ignoring the kept draft policy {path} ({reason}); measuring afresh", file=sys.stderr)
    policy = DraftPolicy()
    _write_policy(path, policy)
    return policy


def _write_policy(path: Path, policy: DraftPolicy) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(policy.to_json())
        partial.replace(path)
    except OSError:
        pass  # a read-only cache costs the next process a calibration, never this request


def resolve(path_or_repo: str | Path, *, what: str = "model") -> Path:
    """A local folder as is; anything else is fetched from the hub (only the files needed)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists():
        raise LoadError(f"{what} path {name} is a file, expected a folder with config.json")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LoadError(f"{what} {name!r} is neither a local folder nor a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "could not fetch"
        raise LoadError(f"could not fetch {what} {name!r} from the hub: {type(e).__name__}: {e}") from e


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise LoadError(f"no config.json in {path}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e


def _text_config(cfg: dict) -> dict:
    model_type = cfg.get("model_type")
    if model_type not in TARGET_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}: expected one of {', '.join(TARGET_TYPES)} "
            f"(a Gemma 4 target) or {DRAFTER_TYPE!r} (a drafter)"
        )
    if model_type == "gemma4":
        if "text_config" not in cfg:
            raise ConfigError("gemma4 config has no text_config")
        text = dict(cfg["text_config"])
        text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
        return text
    return cfg


def _load_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise LoadError(f"no *.safetensors weights in {path}")
    weights = {}
    for file in files:
        weights.update(mx.load(file))
    return weights


def _text_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Strip multimodal prefixes and drop the towers (their arrays are lazy
    and, dropped here, are never read from disk)."""
    out = {}
    for key, value in weights.items():
        for prefix, repl in (
            ("model.language_model.", "model."),
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("model.lm_head.", "lm_head."),
        ):
            if key.startswith(prefix):
                key = repl + key[len(prefix) :]
                break
        if any(key.startswith(t) or key.startswith("model." + t) for t in _TOWERS):
            continue
        out[key] = value
    return out


def _quantize(model: nn.Module, cfg: dict, weights: dict[str, mx.array]) -> None:
    """Quantize the layers a (mlx-lm converted) checkpoint stores quantized."""
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    if not quant:
        return

    def predicate(path, module):
        if f"{path}.scales" not in weights:
            return False
        override = quant.get(path)
        if isinstance(override, dict):
            return override
        return hasattr(module, "to_quantized")

    nn.quantize(
        model,
        group_size=quant.get("group_size", 64),
        bits=quant.get("bits", 4),
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )


def _apply(model: nn.Module, weights: dict[str, mx.array], where: Path, dtype, shard=None) -> int:
    """Fill ``model`` from lazily loaded ``weights``, cast, shard (``shard(model)``) and evaluate;
    returns the bytes the weights would take unsharded."""
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise LoadError(f"weights in {where} do not fit the config: {str(e).splitlines()[0]}") from e
    weights.clear()  # the model holds the only references: a sharded array's full source can go
    if dtype is None and mx.default_device().type == mx.DeviceType.cpu:
        # MLX's CPU backend has no fast half-precision matmul: compute in fp32 there.
        dtype = mx.float32
    if dtype is not None:
        model.apply(lambda x: x.astype(dtype) if x.dtype in (mx.float16, mx.bfloat16, mx.float32) else x)
    unsharded = parameter_bytes(model)
    if shard is None:
        mx.eval(model.parameters())
        return unsharded
    shard(model)
    # One array at a time: each full tensor is read, sliced and freed before the next.
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)
    return unsharded


def _dtype(name: str | None):
    if name is None:
        return None
    table = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
    if name not in table:
        raise LoadError(f"unknown dtype {name!r}: expected one of {', '.join(table)}")
    return table[name]


def load_target(path: Path, dtype: str | None = None, group=None) -> gemma4.Model:
    """The target in ``path``; with ``group`` (an ``mx.distributed`` group) only this rank's shard."""
    return _load_target(path, dtype, group)[0]


def _load_target(path: Path, dtype: str | None, group) -> tuple[gemma4.Model, int]:
    cfg = read_config(path)
    if cfg.get("model_type") == DRAFTER_TYPE:
        raise ConfigError(f"{path} holds a gemma4_assistant drafter, not a target model")
    config = gemma4.TextConfig.from_dict(_text_config(cfg))
    model = gemma4.Model(config)
    weights = model.sanitize(_text_weights(_load_weights(path)))
    _quantize(model, cfg, weights)
    shard = None if group is None else (lambda m: m.shard(group))
    return model, _apply(model, weights, path, _dtype(dtype), shard)


def load_drafter(path: Path, target: gemma4.Model, dtype: str | None = None, group=None) -> assistant.Drafter:
    """The drafter in ``path``, built around ``target``'s embedding; with ``group`` sharded like
    the target (``target`` must be sharded over the same group)."""
    return _load_drafter(path, target, dtype, group)[0]


def _load_drafter(path: Path, target: gemma4.Model, dtype: str | None, group) -> tuple[assistant.Drafter, int]:
    cfg = read_config(path)
    if cfg.get("model_type") != DRAFTER_TYPE:
        raise ConfigError(
            f"{path} is not a drafter: model_type {cfg.get('model_type')!r}, expected {DRAFTER_TYPE!r}"
        )
    config = assistant.AssistantConfig.from_dict(cfg)
    assistant.check_compatible(config, target.config, target.drafter_sources())
    drafter = assistant.Drafter(config, target.embed_tokens)
    weights = drafter.sanitize(_load_weights(path))
    _quantize(drafter, cfg, weights)
    shard = None if group is None else (lambda d: d.shard(group, target.config, target.drafter_sources()))
    return drafter, _apply(drafter, weights, path, _dtype(dtype), shard)


def find_drafter(target_path: Path, name: str) -> Path | None:
    """The target's own drafter, if one sits inside or beside it."""
    for sub in _DRAFTER_SUBDIRS:
        if (target_path / sub / "config.json").exists():
            return target_path / sub
    sibling = Path(str(target_path).rstrip("/") + "-assistant")
    if (sibling / "config.json").exists():
        return sibling
    return None


def load_tokenizer(path: Path, eos_token_ids=None):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from mlx_lm.tokenizer_utils import load as load_tok

    try:
        return load_tok(path, eos_token_ids=eos_token_ids)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise LoadError(f"could not load the tokenizer in {path}: {type(e).__name__}: {e}") from e


def load(
    model: str | Path | None = None,
    drafter: str | Path | bool | None = None,
    *,
    dtype: str | None = None,
    policy_cache: str | Path | bool | None = None,
    group: mx.distributed.Group | None = None,
) -> SpecModel:
    """Load a Gemma 4 target and its drafter.

    ``drafter``: a folder or repo id; None to use the target's own drafter when
    one is found (a ``drafter/`` or ``assistant/`` subfolder, a ``<model>-assistant``
    sibling folder, or the ``<repo>-assistant`` hub repo); False for none.
    ``dtype`` casts floating weights (e.g. "float32" where the backend is slow in bf16).
    ``policy_cache``: the folder where what the draft policy measures is kept per model
    and machine, so a new process need not calibrate again; False keeps nothing; by
    default $MLX_SPECDEC_CACHE (``off`` for nothing) or ~/.cache/mlx-specdec.
    ``group``: an ``mx.distributed`` group (e.g. ``mx.distributed.init()`` under ``mlx.launch``)
    to shard both models over, each rank reading only its slices; every rank must then run the
    same calls (see distributed.py). A group of one process is the same as None.
    With no ``model``, the embedded demo pair.
    """
    if group is not None and group.size() == 1:
        group = None
    active_before = mx.get_active_memory()
    if model is None:
        from .demo import demo_path

        model = demo_path()
    path = resolve(model)
    target, unsharded = _load_target(path, dtype, group)
    drafter_path = None
    if drafter is None:
        drafter_path = find_drafter(path, str(model))
        if drafter_path is None and not Path(str(model)).expanduser().exists():
            try:
                drafter_path = resolve(f"{model}-assistant", what="drafter")
            except LoadError:
                drafter_path = None  # the target has no published drafter: plain decoding
    elif drafter is not False:
        drafter_path = resolve(drafter, what="drafter")
    draft_model = None
    if drafter_path:
        draft_model, drafter_unsharded = _load_drafter(drafter_path, target, dtype, group)
        unsharded += drafter_unsharded
    footprint = Footprint(1 if group is None else group.size(), parameter_bytes(target, draft_model), unsharded,
                          mx.get_active_memory() - active_before)
    eos = list(target.config.eos_token_id) or None
    tokenizer = load_tokenizer(path, eos)
    if tokenizer is not None:
        eos = sorted(set(eos or ()) | set(tokenizer.eos_token_ids or ()))
    cache_dir = policy_cache_dir(policy_cache) if draft_model is not None else None
    processes = footprint.processes
    policy_file = cache_dir / f"{policy_key(path, drafter_path, dtype, processes)}.json" if cache_dir else None
    return SpecModel(
        target=target,
        drafter=draft_model,
        tokenizer=tokenizer,
        eos_token_ids=frozenset(eos or ()),
        name=str(model),
        drafter_name=str(drafter_path) if drafter_path else None,
        policy=load_policy(policy_file),
        policy_file=policy_file,
        group=group,
        footprint=footprint,
    )
