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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


from .. import distributed
from ..api import GenerationChunk, _options
from ..cache import Cache
from ..decode import Options, Stats, check_prompt, decode, new_cache
from ..engine import reusable
from ..errors import InputError, SpecDecError
from ..loading import SpecModel
from ..policy import K_MAX



def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """The conversation as text through the tokenizer's chat template."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise InputError("this model's tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of rendered template text (the template writes its own BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


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
class Settings:
    """Generation settings a chat can change between turns (/draft, /temp, /max)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    draft_tokens: int | str = "auto"

    def options(self) -> Options:
        return _options(self.max_tokens, self.temperature, self.top_p, self.top_k, self.min_p, self.seed,
                        self.draft_tokens)


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
        render(self.spec.tokenizer, [{"role": "user", "content": "hi"}])  # fail now if there is no template

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
        text = render(tokenizer, messages)
        if self._history_text and text.startswith(self._history_text):
            ids = self._history_ids + encode_text(tokenizer, text[len(self._history_text):])
        else:
            ids = encode_text(tokenizer, text)
        return text, check_prompt(ids, self.spec.target.config.vocab_size)

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
        options = self.settings.options()
        rendered, ids = self.encode(self.conversation(text))
        start = self.reusable(ids)
        if start == 0:
            self._cache = new_cache(self.spec, 1)
        # What the cache holds validly, kept true after every completed pass so that an
        # interruption anywhere leaves it right.
        self._cached = ids[:start]
        detok = self.spec.tokenizer.detokenizer
        detok.reset()
        answer: list[int] = []
        stats, finish = None, None
        try:
            for update in decode(self.spec, [ids], options, cache=self._cache, cached=start):
                tokens, finish, stats = update.tokens.get(0, []), update.finished.get(0), update.stats[0]
                answer += tokens
                self._cached = (ids + answer)[: update.positions[0]]
                for t in tokens:
                    detok.add_token(t)
                if finish:
                    detok.finalize()
                yield GenerationChunk(tokens, detok.last_segment, stats, finish)
        except (Exception, KeyboardInterrupt) as e:
            if not isinstance(e, KeyboardInterrupt):
                self._cache, self._cached = None, []  # a failure mid-pass: trust nothing
            raise
        finally:
            self.spec.save_policy()
            if answer or finish:  # an answer cut short still joins the conversation; none cut at once doesn't
                # Stripped, as Gemma's templates trim message content: the next render then
                # starts with this turn's text and the answer keeps its own ids.
                reply = self.spec.tokenizer.decode(answer).strip()
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
            "settings": {k: getattr(self.settings, k) for k in
                         ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "draft_tokens")},
            "messages": self.messages,
            "turns": [r.as_dict() for r in self.reports],
        }


# ---------------------------------------------------------------------------------------------
# Status lines


def draft_label(stats: Stats, draft_tokens: int | str, has_drafter: bool) -> str:
    if not has_drafter:
        return "draft off (no drafter)"
    if draft_tokens == 0:
        return "draft off"
    if draft_tokens != "auto":
        return f"draft k={draft_tokens}"
    used = {k: n for k, n in stats.k_histogram.items() if k}
    kept = ", policy kept from earlier runs" if stats.policy_kept else ""
    if not used:
        return f"draft auto: off{' (' + kept[2:] + ')' if kept else ''}"  # /stats says why
    drafting, rounds = sum(used.values()), sum(stats.k_histogram.values())
    if 2 * drafting < rounds:
        return f"draft auto: mostly off (drafted in {drafting} of {rounds} rounds{kept})"
    return f"draft auto: on (mostly k={max(used, key=used.get)}{kept})"


def status_line(report: TurnReport, has_drafter: bool) -> str:
    s = report.stats
    per_round = 1 + s.mean_accepted_per_round if s.rounds else 1.0
    parts = [
        f"{s.generated_tokens} tokens",
        f"{s.tokens_per_second:.1f} tok/s",
        f"acceptance {s.acceptance_rate:.0%}" if s.drafted else "acceptance -",
        f"{per_round:.2f} tokens/round",
        draft_label(s, report.draft_tokens, has_drafter),
        f"prefill {report.prefill_tokens} of {report.prompt_tokens} tokens ({report.reused_tokens} reused)",
    ]
    return " · ".join(parts)


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


def parse_draft(value: str) -> int | str:
    """'auto', 'off' (= 0) or an int 0..K_MAX; raises InputError otherwise."""
    value = value.strip().lower()
    if value == "auto":
        return "auto"
    if value in ("off", "0", "none", "plain"):
        return 0
    try:
        k = int(value)
    except ValueError:
        raise InputError(f"draft length must be auto, off or an integer 1..{K_MAX}, got {value!r}") from None
    if not 0 <= k <= K_MAX:
        raise InputError(f"draft length must be auto, off or an integer 1..{K_MAX}, got {k}")
    return k


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
        s.draft_tokens = parse_draft(arg)
        if session.spec.drafter is None and s.draft_tokens != 0:
            console.print("[dim]note: this model has no drafter; answers decode plainly[/dim]")
        console.print(f"[dim]draft: {'off' if s.draft_tokens == 0 else s.draft_tokens}[/dim]")
    elif name == "/temp":
        try:
            t = float(arg)
        except ValueError:
            raise InputError(f"usage: /temp X with X >= 0, got {arg!r}") from None
        if not t >= 0:
            raise InputError(f"temperature must be >= 0, got {arg}")
        s.temperature = t
        console.print(f"[dim]temperature: {t}[/dim]")
    elif name == "/max":
        try:
            n = int(arg)
        except ValueError:
            raise InputError(f"usage: /max N with N >= 1, got {arg!r}") from None
        if n < 1:
            raise InputError(f"max tokens must be >= 1, got {n}")
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
        console.print(status_line(session.reports[-1], session.spec.drafter is not None), style="dim",
                      markup=False, highlight=False, soft_wrap=True)


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
            if line is None:  # end of input
                console.print()
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                try:
                    command(session, line, console)
                except Quit:
                    break
                except SpecDecError as e:
                    console.print(f"[red]error:[/red] {e}", highlight=False)
                continue
            answer(session, line, console)
    finally:
        if rl and rl[1] is not None:
            try:
                rl[0].write_history_file(rl[1])
            except OSError:
                pass
    console.print("[dim]bye[/dim]")
