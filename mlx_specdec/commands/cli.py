"""The `mlx-specdec` command: generate, chat, serve, bench, convert, distill.

A thin layer: parse flags (named like mlx-lm's), load, call the Python API, render. Every
failure is one line on stderr ("error: ...") and a non-zero exit: 2 for usage (a bad or
missing flag or argument), 1 for a model or input error; --verbose adds the traceback.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .distill_cli import distill_command
from ..policy import K_MAX


class _App(typer.Typer):
    """Typer whose usage errors are one line too ("error: ... (see --help)"), exit code 2."""

    def __call__(self, *args, **kwargs):
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            _err("aborted")
            sys.exit(130)
        except typer.TyperException as e:  # click's usage errors (typer vendors click)
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `mlx-specdec`: the help, as click shows it
                _err(e.format_message())
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            _err(f"error: {_one_line(e.format_message())}{hint}")
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


app = _App(
    name="mlx-specdec",
    help="Speculative decoding of Gemma 4 with its MTP assistant drafter, in MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"mlx-specdec {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Speculative decoding of Gemma 4 with its MTP assistant drafter, in MLX."""


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_QUIET_STDERR: list = [None]  # where a rank other than 0 writes instead of stdout and stderr


def _fail(line: str) -> None:
    """An error line: it reaches the terminal from every rank of a group, naming the rank."""
    from .. import distributed

    if sys.stderr is _QUIET_STDERR[0]:
        print(f"rank {distributed.world().rank()}: {line}", file=sys.__stderr__, flush=True)
    else:
        _err(line)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextmanager
def _errors(verbose: bool):
    """Turn any failure into one stderr line and exit 1 (130 on Ctrl-C); --verbose adds the traceback."""
    from ..errors import SpecDecError

    try:
        yield
    except (typer.Exit, typer.TyperException):
        raise
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # e.g. `mlx-specdec generate ... | head -1`
        sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - nothing more may reach the closed pipe
        raise typer.Exit(0) from None
    except Exception as e:  # the top of the program: every failure becomes one line
        if verbose:
            traceback.print_exc()
        if isinstance(e, SpecDecError):
            message = str(e)
        else:
            message = f"{type(e).__name__}: {e}" + ("" if verbose else " (run with --verbose for the traceback)")
        _fail(f"error: {_one_line(message)}")
        raise typer.Exit(1) from None


# ---------------------------------------------------------------------------------------------
# Shared options

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="Target: a local folder or a hub repo id. Default: the embedded demo model.")]
DrafterOpt = Annotated[Optional[str], typer.Option(
    "--drafter", "--draft-model", help="Drafter folder or hub repo id. Default: the model's own (a drafter/ folder inside it, "
    "a <model>-assistant folder beside it, or the <repo>-assistant hub repo). 'none': plain decoding.")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="Cast floating weights to float32, float16 or bfloat16 (default: float32 on the CPU, "
    "the checkpoint's own on a GPU).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-m", min=1, help="Longest answer, in tokens.")]
TempOpt = Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k likeliest tokens; 0: all.")]
MinPOpt = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens below min-p times the top one.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed of the sampler (reproducible sampling).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of errors.")]
FreshPolicyOpt = Annotated[bool, typer.Option(
    "--fresh-policy", help="Start the draft policy from nothing instead of what earlier runs kept on disk "
    "(and keep what this run learns in its place).")]
SystemOpt = Annotated[Optional[str], typer.Option("--system-prompt", "--system", help="System prompt.")]
TemplateConfigOpt = Annotated[Optional[str], typer.Option(
    "--chat-template-config", help="Extra chat template variables as a JSON object, e.g. "
    "'{\"enable_thinking\": true}' for Gemma 4's thinking mode.")]


def parse_draft_tokens(value: str) -> int | str:
    from ..errors import InputError
    from ..policy import parse_draft_tokens as parse

    try:
        return parse(value)
    except InputError as e:
        raise typer.BadParameter(str(e), param_hint="--draft-tokens") from None


def parse_template_config(value: str | None) -> dict | None:
    """--chat-template-config: a JSON object of extra chat template variables."""
    if value is None:
        return None
    try:
        config = json.loads(value)
    except ValueError as e:
        raise typer.BadParameter(f"not JSON ({e}): expected an object such as '{{\"enable_thinking\": true}}'",
                                 param_hint="--chat-template-config") from None
    if not isinstance(config, dict):
        raise typer.BadParameter(f"expected a JSON object, got {value!r}", param_hint="--chat-template-config")
    return config


