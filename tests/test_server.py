"""`mlx-specdec serve` driven over HTTP on 127.0.0.1: the real command in a subprocess, the
embedded demo pair, the `openai` client and raw HTTP (httpx)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo"
KEY = "sekrit"
# A completion prompt the demo model continues without reaching EOS for thousands of tokens.
ENDLESS = "def median(data):"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `mlx-specdec serve` process."""

    def __init__(self, tmp: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        env = dict(os.environ, MLX_SPECDEC_CACHE="off", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_specdec.commands.cli", "serve", "--port", str(self.port),
             "--served-model-name", MODEL, *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        if not wait_healthy(self.url, self.proc, 120):
            self.stop()
            raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(f"{self.url}{path}", content=content, timeout=120, **kwargs)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("serve"), "--max-batch", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One row, no queue, an API key: for 401 and 429."""
    s = Served(tmp_path_factory.mktemp("serve-small"), "--max-batch", "1", "--max-queue", "0", "--api-key", KEY)
    yield s
    s.stop()


class InProcess(Served):
    """The server's app on uvicorn in a thread of this process, over an engine whose K/V bound
    the test sets (the command takes the bound from the device's memory)."""

    def __init__(self, kv_memory_bytes: int, max_batch: int):
        import uvicorn

        from mlx_specdec import load
        from mlx_specdec.engine import Engine
        from mlx_specdec.server import EngineThread, make_app

        def build():
            spec = load(None, None)  # the embedded demo pair, as `serve` with no --model
            return spec, Engine(spec, max_batch=max_batch, kv_memory_bytes=kv_memory_bytes)

        runner = EngineThread(build)
        runner.start()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = uvicorn.Server(uvicorn.Config(make_app(runner, model_id=MODEL, max_batch=max_batch),
                                                  host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.http.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.http.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.http.should_exit = True  # the app's shutdown stops the engine thread
        self.thread.join(timeout=30)


# The demo pair's K/V is 276 KiB per row plus 2 KiB per position of full attention, reserved
# 256 positions at a time: one row that could reach 256 positions fits (788 KiB), two do not,
# nor one that could reach more.
KV_BOUND = 1_200_000


@pytest.fixture(scope="module")
def tight_server():
    s = InProcess(KV_BOUND, max_batch=4)
    yield s
    s.stop()


# Requests of different prompt and answer lengths, chat and text, streamed and not, through
# the openai client and raw HTTP.
REQUESTS = [
    dict(kind="chat", via="openai", stream=False, content="What is the difflib module for?", max_tokens=24),
    dict(kind="chat", via="openai", stream=True, content="Describe statistics.median.", max_tokens=40),
    dict(kind="completion", via="openai", stream=False, prompt=ENDLESS, max_tokens=48),
    dict(kind="completion", via="openai", stream=True, prompt="import os\nimport sys\n\nclass", max_tokens=32),
    dict(kind="chat", via="http", stream=False, content="What is the signature of textwrap.wrap?", max_tokens=16),
    dict(kind="chat", via="http", stream=True, content="Explain fractions.Fraction in a few words, please.",
         max_tokens=36),
    dict(kind="completion", via="http", stream=False, prompt="class Queue:\n    def put(self, item):", max_tokens=20),
    dict(kind="completion", via="http", stream=True, prompt="def mean(xs):", max_tokens=44),
    dict(kind="completion", via="openai", stream=True, prompt=ENDLESS, max_tokens=8, draft_tokens=3),
    dict(kind="chat", via="http", stream=False, content="What does shutil.copy do?", max_tokens=28, draft_tokens="off"),
]


def _sse(response: httpx.Response) -> list[dict]:
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def ask(server: Served, r: dict) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of one request."""
    extra = {"draft_tokens": r["draft_tokens"]} if "draft_tokens" in r else {}
    if r["kind"] == "chat":
        body = dict(model=MODEL, messages=[{"role": "user", "content": r["content"]}], max_tokens=r["max_tokens"])
    else:
        body = dict(model=MODEL, prompt=r["prompt"], max_tokens=r["max_tokens"])
    stream = r["stream"]
    if r["via"] == "openai":
        client = server.client()
        create = client.chat.completions.create if r["kind"] == "chat" else client.completions.create
        out = create(**body, stream=stream, extra_body=extra,
                     **({"stream_options": {"include_usage": True}} if stream else {}))
        if not stream:
            choice = out.choices[0]
            text = choice.message.content if r["kind"] == "chat" else choice.text
            return text, out.usage.completion_tokens, choice.finish_reason
        text, finish, usage = "", None, None
        for chunk in out:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += (choice.delta.content or "") if r["kind"] == "chat" else choice.text
                finish = choice.finish_reason or finish
        return text, usage.completion_tokens, finish
    path = "/v1/chat/completions" if r["kind"] == "chat" else "/v1/completions"
    body |= extra
    if not stream:
        response = server.post(path, body)
        assert response.status_code == 200, response.text
        out = response.json()
        choice = out["choices"][0]
        assert out["speculative"]["rounds"] >= 0
        text = choice["message"]["content"] if r["kind"] == "chat" else choice["text"]
        return text, out["usage"]["completion_tokens"], choice["finish_reason"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200
        chunks = _sse(response)
    text = "".join((c["choices"][0]["delta"].get("content") or "") if r["kind"] == "chat" else c["choices"][0]["text"]
                   for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and "speculative" in [c for c in chunks if c["choices"]][-1]
    return text, chunks[-1]["usage"]["completion_tokens"], finish[0]


def shared_rounds(before: dict[str, float], after: dict[str, float]) -> float:
    """Between two /metrics reads, the rows decoded beyond one a round: > 0 iff some round held
    two rows or more (counted by the engine, so no sampling can miss a short overlap)."""
    rows, rounds = "mlx_specdec_row_rounds_total", "mlx_specdec_rounds_total"
    return (after[rows] - before[rows]) - (after[rounds] - before[rounds])


def test_concurrent_requests_each_equal_their_answer_alone(server):
    alone = [ask(server, r) for r in REQUESTS]
    for (text, n, finish), r in zip(alone, REQUESTS):
        assert n >= 1 and finish in ("stop", "length")
        assert finish == "stop" or n == r["max_tokens"]

    before = server.metrics()

    def staggered(i: int):
        time.sleep(0.03 * i)  # arrivals spread out: later ones join a batch already decoding
        return ask(server, REQUESTS[i])

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(staggered, range(len(REQUESTS))))
    assert together == alone
    assert shared_rounds(before, server.metrics()) > 0, "the requests never shared a batch"


def test_a_continued_conversation_and_a_shared_system_prompt_prefill_only_what_is_new(server):
    system = {"role": "system", "content": "You are a careful Python tutor who answers briefly. " * 25}

    def chat(*messages: dict) -> tuple[dict, float]:
        before = server.metrics()["mlx_specdec_prefix_reused_tokens"]
        out = server.post("/v1/chat/completions", {"model": MODEL, "messages": list(messages), "max_tokens": 32})
        assert out.status_code == 200, out.text
        return out.json(), server.metrics()["mlx_specdec_prefix_reused_tokens"] - before

    question = {"role": "user", "content": "What is the difflib module for?"}
    first, _ = chat(system, question)
    answer = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
    _, reused = chat(system, question, answer, {"role": "user", "content": "And textwrap?"})
    assert reused >= first["usage"]["prompt_tokens"]  # the whole first turn, and more
    # Other questions under the same system prompt: the second branches off it, the rest reuse it.
    others = [chat(system, {"role": "user", "content": q}) for q in
              ("Describe statistics.median.", "What does shutil.copy do?", "Explain fractions.Fraction.")]
    for out, reused in others[1:]:  # all but the question and the template's few tokens around it
        assert reused >= out["usage"]["prompt_tokens"] - 24 >= 200, [(o["usage"], r) for o, r in others]


def test_the_same_seed_samples_the_same_answer(server):
    # A fixed draft length: "auto" may pick another k the second time, and k decides how many
    # random numbers a round draws.
    body = dict(model=MODEL, prompt=ENDLESS, max_tokens=24, temperature=1.0, top_p=0.95, top_k=40, min_p=0.01,
                seed=7, draft_tokens=2)
    first, second, other = (server.post("/v1/completions", b).json() for b in (body, body, body | {"seed": 8}))
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["text"] != other["choices"][0]["text"]  # the seed is the request's own


def test_stop_strings_cut_the_text_and_end_the_request(server):
    full, _, _ = ask(server, dict(kind="completion", via="http", stream=False, prompt=ENDLESS, max_tokens=40))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        text, n, finish = _ask_stop(server, stop, stream)
        assert (text, finish) == (cut, "stop")
        assert n < 40


def _ask_stop(server: Served, stop: str, stream: bool) -> tuple[str, int, str]:
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=40, stop=[stop, "\x00never"],
                                    stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
    if not stream:
        return out.choices[0].text, out.usage.completion_tokens, out.choices[0].finish_reason
    text, finish, n = "", None, None
    for chunk in out:
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, n, finish


def _wait_idle(server: Served, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        m = server.metrics()
        if m["mlx_specdec_batch_size"] == 0 and m["mlx_specdec_requests_held"] == 0:
            return m
        assert time.monotonic() < deadline, f"the server kept decoding: {m}"
        time.sleep(0.05)


def test_a_client_that_disconnects_frees_its_row(server):
    body = dict(model=MODEL, prompt=ENDLESS, max_tokens=3000, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert got
        assert server.metrics()["mlx_specdec_batch_size"] == 1
    before = time.monotonic()
    m = _wait_idle(server)
    assert time.monotonic() - before < 10
    assert m['mlx_specdec_requests_total{outcome="disconnected"}'] >= 1
    # A non-streamed request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body | {"stream": False}, timeout=1.5)
    _wait_idle(server)
    text, n, _ = ask(server, REQUESTS[0])
    assert n >= 1 and text


BAD = [
    ("/v1/chat/completions", "{not json", 400),
    ("/v1/chat/completions", "[1, 2]", 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
     400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "temperature": "hot"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_k": -1}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "min_p": "low"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "draft_tokens": "lots"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    ("/v1/chat/completions", {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": 12}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 999999]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400),
    # Past the model's 4096 positions: the prompt alone, and the prompt plus max_tokens.
    ("/v1/completions", {"model": MODEL, "prompt": [7] * 4096}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [7] * 100, "max_tokens": 4000}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 5000}]}, 400),
]


def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server):
    for path, body, status in BAD:
        response = server.post(path, body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"], error
    long = server.post("/v1/completions", {"model": MODEL, "prompt": [7] * 4096}).json()["error"]
    assert long["code"] == "context_length_exceeded"
    assert server.post("/v1/nothing", {}).status_code == 404
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, messages=[])
    text, n, _ = ask(server, REQUESTS[4])
    assert n >= 1 and text


def test_admission_is_bounded_by_kv_memory(tight_server):
    s = tight_server
    alone = [ask(s, r) for r in REQUESTS[:4]]  # the first also measures the K/V sizes
    # A request that could never fit the bound is refused before it runs.
    big = s.post("/v1/completions", {"model": MODEL, "prompt": ENDLESS, "max_tokens": 600})
    assert big.status_code == 400, big.text
    assert "K/V" in big.json()["error"]["message"]
    # Requests that fit alone but not together wait for each other's rows, and get the same answers.
    seen, running = [], threading.Event()
    running.set()

    def watch():
        while running.is_set():
            m = s.metrics()
            seen.append((m["mlx_specdec_batch_size"], m["mlx_specdec_queue_depth"]))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda r: ask(s, r), REQUESTS[:4]))
    finally:
        running.clear()
        watcher.join()
    assert together == alone
    assert max(b for b, _ in seen) == 1 and max(q for _, q in seen) >= 1, seen
    assert s.metrics()["mlx_specdec_kv_memory_bytes"] == KV_BOUND
    assert ask(s, REQUESTS[4])[1] >= 1


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    ask(server, dict(kind="completion", via="http", stream=False, prompt=ENDLESS, max_tokens=12, draft_tokens=2))
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("batch_size", "queue_depth", "tokens_per_second", "acceptance", "draft_tokens", "drafting_off",
                 "generated_tokens_total"):
        assert f"# TYPE mlx_specdec_{name} " in text
    m = server.metrics()
    assert m["mlx_specdec_generated_tokens_total"] > 0
    assert m['mlx_specdec_acceptance{position="1"}'] >= 0


def test_api_key_is_required(small_server):
    body = {"model": MODEL, "prompt": ENDLESS, "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = small_server.post("/v1/completions", body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{small_server.url}/v1/models").status_code == 401
    assert httpx.get(f"{small_server.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        small_server.client("wrong").completions.create(**body)
    out = small_server.client(KEY).completions.create(**body)
    assert out.usage.completion_tokens == 4


def test_a_full_server_answers_429_with_retry_after(small_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = dict(model=MODEL, prompt=ENDLESS, max_tokens=3000, stream=True)
    with httpx.stream("POST", f"{small_server.url}/v1/completions", json=body, headers=auth,
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")
        full = small_server.post("/v1/completions", body | {"stream": False, "max_tokens": 4}, headers=auth)
        assert full.status_code == 429, full.text
        assert int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["type"] == "rate_limit_error"
    deadline = time.monotonic() + 30
    while True:  # the streamed request is cancelled, its place frees up
        again = small_server.post("/v1/completions", body | {"stream": False, "max_tokens": 4}, headers=auth)
        if again.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert again.status_code == 200, again.text
    assert again.json()["usage"]["completion_tokens"] == 4


def test_the_readme_client_example_streams_an_answer(server):
    """README's openai example, run as written except for this test server's port and model name."""
    import contextlib
    import io
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "from openai import" in b]
    assert blocks
    for block in blocks:
        assert "http://127.0.0.1:8080/v1" in block and '"mlx-specdec-demo"' in block
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.replace("http://127.0.0.1:8080", server.url).replace('"mlx-specdec-demo"', f'"{MODEL}"'), "README.md", "exec"), {})
        assert out.getvalue().strip(), block
