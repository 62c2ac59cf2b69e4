"""`mlx-specdec chat`: a multi-turn conversation whose prompt cache outlives its turns.

Reading order: `ChatSession` (the conversation and its cache, no terminal), then the REPL
(`run`), which only reads lines, dispatches slash commands and prints what the session yields.

Cache reuse. The target's cache is addressed by position (see cache.py): the K/V of position p
is valid as long as nothing rewrote p, and entries past a row's length are masked until
overwritten. So a new turn keeps every leading token the cache already holds and runs the
target only over the rest, written at positions starting where the kept prefix ends: after an
answer, that is the end of the answer plus the new user turn. The conversation is tokenized
incrementally (the previous prompt's ids + the answer's own ids + the new text), so the
model's answer keeps the ids it was generated with; when the chat template re-renders history
differently (a changed system prompt, a trimmed answer) the common prefix is shorter and only
the tokens after it are prefilled again. Sliding-window layers keep a ring of recent
positions only, so a rewind further back than the ring still holds starts a fresh cache
(`engine.reusable` decides, for chat and for the engine's prefix store alike).
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator


from . import common
from .. import distributed
from ..api import GenerationChunk, Settings
from ..cache import Cache
from ..decode import Stats, check_prompt, decode, new_cache
from ..engine import reusable
from ..errors import InputError, SpecDecError
from ..loading import SpecModel, check_kv_memory
from ..policy import parse_draft_tokens
from ..prompt import TextStream, answer_text, check_text, encode_rendered, render


@dataclass
class TurnReport:
    """What one turn cost: the conversation the model saw, and how much of it ran this turn."""

    prompt_tokens: int  # the whole conversation up to this answer
    prefill_tokens: int  # of those, run through the target this turn (the rest came from the cache)
    stats: Stats
    interrupted: bool = False
    draft_tokens: int | str = "auto"

    @property
    def reused_tokens(self) -> int:
        return self.prompt_tokens - self.prefill_tokens

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, prefill_tokens=self.prefill_tokens,
                    reused_tokens=self.reused_tokens, interrupted=self.interrupted,
                    draft_tokens=self.draft_tokens, stats=self.stats.as_dict())


@dataclass
class ChatSession:
    """A conversation with a model, its prompt cache kept between turns.

    ``ask(text)`` streams the answer as `GenerationChunk`s; when the generator ends (finished,
    closed early, or interrupted by an exception such as KeyboardInterrupt) the turn is
    committed: the user message and whatever answer was produced join ``messages``, and the
    cache keeps everything it holds validly. ``reuse_cache=False`` prefills the whole
    conversation every turn (for comparison; the output is the same).
    """

    spec: SpecModel
    settings: Settings = field(default_factory=Settings)
    system: str | None = None
    reuse_cache: bool = True
    template_config: dict | None = None  # extra chat template variables (--chat-template-config)
    messages: list[dict] = field(default_factory=list)
    reports: list[TurnReport] = field(default_factory=list)
    # The conversation as the model last saw it: rendered text and ids (prompt + answer).
    _history_text: str = ""
    _history_ids: list[int] = field(default_factory=list)
    # Ids whose K/V the cache holds at positions 0 .. len - 1.
    _cache: Cache | None = None
    _cached: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.spec.tokenizer is None:
            raise InputError(f"chat needs a tokenizer, and {self.spec.name} has no tokenizer files")
        render(self.spec.tokenizer, [{"role": "user", "content": "hi"}],  # fail now if there is no template
               template_config=self.template_config)

    # -- conversation state ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays); the next turn starts a fresh cache."""
        self.messages, self.reports = [], []
        self._history_text, self._history_ids = "", []
        self._cache, self._cached = None, []

    def set_system(self, text: str | None) -> None:
        """Change the system prompt; the next turn re-reads the conversation from where it changes."""
        self.system = text or None

    @property
    def cached_tokens(self) -> int:
        return len(self._cached)

    def conversation(self, user_text: str | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user_text}] if user_text is not None else []
        return head + self.messages + tail

    def encode(self, messages: list[dict]) -> tuple[str, list[int]]:
        """Rendered text and ids of a conversation that ends with a generation prompt.

        When it extends what the model last saw, the old ids (the answer's own among them)
        are kept and only the new text is tokenized."""
        tokenizer = self.spec.tokenizer
        text = render(tokenizer, messages, template_config=self.template_config)
        if self._history_text and text.startswith(self._history_text):
            ids = self._history_ids + encode_rendered(tokenizer, text[len(self._history_text):])
        else:
            ids = encode_rendered(tokenizer, text)
        limit = self.spec.target.config.max_position_embeddings
        if len(ids) >= limit:  # never dropped silently: the user decides what to forget
            raise InputError(f"this turn would make the conversation {len(ids)} tokens, and the model reads at most "
                             f"{limit} positions: /reset starts a new conversation")
        return text, check_prompt(ids, self.spec.target.config.vocab_size, limit)

    @property
    def at_limit(self) -> bool:
        """Has the conversation filled the model's positions (so no further turn fits)?"""
        return len(self._history_ids) >= self.spec.target.config.max_position_embeddings

    def reusable(self, ids: list[int]) -> int:
        """How many leading ids of this prompt the cache can keep (0: start a fresh cache)."""
        if not self.reuse_cache or self._cache is None:
            return 0
        return reusable(self.spec, self._cache, self._cached, ids)

    # -- a turn ------------------------------------------------------------------------------

    def ask(self, text: str) -> Iterator[GenerationChunk]:
        """Stream the answer to ``text``; the turn is committed when the generator ends."""
        if not text.strip():
            raise InputError("empty message")
        check_text(text)
        options = self.settings.options()
        rendered, ids = self.encode(self.conversation(text))
        check_kv_memory(self.spec, [len(ids)], options.max_tokens)
        start = self.reusable(ids)
        if start == 0:
            self._cache = new_cache(self.spec, 1)
        # What the cache holds validly, kept true after every completed pass so that an
        # interruption anywhere leaves it right.
        self._cached = ids[:start]
        stream = TextStream(self.spec.tokenizer)
        answer: list[int] = []
        stats, finish = None, None
        try:
            for update in decode(self.spec, [ids], options, cache=self._cache, cached=start):
                tokens, finish, stats = update.tokens.get(0, []), update.finished.get(0), update.stats[0]
                answer += tokens
                self._cached = (ids + answer)[: update.positions[0]]
                yield GenerationChunk(tokens, stream.add(tokens, bool(finish)), stats, finish)
        except (Exception, KeyboardInterrupt) as e:
            if not isinstance(e, KeyboardInterrupt):
                self._cache, self._cached = None, []  # a failure mid-pass: trust nothing
            raise
        finally:
            self.spec.save_policy()
            if answer or finish:  # an answer cut short still joins the conversation; none cut at once doesn't
                # Stripped, as Gemma's templates trim message content: the next render then
                # starts with this turn's text and the answer keeps its own ids.
                reply = answer_text(self.spec.tokenizer, answer).strip()
                self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
                self._history_text, self._history_ids = rendered + reply, ids + answer
                self.reports.append(TurnReport(len(ids), len(ids) - start, stats, interrupted=finish is None,
                                               draft_tokens=self.settings.draft_tokens))

    def transcript(self) -> dict:
        """The conversation and per-turn stats, as /save writes them."""
        return {
            "model": self.spec.name,
            "drafter": self.spec.drafter_name,
            "system": self.system,
            "settings": vars(self.settings),
            "messages": self.messages,
            "turns": [r.as_dict() for r in self.reports],
        }