# The API's names for the sampling flags, to point a refusal at the flag the user typed.
_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k",
          "min_p": "--min-p", "seed": "--seed", "draft_tokens": "--draft-tokens"}


def check_sampling(**values) -> None:
    """Judge sampling flags by the API's own rules before anything loads: a bad value is a
    usage error (exit 2) found in a moment, not a model error after the weights loaded."""
    from ..api import Settings
    from ..errors import InputError

    try:
        Settings(**values).options()
    except InputError as e:
        raise typer.BadParameter(str(e), param_hint=_FLAGS.get(str(e).split()[0])) from None


def check_dtype(dtype: str | None, flag: str = "--dtype") -> None:
    from ..loading import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"expected one of {', '.join(DTYPES)}, got {dtype!r}", param_hint=flag)


def read_stdin() -> str:
    """The prompt from stdin, which must be UTF-8: one clear line (exit 1) otherwise."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        _err(f"error: stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
             "convert it first, e.g. with iconv")
        raise typer.Exit(1) from None


DraftOpt = Annotated[str, typer.Option(
    "--draft-tokens", "-k", "--num-draft-tokens", help="Draft length per round: auto (the measured policy picks it, 0 included), "
    f"off (plain decoding) or an integer 1..{K_MAX}.")]


def _group():
    """The group of processes when started by `mlx.launch` (the models then shard over it), else
    None; only rank 0 prints."""
    from .. import distributed

    group = distributed.world()
    if not distributed.is_main(group) and _QUIET_STDERR[0] is None:
        _QUIET_STDERR[0] = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        sys.stdout = sys.stderr = _QUIET_STDERR[0]
    return group


def _load(model: str | None, drafter: str | None, dtype: str | None, fresh_policy: bool = False,
          group=None):
    """Load the pair, saying so on stderr, then the BLAS hint if the slow reference BLAS is in use."""
    from rich.console import Console

    from .common import print_blas_hint
    from ..loading import load
    from ..policy import DraftPolicy

    drafter_arg: str | bool | None = False if drafter is not None and drafter.lower() in ("none", "off") else drafter
    where = f", sharded over {group.size()} processes" if group is not None else ""
    with Console(stderr=True).status(f"loading {model or 'the embedded demo model'}{where}"):
        spec = load(model, drafter_arg, dtype=dtype, group=group)
    if fresh_policy:
        spec.policy = DraftPolicy()
    print_blas_hint()
    if "transformers" in sys.modules:  # its tokenizer warns of long prompts; the position limit is ours to judge
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    return spec


# ---------------------------------------------------------------------------------------------
# generate


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt. '-' or none: read it from stdin.",
                                                    show_default=False)] = None,
    prompt_opt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt (as in mlx-lm); "
                                                      "same as the argument.", show_default=False)] = None,
    model: ModelOpt = None,
    drafter: DrafterOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    draft_tokens: DraftOpt = "auto",
    system: SystemOpt = None,
    ignore_chat_template: Annotated[bool, typer.Option(
        "--ignore-chat-template",
        help="Continue the prompt as raw text instead of answering it as a user turn.")] = False,
    chat_template_config: TemplateConfigOpt = None,
    dtype: DtypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, tokens, stats) "
                                          "instead of streaming.")] = False,
    fresh_policy: FreshPolicyOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer one prompt, streamed to stdout; a summary line goes to stderr."""
    k = parse_draft_tokens(draft_tokens)
    check_sampling(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    check_dtype(dtype)
    template_config = parse_template_config(chat_template_config)
    if prompt is not None and prompt_opt is not None:
        raise typer.BadParameter("give it once: as an argument or with --prompt", param_hint="PROMPT")
    text = prompt_opt if prompt_opt is not None else prompt
    group = _group()
    main = group is None or group.rank() == 0
    if group is not None and (text is None or text == "-"):
        # mlx.launch passes stdin on to the ranks but never its end: a read would wait forever.
        raise typer.BadParameter("under mlx.launch, pass it as an argument or with --prompt (not on stdin)",
                                 param_hint="PROMPT")
    if main and (text is None or text == "-"):
        if text is None and sys.stdin.isatty():
            raise typer.BadParameter("none given: pass it as an argument, with --prompt, or on stdin",
                                     param_hint="PROMPT")
        text = read_stdin()
    if main and not text.strip():
        raise typer.BadParameter("it is empty", param_hint="PROMPT")
    with _errors(verbose):
        from .. import distributed
        from ..api import stream_generate
        from ..errors import InputError
        from ..prompt import check_text, encode_messages, encode_text, user_turn
        from .common import status_line

        text = distributed.share_text(group, text)  # stdin is rank 0's alone
        check_text(text)
        spec = _load(model, drafter, dtype, fresh_policy, group)
        tok = spec.tokenizer
        if tok is None:
            raise InputError(f"{spec.name} has no tokenizer files (tokenizer.json / tokenizer.model); "
                             "the command line needs one")
        if ignore_chat_template or not tok.has_chat_template:
            ids = encode_text(tok, text)
        else:
            ids = encode_messages(tok, user_turn(text, system), template_config)
        tokens, finish, stats = [], None, None
        for chunk in stream_generate(spec, ids, max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k,
                                     min_p=min_p, seed=seed, draft_tokens=k):
            tokens += chunk.tokens
            finish, stats = chunk.finish_reason, chunk.stats
            if not as_json and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        if as_json:
            out = {"text": tok.decode(tokens), "tokens": tokens, "finish_reason": finish, "prompt_tokens": len(ids),
                   "model": spec.name, "drafter": spec.drafter_name, "stats": stats.as_dict()}
            sys.stdout.write(json.dumps(out) + "\n")
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
            prompt_part = f"prompt {stats.prompt_tokens} tokens in {stats.prefill_seconds * 1000:.0f} ms"
            _err(status_line(stats, k, spec.drafter is not None, prompt_part))


# ---------------------------------------------------------------------------------------------
# chat


@app.command()
def chat(
    model: ModelOpt = None,
    drafter: DrafterOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    draft_tokens: DraftOpt = "auto",
    system: SystemOpt = None,
    chat_template_config: TemplateConfigOpt = None,
    no_cache_reuse: Annotated[bool, typer.Option(
        "--no-cache-reuse", help="Prefill the whole conversation every turn (for comparison).")] = False,
    history: Annotated[Optional[Path], typer.Option(
        "--history", help="Readline history file (default: ~/.cache/mlx-specdec/chat_history).")] = None,
    dtype: DtypeOpt = None,
    fresh_policy: FreshPolicyOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Chat in the terminal: streamed answers, the prompt cache kept across turns, /help for commands."""
    k = parse_draft_tokens(draft_tokens)
    check_sampling(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    check_dtype(dtype)
    template_config = parse_template_config(chat_template_config)
    with _errors(verbose):
        from rich.console import Console

        from . import chat as chat_mod
        from ..api import Settings

        settings = Settings(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                            seed=seed, draft_tokens=k)
        spec = _load(model, drafter, dtype, fresh_policy, _group())
        session = chat_mod.ChatSession(spec, settings, system=system, reuse_cache=not no_cache_reuse,
                                       template_config=template_config)
        path = history or Path.home() / ".cache" / "mlx-specdec" / "chat_history"
        chat_mod.run(session, Console(highlight=False), history=path)


# ---------------------------------------------------------------------------------------------
# serve


@app.command()
def serve(
    model: ModelOpt = None,
    drafter: DrafterOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes it to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8080,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=256,
                                           help="Most requests decoded together in one batch.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Most requests waiting for a row; "
                                           "beyond them the server answers 429 with Retry-After.")] = 64,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="MLX_SPECDEC_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every route but /health.")] = None,
    model_id: Annotated[Optional[str], typer.Option(
        "--served-model-name", help="The model's name in the API (default: --model, or mlx-specdec-demo).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1,
                                            help="Answer length when a request does not give max_tokens.")] = 512,
    dtype: DtypeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve an OpenAI-compatible API (chat and text completions, streaming or not) over one shared batch."""
    if api_key is not None and not api_key.strip():
        raise typer.BadParameter("it is empty", param_hint="--api-key")
    with _errors(verbose):
        import logging

        from ..loading import load
        from ..server import DEMO_MODEL_ID, serve as run_server

        drafter_arg: str | bool | None = (False if drafter is not None and drafter.lower() in ("none", "off")
                                          else drafter)
        group = _group()  # under mlx.launch: every rank loads its shard, rank 0 alone serves HTTP
        where = f", sharded over {group.size()} processes" if group is not None else ""
        _err(f"loading {model or 'the embedded demo model'}{where}")

        def ready(spec) -> None:
            _err(f"serving {name} · drafter {spec.drafter_name or 'none'} · max batch {max_batch} · "
                 f"{'API key required' if api_key else 'no API key'} · http://{host}:{port}/v1")

        name = model_id or model or DEMO_MODEL_ID
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
        run_server(lambda: load(model, drafter_arg, dtype=dtype, group=group), host=host, port=port,
                   max_batch=max_batch, max_queue=max_queue, api_key=api_key, model_id=name,
                   default_max_tokens=max_tokens, log_level="info" if verbose else "warning", on_ready=ready,
                   group=group)


# ---------------------------------------------------------------------------------------------
# bench


TABLE_WIDTH = 140


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{what} must be integers >= 1, got {text!r}")
    return values


@app.command()
def bench(
    model: ModelOpt = None,
    drafter: DrafterOpt = None,
    workloads: Annotated[Optional[str], typer.Option(
        "--workloads", "-w", help="Comma-separated workload names (default: all: code, prose, qa, short).")] = None,
    workload_file: Annotated[Optional[Path], typer.Option(
        "--workload-file", help="A JSON file of workloads in the format of mlx_specdec/commands/bench_workloads.json.")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-b", help="Comma-separated batch sizes.")] = "1,2,4",
    modes: Annotated[str, typer.Option(
        "--modes", help="Draft modes: plain, auto, k values and ranges, e.g. plain,1-6,auto.")] = "plain,1-6,auto",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2,
                                            help="Tokens per answer (a workload may set its own).")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", "-r", min=1,
                                         help="Timed runs per cell (the median is reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs per cell before the timed ones.")] = 1,
    temp: TempOpt = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampler (with --temp > 0).")] = 0,
    stop_at_eos: Annotated[bool, typer.Option(
        "--stop-at-eos", help="End answers at EOS (default: run every answer to --max-tokens, so every mode "
        "times the same tokens).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    markdown_path: Annotated[Optional[Path], typer.Option("--markdown",
                                                          help="Write the table as markdown here.")] = None,
    chart_path: Annotated[Optional[Path], typer.Option(
        "--chart", help="Write a PNG of speedup against k per workload here (needs matplotlib: "
        "pip install 'mlx-specdec[chart]').")] = None,
    dtype: DtypeOpt = None,
    fresh_policy: FreshPolicyOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure tokens/s of plain, fixed-k and auto drafting on built-in workloads and batch sizes."""
    from . import bench as B
    from ..errors import InputError

    sizes = _ints(batch_sizes, "--batch-sizes")
    check_sampling(temperature=temp, seed=seed)
    check_dtype(dtype)
    try:
        chosen = B.load_workloads(workload_file, [w.strip() for w in workloads.split(",")] if workloads else None)
    except InputError as e:
        raise typer.BadParameter(str(e), param_hint="--workload-file" if workload_file else "--workloads") from None
    try:
        draft_modes = tuple(B.parse_modes(modes))
    except InputError as e:
        raise typer.BadParameter(str(e), param_hint="--modes") from None
    settings = B.Settings(batch_sizes=sizes, modes=draft_modes, max_tokens=max_tokens, repeats=repeats, warmup=warmup,
                          temperature=temp, seed=seed, stop_at_eos=stop_at_eos)
    command = ""
    if "bench" in sys.argv:  # as typed (not when called in-process), with a preloaded BLAS to reproduce it
        preload = os.environ.get("LD_PRELOAD")
        command = (f"LD_PRELOAD={preload} " if preload else "") + "mlx-specdec " + " ".join(
            shlex.quote(a) for a in sys.argv[sys.argv.index("bench"):])
    with _errors(verbose):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        from rich.table import Table

        from .common import blas_hint

        if chart_path is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise InputError("--chart needs matplotlib: pip install 'mlx-specdec[chart]'") from None
        # Piped output gets room for the whole table rather than rich's default 80 columns.
        console = Console(highlight=False, width=None if sys.stdout.isatty() else TABLE_WIDTH)
        group = _group()
        err = Console(stderr=True, highlight=False)
        spec = _load(model, drafter, dtype, fresh_policy, group)
        env = B.environment(spec, blas_hint())
        for line in B.environment_lines(env):
            if not line.startswith("warning"):  # _load printed the BLAS hint already
                console.print(line, style="dim", markup=False, soft_wrap=True)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task("bench", total=B.total_runs(chosen, settings))
            cells = B.run(spec, chosen, settings, on_run=lambda label: progress.update(task, advance=1,
                                                                                       description=label))
        result = B.BenchResult(env, vars(settings) | {"modes": [B.mode_name(m) for m in settings.modes]},
                               [vars(w) | {"prompts": list(w.prompts)} for w in chosen], cells, command)
        table = Table(*B.COLUMNS, title="tokens/s by workload, batch size and draft mode", caption=B.FOOTNOTE,
                      caption_justify="left")
        for cell in cells:
            table.add_row(*B.row(cell))
        console.print(table)
        summary = B.auto_summary(cells)
        if summary:
            auto_table = Table(*B.AUTO_COLUMNS, title="auto against the floor and the ceiling",
                               caption=B.AUTO_FOOTNOTE, caption_justify="left")
            for r in summary:
                auto_table.add_row(*r)
            console.print(auto_table)
        warning = B.spread_warning(cells)
        if warning:
            err.print(f"warning: {warning}", style="yellow", markup=False, soft_wrap=True)
        for path, write in ((json_path, lambda p: p.write_text(json.dumps(result.as_dict(), indent=2) + "\n")),
                            (markdown_path, lambda p: p.write_text(B.to_markdown(result))),
                            (chart_path, lambda p: B.chart(result, p))):
            if path is not None and spec.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                write(path)
                console.print(f"wrote {path}", style="dim", soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# convert


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="Target: a local folder or a hub repo id (HF original or mlx-lm "
                                          "conversion).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", "--mlx-path", help="Folder to write.", show_default=False)],
    drafter: DrafterOpt = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="Target weights dtype: float16, bfloat16 or float32 (default: the source's).")] = None,
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize the target (as in mlx-lm: "
                                           "to --q-bits bits in groups of --q-group-size).")] = False,
    q_bits: Annotated[Optional[int], typer.Option(
        "--q-bits", help="Bits per target weight, 4 or 8 (default 4); implies --quantize.")] = None,
    group_size: Annotated[int, typer.Option("--q-group-size", "--group-size",
                                            help="Target quantization group size.")] = 64,
    drafter_dtype: Annotated[Optional[str], typer.Option(
        "--drafter-dtype", help="Drafter weights dtype (default: the target's).")] = None,
    drafter_quantize: Annotated[Optional[int], typer.Option(
        "--drafter-q-bits", "--drafter-quantize",
        help="Quantize the drafter to 4 or 8 bits (default: not quantized).")] = None,
    drafter_group_size: Annotated[int, typer.Option("--drafter-q-group-size", "--drafter-group-size",
                                                    help="Drafter quantization group size.")] = 64,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    probe: Annotated[Optional[str], typer.Option("--probe", help="Prompt used to compare the result with the "
                                                 "source.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write a target and its drafter as one MLX folder (drafter in drafter/), then check it against the source."""
    for name, bits in (("--q-bits", q_bits), ("--drafter-q-bits", drafter_quantize)):
        if bits is not None and bits not in (4, 8):
            raise typer.BadParameter(f"expected 4 or 8, got {bits}", param_hint=name)
    target_bits = (q_bits or 4) if quantize or q_bits is not None else None
    with _errors(verbose):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from . import convert as C
        from .common import print_blas_hint

        console = Console(highlight=False)
        print_blas_hint()  # convert loads both models and runs them to check the result
        drafter_arg = False if drafter is not None and drafter.lower() in ("none", "off") else drafter
        plan = C.Plan(source=source, out=out, drafter=drafter_arg, dtype=dtype, bits=target_bits, group_size=group_size,
                      drafter_dtype=drafter_dtype, drafter_bits=drafter_quantize,
                      drafter_group_size=drafter_group_size, force=force, probe=probe or C.PROBE)
        columns = [TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn()]
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            tasks: dict[str, int] = {}

            def on_progress(step: str, done: float, total: float) -> None:
                if step not in tasks:
                    tasks[step] = progress.add_task(step, total=total)
                progress.update(tasks[step], completed=done, total=total)

            report = C.convert(plan, on_progress)
        for line in C.report_lines(report):
            console.print(line, markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# distill (its flags and rendering live in distill_cli.py)

app.command("distill")(distill_command)


if __name__ == "__main__":
    app()
