"""Local folder or hub repo id -> (target, drafter, tokenizer).

Layouts read: Hugging Face originals (text-only ``Gemma4ForCausalLM`` and the
12B's ``Gemma4UnifiedForCausalLM``, and the multimodal
``Gemma4ForConditionalGeneration`` / ``Gemma4UnifiedForConditionalGeneration``
whose text weights sit under ``model.language_model.*``; vision and audio
towers and the 12B's encoder-free ``embed_vision`` / ``embed_audio`` are
skipped, never materialised), ``gemma4_assistant`` and
``gemma4_unified_assistant`` drafters, and mlx-lm conversions including
quantized ones. The drafter is built around the target's embedding module, so
the two models hold one embedding array.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from mlx.utils import tree_flatten

from .distributed import Footprint, parameter_bytes
from .errors import ConfigError, InputError, LoadError
from .models import assistant, gemma4
from .policy import DraftPolicy, PolicyFileError

# A target's model_type -> its text decoder's (a multimodal config nests it as text_config).
TARGET_TYPES = {
    "gemma4": gemma4.GEMMA4_TEXT,
    gemma4.GEMMA4_TEXT: gemma4.GEMMA4_TEXT,
    "gemma4_unified": gemma4.UNIFIED_TEXT,
    gemma4.UNIFIED_TEXT: gemma4.UNIFIED_TEXT,
}
DRAFTER_TYPES = tuple(assistant.DRAFTER_TYPES)
# Only what loading needs: configs, weights, tokenizer and chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
# Prefixes of multimodal towers, in HF and mlx-lm spellings.
_TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "multi_modal_projector", "vision_embedder")
# Folder names, inside or beside a target, that hold its drafter.
_DRAFTER_SUBDIRS = ("drafter", "assistant")


class DraftModel(Protocol):
    """What the speculative loop asks of a drafter: the MTP assistant (`assistant.Drafter`), or
    a test's stand-in (tests/stand_in.py)."""

    @property
    def sliding_window(self) -> int:
        """How far back it reads the target's sliding-window K/V (0: it reads none)."""

    def masks(self, position: mx.array, kv: dict[str, assistant.TargetKV]):
        """What a draft at ``position`` may read of ``kv``; a round's drafts share it."""

    def __call__(self, tokens: mx.array, hidden: mx.array, position: mx.array,
                 kv: dict[str, assistant.TargetKV], masks=None) -> assistant.Draft:
        """One draft step for each row: the next token's logits and the hidden state to feed back."""


@dataclass
class SpecModel:
    """A loaded target with its optional drafter and tokenizer."""

    target: gemma4.Model
    drafter: DraftModel | None
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
    # (rows, k) of the rounds run on these models in this process: the first of each also
    # traces their compiled layers for its shapes, so the engine does not time it. Copies made
    # with dataclasses.replace share the models, and this set with them.
    shapes_run: set[tuple[int, int]] = field(default_factory=set, repr=False)

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
        pass  # a read-only cache costs the next process a few exploring rounds, never this request


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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except GatedRepoError as e:  # it exists, this user may not read it: an error, not an absence
        raise LoadError(f"could not fetch {what} {name!r} from the hub: {type(e).__name__}: {e}") from e
    except RepositoryNotFoundError as e:
        raise _NoSuchRepo(f"{what} {name!r} is not on the hub: {e}") from e
    except Exception as e:  # the hub client raises many types; all mean "could not fetch"
        raise LoadError(f"could not fetch {what} {name!r} from the hub: {type(e).__name__}: {e}") from e


class _NoSuchRepo(LoadError):
    """The hub answered that the repository does not exist (not: unreachable, or refused)."""


def read_config(path: Path, role: str = "model") -> dict:
    """``path/config.json`` as a dict; ``role`` ("target", "drafter") names it in errors."""
    file = path / "config.json"
    if not file.exists():
        raise LoadError(f"no config.json in {path}")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{role} config {file} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{role} config {file} must be a JSON object, got a JSON {type(cfg).__name__}")
    return cfg


