"""`mlx-specdec serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Two threads. Uvicorn's event loop parses requests, renders chat templates (on worker threads),
detokenizes, cuts stop strings and writes responses; it never touches MLX. One engine thread
(`EngineThread`) loads and owns the model: it runs `Engine.step()` while there is work and
hands each step's events to the loop with ``call_soon_threadsafe``, into one asyncio queue per
request. So concurrent requests share speculative rounds, and a slow client never holds up
the batch.

Bad input is a 4xx with an OpenAI-style ``{"error": {...}}`` body before the engine sees the
request. Past the number of requests the server holds (``max_batch`` decoding plus
``max_queue`` waiting) a request gets 429 with Retry-After; within it, the engine admits rows
up to the K/V memory they could need and keeps the rest waiting. A request whose client goes
away (or whose text hit a stop string) is cancelled in the engine, which drops its row by the
next round.

Under mlx.launch (`serve(..., group=)`) every rank loads its shard; rank 0 runs all of the
above and shares each step's new requests and cancellations with the other ranks, which run
the same engine steps with no HTTP (`follow`); see `EngineThread`.

Reading order: `Parser` (bodies -> `Job`), `TextStream`, `EngineThread`, `Server.pieces` (one
request's life), then the routes in `make_app`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import mlx.core as mx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import distributed
from .decode import Options, Stats
from .errors import InputError, SpecDecError
from .loading import SpecModel
from .policy import K_MAX
from .sampling import SamplingParams

log = logging.getLogger("mlx_specdec.server")

# The most stop strings one request may give (OpenAI allows 4).
MAX_STOPS = 16
MAX_BODY_BYTES = 16 * 1024 * 1024
# Tokens/s in /metrics: generated tokens over this trailing window.
RATE_WINDOW_S = 10.0
DEMO_MODEL_ID = "mlx-specdec-demo"


# ---------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error the client gets as an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------
# Requests: OpenAI bodies -> prompt ids and engine options


@dataclass
class Job:
    """One request, parsed: what the engine needs, and what the response needs."""

    kind: str  # "chat" or "completion"
    prompt: list[int]
    options: Options
    stream: bool
    stops: list[str]
    include_usage: bool
    model: str


def _number(body: dict, name: str, default, *, integer: bool = False, low=None, high=None, nullable=True):
    value = body.get(name, default)
    if value is None and nullable:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _bad(f"{name} must be {span}, got {value}", name)
    return value


def _draft_tokens(body: dict) -> int | str:
    value = body.get("draft_tokens", "auto")
    if value is None or value == "auto":
        return "auto"
    if value == "off":
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= K_MAX:
        return value
    raise _bad(f"draft_tokens must be \"auto\", \"off\" or an integer 0..{K_MAX}, got {json.dumps(value)}",
               "draft_tokens")


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad("stop must be a string or a list of strings", "stop")
    if len(value) > MAX_STOPS:
        raise _bad(f"stop takes at most {MAX_STOPS} strings, got {len(value)}", "stop")
    if any(not s for s in value):
        raise _bad("stop strings must not be empty", "stop")
    return value


def _message_text(message: Any, i: int) -> dict:
    """One chat message as the template wants it: role and plain-text content."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object with role and content", "messages")
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant"):
        raise _bad(f"{where}.role must be system, developer, user or assistant, got {json.dumps(role)}", "messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones can be served by a text model
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                           "supported", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    elif content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise _bad(f"{where}.content must be a string or a list of text parts", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


class Parser:
    """Turns request bodies into `Job`s for one served model (tokenizing on a worker thread)."""

    def __init__(self, spec: SpecModel, model_id: str, default_max_tokens: int):
        self.spec, self.model_id, self.default_max_tokens = spec, model_id, default_max_tokens
        self.context = spec.target.config.extra.get("max_position_embeddings") or None
        self.vocab = spec.target.config.vocab_size

    def model_names(self) -> set[str]:
        return {self.model_id, self.spec.name}

    def common(self, body: Any, kind: str) -> dict:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = body.get("model", self.model_id)
        if not isinstance(model, str):
            raise _bad(f"model must be a string, got {json.dumps(model)}", "model")
        if model not in self.model_names():
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        if _number(body, "n", 1, integer=True, low=1) != 1:
            raise _bad("n must be 1: this server returns one choice per request", "n")
        if body.get("logprobs") not in (None, False, 0) or body.get("echo"):
            raise _bad("logprobs and echo are not supported", "logprobs")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad(f"stream must be a boolean, got {json.dumps(stream)}", "stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _bad("stream_options must be an object", "stream_options")
        names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
        max_tokens = None
        for name in names:
            max_tokens = max_tokens or _number(body, name, None, integer=True, low=1)
        sampling = dict(
            temperature=_number(body, "temperature", 0.0, low=0.0),
            top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0),
            top_k=_number(body, "top_k", 0, integer=True, low=0),
            min_p=_number(body, "min_p", 0.0, low=0.0, high=1.0),
            seed=_number(body, "seed", None, integer=True),
        )
        return dict(model=model, stream=stream, include_usage=bool(stream_options.get("include_usage")),
                    max_tokens=max_tokens, sampling=sampling, stops=_stops(body), draft_tokens=_draft_tokens(body))

    def chat_prompt(self, body: dict) -> list[int]:
        from .commands.chat import render

        messages = body.get("messages")
        if not isinstance(messages, list):
            raise _bad("messages must be a list of {role, content} objects", "messages")
        if not messages:
            raise _bad("messages is empty: give at least one message", "messages")
        messages = [_message_text(m, i) for i, m in enumerate(messages)]
        tok = self.spec.tokenizer
        if tok is None or not tok.has_chat_template:
            raise _bad("this model has no chat template: use /v1/completions", "messages")
        try:
            # The template writes its own BOS, so the text is encoded without adding it again.
            return list(tok.encode(render(tok, messages), add_special_tokens=False))
        except InputError as e:
            raise _bad(str(e), "messages") from None
        except Exception as e:  # the template's own raise_exception (e.g. roles out of order)
            raise _bad(f"the chat template refused these messages: {e}", "messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("prompt is empty", "prompt")
            if self.spec.tokenizer is None:
                raise _bad("this model has no tokenizer: pass the prompt as a list of token ids", "prompt")
            return list(self.spec.tokenizer.encode(prompt))
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise _bad("prompt is empty", "prompt")
            bad = [t for t in prompt if not 0 <= t < self.vocab]
            if bad:
                raise _bad(f"prompt has token ids outside the vocabulary 0..{self.vocab - 1}: {bad[:5]}", "prompt")
            return prompt
        if isinstance(prompt, list):
            raise _bad("prompt must be one string or one list of token ids (batches of prompts are not "
                       "supported: send one request each)", "prompt")
        raise _bad(f"prompt must be a string or a list of token ids, got {json.dumps(prompt)[:60]}", "prompt")

    def parse(self, body: Any, kind: str) -> Job:
        """The whole request; raises APIError. Runs on a worker thread (template and tokenizer)."""
        common = self.common(body, kind)
        prompt = self.chat_prompt(body) if kind == "chat" else self.completion_prompt(body)
        max_tokens = common["max_tokens"]
        if self.context is not None:
            room = self.context - len(prompt)
            asked = max_tokens or 1
            if asked > room:
                raise _bad(f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{len(prompt)} and max_tokens asks for {asked} more", "messages" if kind == "chat"
                           else "prompt", code="context_length_exceeded")
            max_tokens = max_tokens or min(self.default_max_tokens, room)
        try:
            options = Options(max_tokens=max_tokens or self.default_max_tokens,
                              sampling=SamplingParams(**common["sampling"]), draft_tokens=common["draft_tokens"])
        except ValueError as e:  # InputError included
            raise _bad(str(e)) from None
        return Job(kind, prompt, options, common["stream"], common["stops"], common["include_usage"],
                   common["model"])


# ---------------------------------------------------------------------------------------------
# Text: detokenizing one request and cutting it at the first stop string


class TextStream:
    """Incremental text of one request. Text that could be the start of a stop string is held
    back until the next tokens say whether it is; once a stop string appears, the text ends
    right before it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detokenizer = tokenizer.detokenizer  # a fresh copy per call
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def add(self, tokens: list[int], final: bool) -> str:
        for t in tokens:
            self.detokenizer.add_token(t)
        if final:
            self.detokenizer.finalize()
        text = self.pending + self.detokenizer.last_segment
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        if final or not self.stops:
            self.pending = ""
            return text
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - keep:]
        return text[: len(text) - keep]


# ---------------------------------------------------------------------------------------------
# The engine thread


@dataclass
class Piece:
    """What a request's consumer gets: new text, and at the end why it finished."""

    text: str
    tokens: int  # generated so far
    finish_reason: str | None
    stats: Stats | None


IDLE_TICK_S = 0.05
"""While no request is live, rank 0 shares news at least this often and the other ranks sleep
this long before each wait for it. A rank waiting in a collective spins (MLX's ring backend
polls), so the others must not wait there for a request that may come in an hour; a new
request waits at most one tick for the others to join it, a small part of its prefill."""


@dataclass(eq=False)
class Ticket:
    """One request handed to the engine thread: what to submit, where its events go, and its
    engine id once the engine thread submitted it."""

    prompt: list[int]
    options: Options
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    rid: int | None = None
    cancelled: bool = False


@dataclass
class News:
    """What changed since the last step, applied on every rank before the step: requests to
    submit (in order, so that every rank's engine numbers them alike), engine ids to cancel,
    and whether the server stops. Over a group rank 0 shares it, as JSON, once per step."""

    submit: list[tuple[list[int], Options]] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)
    stop: bool = False

    def encode(self) -> str:
        if not (self.submit or self.cancel or self.stop):
            return ""  # the usual case, every step: one integer crosses, no text
        return json.dumps({"submit": [[prompt, {"max_tokens": o.max_tokens, "sampling": vars(o.sampling),
                                                "draft_tokens": o.draft_tokens}] for prompt, o in self.submit],
                           "cancel": self.cancel, "stop": self.stop})

    @staticmethod
    def decode(text: str) -> "News":
        if not text:
            return News()
        data = json.loads(text)
        submit = [(prompt, Options(max_tokens=o["max_tokens"], sampling=SamplingParams(**o["sampling"]),
                                   draft_tokens=o["draft_tokens"])) for prompt, o in data["submit"]]
        return News(submit, data["cancel"], data["stop"])


class RanksOutOfStep(SpecDecError):
    """A pass failed in a sharded run: the server stops on every rank (see `EngineThread`)."""


def _out_of_step(error: BaseException) -> RanksOutOfStep:
    return RanksOutOfStep(f"a pass failed in the sharded model ({type(error).__name__}: {error}); the ranks may "
                          "be out of step, so the server stops on every rank")


class EngineThread:
    """Runs the engine on its own thread; requests talk to it through asyncio queues.

    The thread also loads the model: MLX binds arrays to the stream of the thread that made
    them (0.32 streams are per thread), so the thread that decodes must be the one that loads.

    Requests and cancellations reach the engine only on this thread, between steps, as `News`:
    over a group (`mlx-specdec serve` under mlx.launch) rank 0 shares each step's news before
    the step and the other ranks (`follow`) apply the same news and run the same step, so every
    rank's engine holds the same queue and live batch and takes the same decisions. Requests
    are validated before they are shared, so one that rank 0 refuses never reaches the others.

    Errors over a group. A pass that raises on one rank leaves the others waiting in a
    collective it never enters, and no rank can tell whether the others raised too. So a failed
    pass is not survived as it is alone (where the requests it hit end with an error and the
    engine goes on): on a rank where a pass failed, the requests get their error and the rank
    exits with one line; mlx.launch ends the ranks still running when one exits with an error,
    which frees those waiting in a collective for good. Errors that are rank 0's alone (a bad body, a chat template, a
    request past the K/V bound) are answered before anything is shared.
    """

    def __init__(self, build: Callable[[], tuple[SpecModel, Any]]):
        self._build = build
        self.spec: SpecModel | None = None
        self.engine = None
        self.group = None  # the spec's group, once loaded
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.fatal: RanksOutOfStep | None = None  # why a sharded server stopped itself
        self.on_fatal: Callable[[], None] = lambda: None  # stops the HTTP side
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._incoming: list[Ticket] = []  # submitted by the event loop, not yet in the engine
        self._cancels: list[int] = []  # engine ids to cancel at the next step
        self._queues: dict[int, Ticket] = {}  # by engine id: requests whose events someone reads
        self._generated: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.generated_total = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="mlx-specdec-engine", daemon=True)

    def start(self) -> None:
        """Start the thread and wait until it has loaded the model (re-raising what loading raised)."""
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, prompt: list[int], options: Options) -> Ticket:
        """Hand a request to the engine (from the event loop); its events arrive on the ticket's queue."""
        try:
            prompt = self.engine.check(prompt, options)
        except InputError as e:  # e.g. more K/V than the engine may ever hold
            raise _bad(str(e)) from None
        ticket = Ticket(prompt, options, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._incoming.append(ticket)
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.cancelled:
                return
            ticket.cancelled = True  # not yet submitted: it never will be (or is cancelled once it is)
            if ticket.rid is not None:
                self._queues.pop(ticket.rid, None)
                self._cancels.append(ticket.rid)
        self._wake.set()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._generated and self._generated[0][0] < now - RATE_WINDOW_S:
                self._generated.popleft()
            return sum(n for _, n in self._generated) / RATE_WINDOW_S

    def _run(self) -> None:
        try:
            self.spec, self.engine = self._build()
            self.group = self.spec.group
        except BaseException as e:  # noqa: BLE001 - handed to start(), on the caller's thread
            self._failure = e
            return
        finally:
            self._ready.set()
        while True:
            if not self.engine.has_work:
                # Alone: sleep until a request comes. Over a group: tick, so the others sleep too.
                self._wake.wait(IDLE_TICK_S if self.group is not None else None)
            self._wake.clear()
            tickets, news = self._news()
            if self.group is not None:
                news = News.decode(distributed.share_text(self.group, news.encode()))
            self._apply(tickets, news)
            if news.stop:
                return
            if not self.engine.has_work:
                continue
            try:
                events = self.engine.step()
                self._deliver(events)
            except Exception as e:  # noqa: BLE001 - the server must outlive one bad step
                if self.group is not None:
                    return self._stop_all(_out_of_step(e), e)
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            failed = [e.error for e in events if e.error is not None]
            if failed and self.group is not None:
                return self._stop_all(_out_of_step(failed[0]), failed[0])

    def _news(self) -> tuple[list[Ticket], News]:
        """Take what the event loop handed in since the last step."""
        with self._lock:
            tickets = [t for t in self._incoming if not t.cancelled]
            self._incoming, cancels, self._cancels = [], self._cancels, []
        return tickets, News([(t.prompt, t.options) for t in tickets], cancels, self._stopping)

    def _apply(self, tickets: list[Ticket], news: News) -> None:
        for ticket in tickets:
            try:
                rid = self.engine.submit(ticket.prompt, ticket.options)
            except InputError as e:  # the K/V bound, measured since the ticket was checked (so on every rank)
                ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, _bad(str(e)))
                continue
            with self._lock:
                ticket.rid = rid
                if ticket.cancelled:  # while it was being shared: it leaves at the next step
                    self._cancels.append(rid)
                else:
                    self._queues[rid] = ticket
        for rid in news.cancel:
            self.engine.cancel(rid)

    def _deliver(self, events) -> None:
        now, n = time.monotonic(), sum(len(e.tokens) for e in events)
        with self._lock:
            self.generated_total += n
            if n:
                self._generated.append((now, n))
            targets = []
            for event in events:
                # A finished request's queue is done with; a cancelled one's is gone already.
                ticket = (self._queues.pop(event.request_id, None) if event.finish_reason else
                          self._queues.get(event.request_id))
                if ticket is not None:
                    targets.append((ticket, event))
        for ticket, event in targets:
            ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, event)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            self.errors += 1
            failed, self._queues = self._queues, {}
        for rid, ticket in failed.items():
            self.engine.cancel(rid)
            ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, error)

    def _stop_all(self, fatal: RanksOutOfStep, error: Exception) -> None:
        """A sharded server's engine thread ends: every request still held gets the error, and
        the HTTP side stops (`serve` then exits with the one line)."""
        self.fatal = fatal
        with self._lock:
            self.errors += 1
            failed, self._queues = list(self._queues.values()) + self._incoming, {}
            self._incoming = []
        for ticket in failed:
            ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, error)
        self.on_fatal()