# ---------------------------------------------------------------------------------------------
# Status lines


def status_line(report: TurnReport, has_drafter: bool, width: int | None = None) -> str:
    prompt = f"prefill {report.prefill_tokens} of {report.prompt_tokens} tokens ({report.reused_tokens} reused)"
    return common.status_line(report.stats, report.draft_tokens, has_drafter, prompt, width)


# ---------------------------------------------------------------------------------------------
# The REPL

HELP = """\
/help              this list
/reset             forget the conversation (keeps the system prompt)
/system [TEXT]     set the system prompt (no TEXT: show it; /system none clears it)
/draft auto|off|N  draft length: the measured policy, plain decoding, or N tokens per round
/temp X            sampling temperature (0 = greedy)
/max N             longest answer, in tokens
/stats             the last turn's numbers and the session's prefill savings
/save FILE         write the conversation and per-turn stats as JSON
/quit              leave (Ctrl-D works too)
Ctrl-C stops an answer and keeps the conversation."""

PROMPT = ">>> "


class Quit(Exception):
    pass


def command(session: ChatSession, line: str, console) -> None:
    """Run one slash command; raises Quit, or InputError with a one-line message."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    s = session.settings
    if name in ("/quit", "/exit", "/q"):
        raise Quit
    if name in ("/help", "/?"):
        console.print(HELP, markup=False, highlight=False)
    elif name == "/reset":
        session.reset()
        console.print("[dim]conversation cleared[/dim]")
    elif name == "/system":
        if not arg:
            console.print(f"system prompt: {session.system!r}", markup=False, highlight=False)
            return
        session.set_system(None if arg.lower() == "none" else arg)
        console.print(f"[dim]system prompt {'cleared' if session.system is None else 'set'}[/dim]")
    elif name == "/draft":
        if not arg:
            raise InputError(f"usage: /draft auto|off|N (now {s.draft_tokens})")
        s.draft_tokens = parse_draft_tokens(arg)
        if session.spec.drafter is None and s.draft_tokens != 0:
            console.print("[dim]note: this model has no drafter; answers decode plainly[/dim]")
        console.print(f"[dim]draft: {'off' if s.draft_tokens == 0 else s.draft_tokens}[/dim]")
    elif name == "/temp":
        try:
            t = float(arg)
        except ValueError:
            raise InputError(f"usage: /temp X with X >= 0, got {arg!r}") from None
        replace(s, temperature=t).options()  # the API's own checks; nothing changes unless they pass
        s.temperature = t
        console.print(f"[dim]temperature: {t}[/dim]")
    elif name == "/max":
        try:
            n = int(arg)
        except ValueError:
            raise InputError(f"usage: /max N with N >= 1, got {arg!r}") from None
        replace(s, max_tokens=n).options()
        s.max_tokens = n
        console.print(f"[dim]max tokens: {n}[/dim]")
    elif name == "/stats":
        show_stats(session, console)
    elif name == "/save":
        if not arg:
            raise InputError("usage: /save FILE")
        path = Path(arg).expanduser()
        try:
            path.write_text(json.dumps(session.transcript(), indent=2) + "\n")
        except OSError as e:
            raise InputError(f"could not write {path}: {e.strerror or e}") from None
        console.print(f"[dim]saved {len(session.messages)} messages to {path}[/dim]")
    else:
        raise InputError(f"unknown command {name} (try /help)")


def show_stats(session: ChatSession, console) -> None:
    if not session.reports:
        console.print("[dim]no turns yet[/dim]")
        return
    r = session.reports[-1]
    s = r.stats
    rates = ", ".join(f"{a:.2f}" for a in s.acceptance_by_position) or "-"
    hist = ", ".join(f"k={k}: {n}" for k, n in sorted(s.k_histogram.items())) or "-"
    lines = [
        f"last turn: {s.generated_tokens} tokens in {s.rounds} rounds, {s.tokens_per_second:.1f} tok/s"
        + (" (interrupted)" if r.interrupted else ""),
        f"  prefill: {r.prefill_tokens} of {r.prompt_tokens} prompt tokens ran ({r.reused_tokens} reused from the "
        f"cache), {s.prefill_seconds * 1000:.1f} ms",
        f"  drafted {s.drafted}, accepted {s.accepted} ({s.acceptance_rate:.0%}); by position: {rates}",
        f"  rounds by k: {hist}" + (f"; off because: {s.off_reason}" if s.off_reason else "")
        + ("; the policy was kept from earlier runs" if s.policy_kept else ""),
        f"  time: draft {s.draft_seconds * 1000:.1f} ms, verify {s.verify_seconds * 1000:.1f} ms, "
        f"decode total {s.decode_seconds * 1000:.1f} ms",
    ]
    ran = sum(t.prefill_tokens for t in session.reports)
    seen = sum(t.prompt_tokens for t in session.reports)
    lines.append(f"session: {len(session.reports)} turns; prefilled {ran} tokens, "
                 f"{seen} without cache reuse; the cache holds {session.cached_tokens}")
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


class _StopRequest:
    requested = False


@contextmanager
def _stop_requests(group):
    """Over a group, Ctrl-C on rank 0 only asks the answer to stop: every rank must leave the
    loop after the same round (one that left mid-pass would leave the others waiting in an
    all-reduce), so the request is shared after each round. Alone, Ctrl-C interrupts at once."""
    stop = _StopRequest()
    if group is None or group.rank() != 0:
        yield stop
        return

    def ask(signum, frame):
        stop.requested = True

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def answer(session: ChatSession, text: str, console) -> None:
    """Stream one answer; Ctrl-C stops it, a failure prints one line. The session goes on."""
    group = session.spec.group
    turns = len(session.reports)
    stream = session.ask(text)
    interrupted = False
    try:
        with _stop_requests(group) as stop:
            for chunk in stream:
                if chunk.text:
                    console.out(chunk.text, end="", highlight=False)
                if group is not None and distributed.share_flag(group, stop.requested):
                    interrupted = True
                    break
    except KeyboardInterrupt:
        interrupted = True
    except SpecDecError as e:
        console.print(f"\n[red]error:[/red] {e}", highlight=False)
        return
    except Exception as e:  # the REPL must survive a failed turn; say what it was in one line
        console.print(f"\n[red]error:[/red] {type(e).__name__}: {e}", highlight=False)
        return
    finally:
        stream.close()
    console.print()
    if interrupted:
        console.print("[yellow]stopped[/yellow]" + ("" if len(session.reports) > turns else " (no answer kept)"))
    if len(session.reports) > turns:
        width = console.width if console.is_terminal else None  # a pipe takes the whole line
        console.print(status_line(session.reports[-1], session.spec.drafter is not None, width), style="dim",
                      markup=False, highlight=False, soft_wrap=True)
    if session.at_limit:
        console.print(f"[yellow]the conversation has reached the model's limit of "
                      f"{session.spec.target.config.max_position_embeddings} positions: /reset starts a new one[/yellow]",
                      highlight=False)


def _setup_readline(history: Path | None):
    try:
        import readline
    except ImportError:  # not on every platform; input() still works without it
        return None
    if history is not None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            if history.exists():
                readline.read_history_file(history)
        except OSError:
            history = None
    readline.set_history_length(1000)
    return readline, history


def _read_line(group) -> str | None:
    """The user's next line, None at the end of input; over a group rank 0 reads the terminal and
    every rank gets the line (all of them then run the same turn or command)."""
    line = None
    if distributed.is_main(group):
        try:
            line = input(PROMPT)
        except EOFError:
            line = None
    return distributed.share_text(group, line)


def run(session: ChatSession, console, history: Path | None = None) -> None:
    """Read lines until /quit or Ctrl-D; Ctrl-C at the prompt clears the line."""
    rl = _setup_readline(history)
    spec = session.spec
    drafter = spec.drafter_name or "none (plain decoding)"
    console.print(f"[bold]mlx-specdec chat[/bold] · model {spec.name} · drafter {drafter}", highlight=False,
                  soft_wrap=True)
    console.print("[dim]/help for commands · Ctrl-C stops an answer · Ctrl-D or /quit leaves[/dim]")
    if not distributed.is_main(spec.group):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 hears Ctrl-C and tells the others
    try:
        while True:
            try:
                line = _read_line(spec.group)
            except KeyboardInterrupt:
                console.print()
                continue
            except UnicodeDecodeError:  # bytes the terminal's encoding cannot read
                console.print("[red]error:[/red] that line is not valid UTF-8 text; nothing was sent", highlight=False)
                continue
            if line is None:  # end of input
                console.print()
                break
            line = line.strip()
            if not line:
                continue
            try:
                if not line.startswith("/"):
                    answer(session, line, console)
                    continue
                try:
                    command(session, line, console)
                except Quit:
                    break
                except SpecDecError as e:
                    console.print(f"[red]error:[/red] {e}", highlight=False)
            except KeyboardInterrupt:
                # Ctrl-C during a command, or after an answer ended but before the prompt (the
                # turn is committed by then): back to the prompt, as at the prompt itself.
                console.print()
    finally:
        if rl and rl[1] is not None:
            try:
                rl[0].write_history_file(rl[1])
            except OSError:
                pass
    console.print("[dim]bye[/dim]")