@contextmanager
def _config_file(path: Path, role: str):
    """Config errors say which file (and whose) they are about."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{role} config {path / 'config.json'}: {e}") from None


def _text_config(cfg: dict) -> dict:
    model_type = cfg.get("model_type")
    if model_type not in TARGET_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}: expected one of {', '.join(TARGET_TYPES)} "
            f"(a Gemma 4 target) or one of {', '.join(DRAFTER_TYPES)} (a drafter)"
        )
    if model_type in gemma4.TEXT_TYPES:
        return cfg
    if "text_config" not in cfg:
        raise ConfigError(f"{model_type} config has no text_config")
    text = dict(gemma4.config_dict(cfg, "text_config"))
    text.setdefault("model_type", TARGET_TYPES[model_type])
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    return text


# The safetensors dtypes a dtype cast applies to, with their bytes per element.
_CAST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def read_header(file: Path, role: str = "model") -> dict[str, dict]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets), checked against
    the file: a torn download, an empty file or a Git LFS pointer fails here, naming the file,
    instead of deep inside MLX."""
    def damaged(why: str) -> LoadError:
        return LoadError(f"{role} weights {file} are damaged: {why}")

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if head.startswith(b"versio"):
                raise damaged("it is a Git LFS pointer, not the weights (run git lfs pull, or download it again)")
            if len(head) < 8:
                raise damaged(f"{size} bytes, too short for a safetensors file")
            length = int.from_bytes(head, "little")
            if length > size - 8:
                raise damaged(f"its header claims {length} bytes, the whole file has {size}")
            raw = f.read(length)
    except OSError as e:
        raise LoadError(f"could not read the {role} weights {file}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a table of tensors")
    header.pop("__metadata__", None)
    data = size - 8 - length
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(x, int) and x >= 0 for x in info["shape"] + info["data_offsets"]))
        if not ok:
            raise damaged(f"its header entry for {name!r} is malformed: {info!r}")
        begin, end = info["data_offsets"]
        if not begin <= end <= data:
            raise damaged(f"it is truncated: {name!r} lies at bytes {begin}..{end} of a {data}-byte data section")
    return header


def weight_bytes(path: Path, dtype=None, role: str = "model") -> int:
    """Memory the folder's weights take once loaded (floating ones cast to ``dtype`` when
    given), from the safetensors headers alone; multimodal towers, never loaded, are left out."""
    total = 0
    for file in _weight_files(path):
        for name, info in read_header(file, role).items():
            if any(t in name for t in _TOWERS):
                continue
            begin, end = info["data_offsets"]
            nbytes = end - begin
            if dtype is not None and info["dtype"] in _CAST_DTYPES:
                nbytes = nbytes // _CAST_DTYPES[info["dtype"]] * dtype.size
            total += nbytes
    return total


def available_memory(in_use: int = 0) -> tuple[int, str]:
    """Bytes this process can still fill, and where the number comes from: the memory the
    system reports available (or its total, where it reports no such figure), and MLX's
    device limit when that is lower. ``in_use``: what MLX already holds (the loaded weights),
    taken off every figure but the system's available memory, which has it off already."""
    found: list[tuple[int, str]] = []  # totals, from which in_use is still to come off
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = (int(line.split()[1]) * 1024, "available (MemAvailable in /proc/meminfo)")
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            found.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of physical memory"))
        except (AttributeError, OSError, ValueError):
            pass
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if "max_recommended_working_set_size" in info:  # an Apple GPU: what Metal lets it keep resident
        found.append((int(info["max_recommended_working_set_size"]), "in the GPU's recommended working set"))
    if hasattr(mx, "get_memory_limit"):
        found.append((int(mx.get_memory_limit()), "under MLX's memory limit (mx.set_memory_limit)"))
    # A figure of 0 is one the system did not give; what is left of a real one may be nothing.
    found = [(max(0, n - in_use), where) for n, where in found if n > 0]
    if available is not None and available[0] > 0:
        found.append(available)
    return min(found) if found else (1 << 62, "unknown")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} GB"