def follow(build: Callable[[], tuple[SpecModel, Any]]) -> None:
    """A rank other than 0 of a sharded server: no HTTP; apply the news rank 0 shares and run
    the same engine steps, until rank 0 says stop. Raises `RanksOutOfStep` when a pass fails."""
    import signal

    # Ctrl-C in a terminal reaches every rank mlx.launch started; rank 0 decides when all stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec, engine = build()
    while True:
        if not engine.has_work:
            time.sleep(IDLE_TICK_S)
        news = News.decode(distributed.share_text(spec.group, ""))
        for prompt, options in news.submit:
            try:
                engine.submit(prompt, options)
            except InputError:  # rank 0's engine refused it too: the same check on the same sizes
                continue
        for rid in news.cancel:
            engine.cancel(rid)
        if news.stop:
            return
        if not engine.has_work:
            continue
        try:
            events = engine.step()
        except Exception as e:  # noqa: BLE001 - see EngineThread: a failed pass stops every rank
            raise _out_of_step(e) from e
        failed = [e.error for e in events if e.error is not None]
        if failed:
            raise _out_of_step(failed[0]) from failed[0]


# ---------------------------------------------------------------------------------------------
# The server: admission, generation, response bodies


@dataclass
class Counters:
    requests: dict[str, int] = field(default_factory=dict)  # by outcome
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1