def check_memory(folders: list[tuple[Path, str]], dtype) -> None:
    """Refuse, before reading any weights, a load that cannot fit: say what it needs and what there is."""
    sizes = [(role, weight_bytes(path, dtype, role)) for path, role in folders]
    needed = sum(n for _, n in sizes)
    free, where = available_memory()
    if needed > free:
        parts = " + ".join(f"{role} {human_bytes(n)}" for role, n in sizes)
        cast = f" as {str(dtype).removeprefix('mlx.core.')}" if dtype is not None else ""
        raise LoadError(f"the weights do not fit in memory: loading needs {human_bytes(needed)} ({parts}{cast}), "
                        f"and there is {human_bytes(free)} {where}; free memory, or use a quantized "
                        "or smaller model")


def kv_bytes(spec: "SpecModel", rows: int, longest: int) -> int:
    """K/V memory a decode of ``rows`` rows takes when the longest holds ``longest`` tokens
    (prompt and answer, at most the model's positions): each layer that keeps K/V holds a
    ring of the sliding window plus a round's step per row, or full attention's capacity,
    grown in steps of GROW_STEP to the furthest position a round writes."""
    from .cache import GROW_STEP
    from .policy import K_MAX

    target = spec.target
    step = K_MAX + 1
    ring = target.lookback(spec.drafter.sliding_window if spec.drafter is not None else 0) + step
    reach = min(longest, target.config.max_position_embeddings) + step
    full = -(-reach // GROW_STEP) * GROW_STEP
    # K/V come in the activations' dtype: the final norm's, which is never quantized.
    itemsize = target.model.norm.weight.dtype.size
    total = 0
    for layer in target.model.layers:
        attn = layer.self_attn
        if not attn.shares_kv:  # KV-shared layers read their source's
            slots = ring if attn.kind == gemma4.SLIDING else full
            total += 2 * rows * attn.n_kv_heads * slots * attn.head_dim * itemsize
    return total


def check_kv_memory(spec: "SpecModel", prompt_lengths: list[int], max_tokens: int) -> None:
    """Refuse, before any of it runs, a request whose K/V cache cannot fit in the memory the
    loaded model leaves: say what it needs and what there is. Not under a group, where every
    rank must take the same decision and each sees its own memory."""
    if spec.group is not None:
        return
    needed = kv_bytes(spec, len(prompt_lengths), max(prompt_lengths) + max_tokens)
    free, where = available_memory(in_use=mx.get_active_memory())
    if needed > free:
        rows = f"{len(prompt_lengths)} rows, " if len(prompt_lengths) > 1 else ""
        raise InputError(f"this request needs {human_bytes(needed)} of K/V cache ({rows}prompt {max(prompt_lengths)} "
                         f"+ max_tokens {max_tokens} tokens), and there is {human_bytes(max(free, 0))} {where}; "
                         "ask for fewer tokens or free memory")


def _load_weights(path: Path, role: str = "model") -> dict[str, mx.array]:
    files = _weight_files(path)
    if not files:
        raise LoadError(f"no *.safetensors weights in {path}")
    weights = {}
    for file in files:
        read_header(file, role)
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as e:
            raise LoadError(f"could not read the {role} weights {file}: {e}") from None
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


def _apply(model: nn.Module, weights: dict[str, mx.array], where: Path, dtype, role: str = "model",
           shard=None) -> int:
    """Fill ``model`` from lazily loaded ``weights``, cast, shard (``shard(model)``) and evaluate;
    returns the bytes the weights would take unsharded."""
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise LoadError(f"{role} weights in {where} do not fit the config: {str(e).splitlines()[0]}") from e
    weights.clear()  # the model holds the only references: a sharded array's full source can go
    if dtype is not None:
        model.apply(lambda x: x.astype(dtype) if x.dtype in (mx.float16, mx.bfloat16, mx.float32) else x)
    unsharded = parameter_bytes(model)
    try:
        if shard is None:
            mx.eval(model.parameters())
        else:
            shard(model)
            # One array at a time: each full tensor is read, sliced and freed before the next.
            for _, value in tree_flatten(model.parameters()):
                mx.eval(value)
    except (RuntimeError, ValueError, OSError) as e:  # MLX reads lazily: a bad file fails here
        raise LoadError(f"could not read the {role} weights in {where}: {e}") from None
    return unsharded


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
"""The floating dtypes weights can be cast to (load, convert and distill's --dtype)."""


def _dtype(name: str | None):
    """The dtype floating weights are cast to: ``name``'s, or float32 on the CPU, where MLX has
    no fast half-precision matmul (None: keep the checkpoint's)."""
    if name is not None and (not isinstance(name, str) or name not in DTYPES):
        raise LoadError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name is None:
        return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None
    return DTYPES[name]


def load_target(path: Path, dtype: str | None = None, group=None) -> gemma4.Model:
    """The target in ``path``; with ``group`` (an ``mx.distributed`` group) only this rank's shard."""
    return _load_target(path, dtype, group)[0]


def _load_target(path: Path, dtype: str | None, group) -> tuple[gemma4.Model, int]:
    cfg = read_config(path, "target")
    with _config_file(path, "target"):
        if cfg.get("model_type") in DRAFTER_TYPES:
            raise ConfigError(f"{path} holds a {cfg['model_type']} drafter, not a target model")
        # Building the model checks what the config alone cannot (a KV-shared layer's source).
        model = gemma4.Model(gemma4.TextConfig.from_dict(_text_config(cfg)))
    weights = model.sanitize(_text_weights(_load_weights(path, "target")))
    _quantize(model, cfg, weights)
    shard = None if group is None else (lambda m: m.shard(group))
    return model, _apply(model, weights, path, _dtype(dtype), "target", shard)


def load_drafter(path: Path, target: gemma4.Model, dtype: str | None = None, group=None) -> assistant.Drafter:
    """The drafter in ``path``, built around ``target``'s embedding; with ``group`` sharded like
    the target (``target`` must be sharded over the same group)."""
    return _load_drafter(path, target, dtype, group)[0]


def _load_drafter(path: Path, target: gemma4.Model, dtype: str | None, group) -> tuple[assistant.Drafter, int]:
    cfg = read_config(path, "drafter")
    with _config_file(path, "drafter"):
        if cfg.get("model_type") not in DRAFTER_TYPES:
            raise ConfigError(
                f"{path} is not a drafter: model_type {cfg.get('model_type')!r}, "
                f"expected one of {', '.join(DRAFTER_TYPES)}"
            )
        config = assistant.AssistantConfig.from_dict(cfg)
    assistant.check_compatible(config, target.config, target.drafter_sources())
    drafter = assistant.Drafter(config, target.embed_tokens)
    weights = drafter.sanitize(_load_weights(path, "drafter"))
    _quantize(drafter, cfg, weights)
    shard = None if group is None else (lambda d: d.shard(group, target.config, target.drafter_sources()))
    return drafter, _apply(drafter, weights, path, _dtype(dtype), "drafter", shard)


def find_drafter(target_path: Path, name: str) -> Path | None:
    """The target's own drafter, if one sits inside or beside it."""
    for sub in _DRAFTER_SUBDIRS:
        if (target_path / sub / "config.json").exists():
            return target_path / sub
    sibling = Path(str(target_path).rstrip("/") + "-assistant")
    if (sibling / "config.json").exists():
        return sibling
    return None


def locate_drafter(model: str | Path, target_path: Path, drafter: str | Path | bool | None) -> Path | None:
    """Where the drafter is: ``drafter`` itself (a folder or hub repo id), none if False; by
    default (None, or True, which fails when there is none) the target's own (`find_drafter`),
    or for a hub target its ``<repo>-assistant`` repo. Only the hub's answer that no such repo exists means "no drafter"; a network or
    authorization failure is an error, not a silent switch to plain decoding."""
    if drafter is False:
        return None
    if drafter is not None and drafter is not True:
        return resolve(drafter, what="drafter")
    found = find_drafter(target_path, str(model))
    if found is None and not Path(str(model)).expanduser().exists():
        try:
            found = resolve(f"{model}-assistant", what="drafter")
        except _NoSuchRepo:
            found = None  # the target has no published drafter: plain decoding
    if found is None and drafter is True:  # True: the model's own drafter, which must exist
        raise LoadError(f"no drafter found for {model}: looked for {', '.join(_DRAFTER_SUBDIRS)} folders inside "
                        f"it and a {Path(str(model)).name}-assistant folder beside it (or hub repo)")
    return found


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
    sibling folder, or the ``<repo>-assistant`` hub repo); True for the same, but an
    error when there is none; False for none.
    ``dtype`` casts floating weights (e.g. "float32" where the backend is slow in bf16).
    Before reading any weights it checks, from the safetensors headers, that they are whole
    and fit in memory (`available_memory`), and says what they need and what there is.
    ``policy_cache``: the folder where what the draft policy measures is kept per model
    and machine, so a new process need not measure again; False keeps nothing; by
    default $MLX_SPECDEC_CACHE (``off`` for nothing) or ~/.cache/mlx-specdec.
    ``group``: an ``mx.distributed`` group (e.g. ``mx.distributed.init()`` under ``mlx.launch``)
    to shard both models over, each rank reading only its slices; every rank must then run the
    same calls (see distributed.py). A group of one process is the same as None.
    With no ``model``, the embedded demo pair.
    """
    if model is not None and (not isinstance(model, (str, Path)) or not str(model).strip()):
        raise LoadError(f"model must be a folder or a hub repo id (None: the embedded demo model), got {model!r}")
    if not (drafter is None or isinstance(drafter, bool) or (isinstance(drafter, (str, Path)) and str(drafter).strip())):
        raise LoadError(f"drafter must be a folder, a hub repo id, True (the model's own, which must exist), "
                        f"None (the model's own, if any) or False (none), got {drafter!r}")
    cast = _dtype(dtype)
    if group is not None and group.size() == 1:
        group = None
    active_before = mx.get_active_memory()
    if model is None:
        from .demo import demo_path

        model = demo_path()
    path = resolve(model)
    where = locate_drafter(model, path, drafter)
    check_memory([(path, "target")] + ([(where, "drafter")] if where else []), cast)
    target, unsharded = _load_target(path, dtype, group)
    draft_model = None
    if where:
        draft_model, drafter_unsharded = _load_drafter(where, target, dtype, group)
        unsharded += drafter_unsharded
    footprint = Footprint(1 if group is None else group.size(), parameter_bytes(target, draft_model), unsharded,
                          mx.get_active_memory() - active_before)
    eos = list(target.config.eos_token_id) or None
    tokenizer = load_tokenizer(path, eos)
    if tokenizer is not None:
        eos = sorted(set(eos or ()) | set(tokenizer.eos_token_ids or ()))
    cache_dir = policy_cache_dir(policy_cache) if draft_model is not None else None
    processes = footprint.processes
    policy_file = cache_dir / f"{policy_key(path, where, dtype, processes)}.json" if cache_dir else None
    return SpecModel(
        target=target,
        drafter=draft_model,
        tokenizer=tokenizer,
        eos_token_ids=frozenset(eos or ()),
        name=str(model),
        drafter_name=str(where) if where else None,
        policy=load_policy(policy_file),
        policy_file=policy_file,
        group=group,
        footprint=footprint,
    )