def speculative_summary(stats: Stats, draft_tokens: int | str) -> dict:
    """The per-response extra field: what drafting did for this request."""
    return {
        "draft_tokens": "off" if draft_tokens == 0 else draft_tokens,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "rounds": stats.rounds,
        "tokens_per_round": round(1 + stats.mean_accepted_per_round, 4) if stats.rounds else 1.0,
        "k_histogram": {str(k): n for k, n in sorted(stats.k_histogram.items())},
    }


class Server:
    """The state behind the routes: the parser, the engine thread and the admission books."""

    def __init__(self, runner: EngineThread, *, model_id: str, max_batch: int, max_queue: int,
                 api_key: str | None = None, default_max_tokens: int = 512):
        self.runner, self.spec = runner, runner.spec
        self.parser = Parser(runner.spec, model_id, default_max_tokens)
        self.model_id, self.max_batch, self.max_queue = model_id, max_batch, max_queue
        self.api_key = api_key
        self.held: dict[int, Job] = {}  # admitted and not finished, by a server-side number
        self._next = 0
        self.counters = Counters()
        self.created = int(time.time())

    # -- admission

    def admit(self, job: Job) -> int:
        """Hold a place for a job or refuse it; returns its ticket, to `release` when done. (The
        engine bounds the K/V memory of its live rows itself: a request that fits the count but
        not the memory waits in its queue.)"""
        if len(self.held) >= self.max_batch + self.max_queue:
            raise APIError(429, f"the server is full ({len(self.held)} requests decoding or waiting): retry "
                           "shortly", type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        self._next += 1
        self.held[self._next] = job
        return self._next

    def release(self, ticket: int) -> None:
        self.held.pop(ticket, None)

    # -- generation

    async def pieces(self, job: Job) -> AsyncIterator[Piece]:
        """Run one admitted job in the engine and yield its text as it comes. Ends the job in
        the engine when its text hits a stop string or its consumer stops listening."""
        ticket = self.runner.submit(job.prompt, job.options)
        text = TextStream(self.spec.tokenizer, job.stops) if self.spec.tokenizer is not None else None
        tokens, done = 0, False
        try:
            while True:
                event = await ticket.queue.get()
                if isinstance(event, APIError):  # refused by the engine thread, before it ran
                    done = True
                    raise event
                failure = event if isinstance(event, Exception) else event.error
                if failure is not None or event.finish_reason == "error":
                    done = True
                    raise APIError(500, f"the model failed on this request: {type(failure).__name__}: {failure}",
                                   type="server_error")
                tokens += len(event.tokens)
                final = event.finish_reason is not None
                new = text.add(event.tokens, final) if text is not None else ""
                if text is not None and text.stopped:
                    self.runner.cancel(ticket)
                    done = True
                    yield Piece(new, tokens, "stop", event.stats)
                    return
                if final:
                    done = True
                    yield Piece(new, tokens, event.finish_reason, event.stats)
                    return
                if new:
                    yield Piece(new, tokens, None, None)
        finally:
            if not done:  # the client left, or the consumer was cancelled
                self.runner.cancel(ticket)

    async def complete(self, job: Job, request: Request) -> dict:
        """A whole (non-streamed) answer; cancelled in the engine if the client disconnects first."""
        async def collect():
            parts, last = [], None
            async for piece in self.pieces(job):
                parts.append(piece.text)
                last = piece
            return "".join(parts), last

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()  # its finally cancels the request in the engine
            raise ClientGone()
        text, last = work.result()
        return self.body(job, text, last)

    def usage(self, job: Job, completion_tokens: int) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": completion_tokens,
                "total_tokens": len(job.prompt) + completion_tokens}

    def body(self, job: Job, text: str, last: Piece) -> dict:
        self.counters.prompt_tokens += len(job.prompt)
        self.counters.completion_tokens += last.tokens
        if job.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}
            head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
            head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}
        return head | {"created": int(time.time()), "model": job.model, "choices": [choice],
                       "usage": self.usage(job, last.tokens),
                       "speculative": speculative_summary(last.stats, job.options.draft_tokens)}

    async def events(self, job: Job, release: Callable[[], None]) -> AsyncIterator[str]:
        """The SSE stream of one job: OpenAI's chunk objects, then ``data: [DONE]``."""
        chat = job.kind == "chat"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": job.model}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": text} if text else {})
                return head | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return head | {"choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        pieces = self.pieces(job)
        try:
            if chat:
                yield _sse(chunk(None, None, first=True))
            async for piece in pieces:
                if piece.finish_reason is None:
                    yield _sse(chunk(piece.text, None))
                    continue
                if piece.text:
                    yield _sse(chunk(piece.text, None))
                self.counters.prompt_tokens += len(job.prompt)
                self.counters.completion_tokens += piece.tokens
                end = chunk(None, piece.finish_reason)
                end["speculative"] = speculative_summary(piece.stats, job.options.draft_tokens)
                yield _sse(end)
                if job.include_usage:
                    yield _sse(head | {"choices": [], "usage": self.usage(job, piece.tokens)})
            self.counters.count("ok")
        except APIError as e:
            self.counters.count("error")
            yield _sse(e.body())
        except (asyncio.CancelledError, GeneratorExit):
            self.counters.count("disconnected")
            raise
        finally:
            await pieces.aclose()  # a client gone mid-stream: cancels the request in the engine now
            release()
        yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that closes its generator however the response ends, so that a client
    who disconnects mid-stream has its request cancelled at once, not when it is collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------
# Routes


def _prometheus(server: Server) -> str:
    """/metrics in the Prometheus text format: the engine's live state and the server's counters."""
    m = server.runner.engine.metrics()
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP mlx_specdec_{name} {help}")
        lines.append(f"# TYPE mlx_specdec_{name} {kind}")
        lines.extend(f"mlx_specdec_{name}{labels} {value}" for labels, value in samples)

    metric("batch_size", "gauge", "Rows decoding in the live batch.", [("", m.get("batch_size", 0))])
    metric("queue_depth", "gauge", "Requests waiting to join the batch.", [("", m.get("queue_depth", 0))])
    metric("requests_held", "gauge", "Requests the server holds (decoding or waiting).", [("", len(server.held))])
    metric("tokens_per_second", "gauge", f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.",
           [("", round(server.runner.tokens_per_second(), 3))])
    metric("generated_tokens_total", "counter", "Tokens generated since start.",
           [("", server.runner.generated_total)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
           [("", server.counters.prompt_tokens)])
    metric("requests_total", "counter", "Requests by outcome.",
           [(f'{{outcome="{k}"}}', v) for k, v in sorted(server.counters.requests.items())])
    metric("engine_errors_total", "counter", "Engine steps that failed.", [("", server.runner.errors)])
    metric("rounds_total", "counter", "Speculative rounds the live batch ran.", [("", m.get("rounds", 0))])
    metric("row_rounds_total", "counter", "Rows summed over those rounds (over rounds_total: the mean batch size).",
           [("", m.get("row_rounds", 0))])
    by_position = m.get("acceptance_by_position") or []
    metric("acceptance", "gauge", "Acceptance of draft position i given all before it were accepted "
           "(all rounds so far).", [(f'{{position="{i + 1}"}}', round(a, 4)) for i, a in enumerate(by_position)
                                    if a is not None])
    metric("draft_tokens", "gauge", "Draft length k of the last round (0: drafting off).",
           [("", m.get("draft_k", 0) or 0)])
    reason = m.get("off_reason")
    metric("drafting_off", "gauge", "1 while the last round did not draft, with the policy's reason.",
           [(f'{{reason="{_label(reason)}"}}', 1)] if reason else [("", 0)])
    for key, help in (("kv_reserved_bytes", "K/V memory the live rows could grow to."),
                      ("kv_memory_bytes", "K/V memory the engine admits rows up to."),
                      ("prefix_cache_tokens", "Positions held by the prefix cache."),
                      ("prefix_reused_tokens", "Prompt tokens served from the prefix cache instead of prefilled.")):
        if key in m:
            metric(key, "counter" if key == "prefix_reused_tokens" else "gauge", help, [("", m[key])])
    return "\n".join(lines) + "\n"


def _label(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def make_app(runner: EngineThread, *, model_id: str | None = None, max_batch: int = 8, max_queue: int = 64,
             api_key: str | None = None, default_max_tokens: int = 512) -> Starlette:
    """The ASGI app over a started engine thread (which holds the model); it stops the thread
    when the app shuts down."""
    spec = runner.spec
    server = Server(runner, model_id=model_id or spec.name, max_batch=max_batch, max_queue=max_queue,
                    api_key=api_key, default_max_tokens=default_max_tokens)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}") from None

    async def generate(request: Request, kind: str) -> Response:
        body = await read_json(request)
        job = await asyncio.to_thread(server.parser.parse, body, kind)  # template + tokenizer off the loop
        ticket = server.admit(job)
        if job.stream:
            return EventStream(server.events(job, lambda: server.release(ticket)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            out = await server.complete(job, request)
            server.counters.count("ok")
            return JSONResponse(out)
        except ClientGone:
            server.counters.count("disconnected")
            return Response(status_code=499)
        finally:
            server.release(ticket)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "mlx-specdec",
             "drafter": spec.drafter_name}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": server.model_id, "drafter": spec.drafter_name})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(_prometheus(server), media_type="text/plain; version=0.0.4")

    async def api_error(request: Request, exc: APIError) -> Response:
        server.counters.count(f"http_{exc.status}")
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind,
                        headers=dict(exc.headers or {})).response()

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    class Auth:
        """With an API key, every route but /health wants ``Authorization: Bearer <key>``."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or api_key is None or scope["path"] == "/health":
                return await self.app(scope, receive, send)
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return await self.app(scope, receive, send)
            response = APIError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                type="authentication_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"}).response()
            await response(scope, receive, send)

    def lifespan(app):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def span(app):
            try:
                yield
            finally:
                server.runner.stop()
                spec.save_policy()

        return span(app)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=[Middleware(Auth)],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.server = server
    return app


def serve(load: Callable[[], SpecModel], *, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8,
          max_queue: int = 64, api_key: str | None = None, model_id: str | None = None,
          default_max_tokens: int = 512, log_level: str = "info", on_ready: Callable[[SpecModel], None] | None = None,
          group: mx.distributed.Group | None = None) -> None:
    """Load the model (on the engine thread, through ``load``) and serve until interrupted.

    With ``group`` (the processes mlx.launch started; ``load`` loads this rank's shard) rank 0
    serves HTTP and the other ranks follow its engine's steps until it stops. Raises
    `RanksOutOfStep` on every rank when a pass failed in the sharded model."""
    import uvicorn

    from .engine import Engine

    def build():
        spec = load()
        return spec, Engine(spec, max_batch=max_batch)

    if not distributed.is_main(group):
        follow(build)
        return
    runner = EngineThread(build)
    runner.start()
    app = make_app(runner, model_id=model_id, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                   default_max_tokens=default_max_tokens)
    if on_ready is not None:
        on_ready(runner.spec)
    http = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))

    def stop_http() -> None:
        http.should_exit = True  # uvicorn's own flag, as its signal handlers set it

    runner.on_fatal = stop_http
    try:
        http.run()
    finally:
        runner.stop()  # also when uvicorn could not bind the port: the other ranks leave too
    if runner.fatal is not None:
        raise runner.fatal
