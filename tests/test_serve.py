"""`sparsezip serve` end to end: the real CLI in a subprocess, queried with the official `openai` client.

Every expected answer is computed in this process with sparsezip's own generation API on the same tiny model, so
the server must give exactly what `generate_batch` gives (greedy decoding is deterministic).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from sparsezip.errors import SparsezipError
from sparsezip.generate import Generation, SamplingParams, chat_ids, generate_batch, stop_ids
from sparsezip.runtime import load_model
from sparsezip.cli import main
from sparsezip.openai_api import ApiError, ServerInfo, ServerLimits
from sparsezip.serve import Engine, Job, build_app, listen, loopback_only, stream_events, wait_done
from sparsezip.tp import Dist

REPO = Path(__file__).resolve().parents[1]
PROMPT = "She said that"  # the tiny random model answers it with plain text (many prompts give only \ufffd)
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who is Emma?"}]
READY = re.compile(r"serving (\S+) on http://127\.0\.0\.1:(\d+) \(OpenAI-compatible")


@dataclass
class Server:
    proc: subprocess.Popen
    log: Path  # stdout and stderr together
    url: str = ""
    model: str = ""

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)


def launch(model_dir: Path, log: Path, nproc: int = 1) -> Server:
    """Start `sparsezip serve --port 0` (any free port), in one process or under torchrun (whose torchelastic_*
    folder goes beside the log, not into the system's temporary folder)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), TMPDIR=str(log.parent))
    launcher = [sys.executable, "-m", "sparsezip"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", "-m",
        "sparsezip"]
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block the server
        # its own session, so that Ctrl-C can be sent to the whole process group as a terminal would
        proc = subprocess.Popen([*launcher, "serve", "--model_path", str(model_dir), "--port", "0"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(proc, log)


def wait_ready(server: Server) -> Server:
    """Read the address from the ready line, then wait until the server answers /health."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.proc.poll() is None:
        ready = READY.search(server.log.read_text(errors="replace"))
        if ready:
            server.url, server.model = f"http://127.0.0.1:{ready[2]}", ready[1]
            if http("GET", f"{server.url}/health")[0] == 200:
                return server
        time.sleep(0.2)
    stop_server(server.proc)
    pytest.fail(f"the server did not start:\n{server.log.read_text(errors='replace')[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    """Ctrl-C the server's process group (as a terminal does); kill it if it has not stopped in 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def http(method: str, url: str, body: bytes | None = None, content_type: str = "application/json"):
    """(status, parsed JSON body) of a raw request; for requests the openai client would refuse to send."""
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (urllib.error.URLError, ConnectionError):
        return None, None


@pytest.fixture(scope="module")
def model_dir(tiny_dir) -> Path:
    return tiny_dir("llama")


@pytest.fixture(scope="module")
def launched(model_dir, tmp_path_factory):
    """{processes: server}: one server and a tensor-parallel one, launched together so that their slow start-ups
    (imports, model load) overlap with each other and with the tests' own model load."""
    root = tmp_path_factory.mktemp("serve")
    servers = {1: launch(model_dir, root / "one.log"), 2: launch(model_dir, root / "tp.log", nproc=2)}
    yield servers
    for srv in servers.values():
        stop_server(srv.proc)


@pytest.fixture(scope="module")
def server(launched, reference) -> Server:  # `reference` first: it loads while the servers start
    return wait_ready(launched[1])


@pytest.fixture(scope="module")
def reference(model_dir):
    """expected(prompt ids, max_tokens, **sampling) -> Generation, from generate_batch in this process."""
    model, tokenizer = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    eos = stop_ids(tokenizer, model_dir)

    def expected(ids: list[int], max_tokens: int, **params) -> Generation:
        return generate_batch(model, tokenizer, [ids], SamplingParams(max_new_tokens=max_tokens, **params), eos)[0]

    expected.tokenizer, expected.model, expected.eos = tokenizer, model, eos
    return expected


def completion_ids(reference, text: str) -> list[int]:
    return reference.tokenizer(text)["input_ids"]


def test_models_lists_the_served_model(server, model_dir):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [model_dir.name] == [server.model]


def test_completion_equals_generate_batch(server, reference):
    want = reference(completion_ids(reference, PROMPT), 16)
    got = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert got.object == "text_completion" and got.id and got.created and got.model == server.model
    assert [c.text for c in got.choices] == [want.text]
    assert got.choices[0].finish_reason == want.finish_reason and got.choices[0].index == 0
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, len(want.tokens))
    assert got.usage.total_tokens == want.prompt_tokens + len(want.tokens)


def test_completion_of_several_prompts_answers_each_in_order(server, reference):
    prompts = [PROMPT, "Anne Elliot walked"]
    got = server.client().completions.create(model=server.model, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [reference(completion_ids(reference, p), 8).text for p in prompts]


def test_chat_completion_equals_generate_batch(server, reference):
    want = reference(chat_ids(reference.tokenizer, MESSAGES), 16)
    got = server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=16,
                                                   temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == len(want.tokens)
    # content as a list of text parts is the same conversation
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    again = server.client().chat.completions.create(model=server.model, messages=parts, max_completion_tokens=16)
    assert again.choices[0].message.content == want.text


def test_streamed_chat_concatenates_to_the_whole_answer(server, reference):
    want = reference(chat_ids(reference.tokenizer, MESSAGES), 24)
    chunks = list(server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=24,
                                                          temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # it really came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [want.finish_reason]


def test_streamed_completion_concatenates_to_the_whole_answer(server, reference):
    want = reference(completion_ids(reference, PROMPT), 24)
    chunks = list(server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=24,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.text and len([t for t in texts if t]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        want.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(want.tokens)


def test_concurrent_clients_each_get_their_own_answer(server, reference):
    prompts = [PROMPT, "Mr. Darcy said", "Anne Elliot walked", "Hello there"]
    wants = [reference(completion_ids(reference, p), 20).text for p in prompts]
    assert len(set(wants)) > 1  # different prompts give different answers here, so a mix-up would show
    barrier, got, errors = threading.Barrier(len(prompts)), [None] * len(prompts), []

    def ask(i: int) -> None:
        try:
            client = server.client()
            barrier.wait()
            if i % 2:  # half of them streamed, to mix both kinds of job in the worker's queue
                stream = client.completions.create(model=server.model, prompt=prompts[i], max_tokens=20,
                                                   temperature=0, stream=True)
                got[i] = "".join(c.choices[0].text for c in stream if c.choices)
            else:
                got[i] = client.completions.create(model=server.model, prompt=prompts[i], max_tokens=20,
                                                   temperature=0).choices[0].text
        except Exception as e:  # noqa: BLE001 - reported by the main thread below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert got == wants


def test_stop_strings_end_the_answer(server, reference):
    ids = completion_ids(reference, PROMPT)
    full = reference(ids, 24).text
    assert len(full) >= 6, full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = reference(ids, 24, stop=(stop, "never-there"))
    assert want.finish_reason == "stop" and len(want.text) < len(full)
    got = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                             stop=[stop, "never-there"])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, "stop")
    streamed = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=24, stop=stop,
                                                  temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_sampling_with_a_seed_repeats_and_takes_the_extensions(server):
    ask = dict(model=server.model, messages=MESSAGES, max_tokens=12, temperature=0.9, top_p=0.95, seed=7,
               extra_body={"top_k": 20, "repetition_penalty": 1.1})
    first, second = (server.client().chat.completions.create(**ask) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content


@pytest.mark.parametrize("body, status, words", [
    (b'{"prompt": "Hello", "max_tokens": ', 400, "not valid JSON"),
    (b'["a list"]', 400, "invalid request"),
    (b'{"max_tokens": 4}', 400, "prompt"),  # missing field
    (b'{"prompt": 3}', 400, "prompt"),  # wrong type
    (b'{"prompt": "Hello", "temperature": -1}', 400, "temperature"),
    (b'{"prompt": "Hello", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "Hello", "max_tokens": 0}', 400, "at least 1"),
    (b'{"prompt": "Hello", "n": 2}', 400, "n must be 1"),
    (b'{"prompt": "Hello", "model": "no-such-model"}', 404, "does not exist"),
    (b'{"prompt": "Hello", "max_tokens": 100000}', 400, "over this server's limit of 4096"),
    (b'{"prompt": "Hello", "max_tokens": 300}', 400, "context"),
    (json.dumps({"prompt": "word " * 400}).encode(), 400, "context"),
    (b'{"prompt": "\\ud800"}', 400, "not valid UTF-8"),
    (b'{"prompt": "Hello", "temperature": 1, "seed": 1180591620717411303424}', 400, "seed must fit in 64 bits"),
])
def test_malformed_completion_gets_a_json_error(server, body, status, words):
    code, answer = http("POST", f"{server.url}/v1/completions", body)
    assert code == status, answer
    assert words in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, status, words", [
    (b'{"messages": []}', 400, "messages"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}', 400, "text"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}', 404, "does not exist"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid UTF-8"),
])
def test_malformed_chat_gets_a_json_error(server, body, status, words):
    code, answer = http("POST", f"{server.url}/v1/chat/completions", body)
    assert code == status, answer
    assert words in answer["error"]["message"]


def test_the_server_keeps_serving_after_errors(server, reference):
    code, answer = http("POST", f"{server.url}/v1/completions", b'{"prompt": "x"}', "text/plain")
    assert code == 400 and "Content-Type: application/json" in answer["error"]["message"]
    assert http("GET", f"{server.url}/v1/nowhere")[0] == 404
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=-1)
    got = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert got.choices[0].text == reference(completion_ids(reference, PROMPT), 4).text


class FailingOnce:
    """The model, except that its first forward pass raises, as a failure deep inside generation would."""

    def __init__(self, model):
        self.inner, self.armed = model, True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            raise RuntimeError("simulated failure")
        return self.inner(*args, **kwargs)


class Recording(FailingOnce):
    """The model, noting the batch size of every generate_batch call (each one sets up a KV cache)."""

    def __init__(self, model):
        super().__init__(model)
        self.armed, self.batches = False, []

    def setup_cache(self, batch: int, length: int) -> None:
        self.batches.append(batch)
        self.inner.setup_cache(batch, length)


def test_waiting_greedy_jobs_with_equal_settings_share_one_batch(reference):
    model = Recording(reference.model)
    engine = Engine(model, reference.tokenizer, Dist(), reference.eos, max_batch_size=8)
    texts = [PROMPT, "Mr. Darcy said", "Hello there", "Anne Elliot walked", PROMPT]
    greedy, sampled = SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=0.8)
    params = [greedy, greedy, sampled, greedy, replace(greedy, max_new_tokens=5)]

    async def ask_all() -> list[tuple[list[Generation], str]]:
        loop = asyncio.get_running_loop()
        jobs = [Job([completion_ids(reference, t)], p, i == 1, loop) for i, (t, p) in enumerate(zip(texts, params))]
        for job in jobs:  # all queued before the worker starts, as if they had arrived together
            engine.submit(job)
        engine.start()
        answers = []
        for job in jobs:
            streamed = ""
            while (event := await job.events.get())[0] == "text":
                streamed += event[2]
            assert event[0] == "done", event
            answers.append((event[1], streamed))
        return answers

    try:
        answers = asyncio.run(ask_all())
    finally:
        engine.close()
    assert model.batches == [3, 1, 1]  # the three equal greedy jobs together; sampled and different ones alone
    for (gens, streamed), text, p in zip(answers, texts, params):
        if p.temperature == 0:
            assert [g.text for g in gens] == [reference(completion_ids(reference, text), p.max_new_tokens).text]
    assert answers[1][1] == answers[1][0][0].text  # the streamed job's pieces, within a shared batch


def test_a_generation_error_is_a_500_and_the_worker_goes_on(reference):
    engine = Engine(FailingOnce(reference.model), reference.tokenizer, Dist(), reference.eos, max_batch_size=8)
    ids = completion_ids(reference, PROMPT)

    async def ask() -> Generation:
        job = Job([ids], SamplingParams(max_new_tokens=4), False, asyncio.get_running_loop())
        engine.submit(job)
        return (await wait_done(job))[0]

    async def ask_streamed() -> list[str]:  # the status line is out already: the error comes as an event
        job = Job([ids], SamplingParams(max_new_tokens=4), True, asyncio.get_running_loop())
        engine.submit(job)
        return [event async for event in stream_events(job, "cmpl-1", "m", chat=False, include_usage=False)]

    engine.start()
    try:
        with pytest.raises(ApiError) as failed:
            asyncio.run(ask())
        assert failed.value.status == 500 and "simulated failure" in failed.value.message
        assert failed.value.body()["error"]["type"] == "server_error"
        assert asyncio.run(ask()).text == reference(ids, 4).text
        engine.model.armed = True
        events = asyncio.run(ask_streamed())
        assert events[-1] == "data: [DONE]\n\n"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "server_error"
        assert asyncio.run(ask()).text == reference(ids, 4).text
    finally:
        engine.close()
    assert not engine.thread.is_alive()


def test_a_busy_port_is_a_one_line_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(SparsezipError, match="Address already in use.*pick another --port"):
            listen("127.0.0.1", taken.getsockname()[1])


def call_app(app, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, dict]:
    """(status, JSON body) of one request handed straight to the ASGI application, as uvicorn would."""
    async def exchange() -> tuple[int, dict]:
        sent = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))

    return asyncio.run(exchange())


@pytest.mark.parametrize("limit, flag", [("max_tokens", "--max_tokens_limit"), ("max_queue", "--max_queue"),
                                         ("max_body_bytes", "--max_body_bytes")])
def test_a_limit_below_one_names_its_flag(limit, flag):
    with pytest.raises(SparsezipError, match=f"^{flag} must be at least 1, got 0$"):
        ServerLimits(**{limit: 0}).check()


def test_the_limits_and_the_api_key_are_enforced_before_any_work(reference):
    limits = ServerLimits(max_tokens=16, max_queue=4, max_body_bytes=400, api_key="s3cret")
    engine = Engine(reference.model, reference.tokenizer, Dist(), reference.eos, 8, limits.max_queue)  # not started
    app = build_app(engine, reference.tokenizer, ServerInfo("m", SamplingParams(), 256, 0, limits))
    key = {"authorization": "Bearer s3cret"}
    small = json.dumps({"prompt": PROMPT, "max_tokens": 17}).encode()

    def post(body: bytes, **headers: str) -> tuple[int, dict]:
        return call_app(app, "POST", "/v1/completions", body, content_type="application/json", **headers)

    assert call_app(app, "GET", "/health") == (200, {"status": "ok"})  # open to probes without a key
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        status, answer = call_app(app, "GET", "/v1/models", **headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert post(small, content_length=str(len(small)))[0] == 401
    assert call_app(app, "GET", "/v1/models", **key)[0] == 200
    status, answer = post(small, content_length=str(len(small)), **key)
    assert status == 400 and "max_tokens 17 is over this server's limit of 16" in answer["error"]["message"]
    big = json.dumps({"prompt": "word " * 100}).encode()
    status, answer = post(big, content_length=str(len(big)), **key)
    assert status == 413 and "limit of 400 bytes" in answer["error"]["message"]
    assert post(small, **key)[0] == 411  # no Content-Length: the size is unknown until read
    assert post(small, content_length="12x", **key)[0] == 413
    assert engine.jobs.empty()  # nothing reached the model


def test_a_full_queue_answers_429(reference):
    engine = Engine(reference.model, reference.tokenizer, Dist(), reference.eos, 8, max_queue=2)  # not started
    job = lambda: Job([[1, 2]], SamplingParams(max_new_tokens=2), False, None)  # noqa: E731
    engine.submit(job())
    engine.submit(job())
    with pytest.raises(ApiError) as full:
        engine.submit(job())
    assert full.value.status == 429 and full.value.code == "rate_limit_exceeded"


class Gated(FailingOnce):
    """The model, counting its forward passes; every pass after the first `free` waits until `opened` is set, so
    the worker cannot run ahead of the test however busy the machine is."""

    def __init__(self, model, free: int):
        super().__init__(model)
        self.armed, self.calls, self.free, self.opened = False, 0, free, threading.Event()

    def __call__(self, *args, **kwargs):
        if self.calls >= self.free:
            self.opened.wait(timeout=60)
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_a_client_that_goes_away_stops_its_generation(reference):
    model = Gated(reference.model, free=8)
    engine = Engine(model, reference.tokenizer, Dist(), set(), max_batch_size=8)  # no end token: 200 steps
    params = SamplingParams(max_new_tokens=200)

    async def read_two_chunks_then_leave() -> None:
        job = Job([completion_ids(reference, PROMPT)], params, True, asyncio.get_running_loop())
        engine.submit(job)
        events = stream_events(job, "cmpl-1", "m", chat=False, include_usage=False)
        await events.__anext__()
        await events.__anext__()
        await events.aclose()  # what the server does to the stream of a client that disconnected
        model.opened.set()
        while (await job.events.get())[0] == "text":  # the worker ends the job early
            pass

    engine.start()
    try:
        asyncio.run(read_two_chunks_then_leave())
        assert model.calls <= 10, model.calls  # the 8 passes let through, the one waiting, and one in flight
        ids = completion_ids(reference, PROMPT)

        async def ask() -> Generation:
            job = Job([ids], SamplingParams(max_new_tokens=4), False, asyncio.get_running_loop())
            engine.submit(job)
            return (await wait_done(job))[0]

        want = generate_batch(reference.model, reference.tokenizer, [ids], SamplingParams(max_new_tokens=4), set())
        assert asyncio.run(ask()).text == want[0].text  # and it serves the next client as before
    finally:
        engine.close()


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("::", False)])
def test_only_loopback_addresses_count_as_private(host, loopback):
    assert loopback_only(host) is loopback


def test_serving_to_other_machines_needs_a_key_or_an_explicit_flag(capsys, model_dir, monkeypatch):
    monkeypatch.delenv("SPARSEZIP_API_KEY", raising=False)
    assert main(["serve", "--model_path", str(model_dir), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--api_key" in err[0] and "--allow_unauthenticated" in err[0], err


@pytest.mark.slow
def test_tensor_parallel_server_answers_like_one_process(launched, reference):
    srv = wait_ready(launched[2])
    try:
        client = srv.client()
        want = reference(completion_ids(reference, PROMPT), 12)
        assert client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=12,
                                         temperature=0).choices[0].text == want.text
        chat = reference(chat_ids(reference.tokenizer, MESSAGES), 12)
        stream = client.chat.completions.create(model=srv.model, messages=MESSAGES, max_tokens=12, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.text
        assert http("POST", f"{srv.url}/v1/completions", b'{"prompt": "x", "top_p": 2}')[0] == 400
        assert client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=12,
                                         temperature=0).choices[0].text == want.text
    finally:
        stop_server(srv.proc)
    log = srv.log.read_text(errors="replace")
    # both ranks stop on Ctrl-C without a traceback; torchrun itself reports the signal with one of its own
    assert "sparsezip: interrupted" in log, log[-3000:]
    assert "Exception in thread" not in log and log.count("Traceback") == log.count("SignalException: Process")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024


def test_soak_streaming_clients_some_leaving_midway(server, reference):
    """Rounds of concurrent streaming clients, every third one disconnecting after its first piece: all others get
    their whole answer, nothing fails, and the server's memory does not grow round after round."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [PROMPT, "Mr. Darcy said", "Anne Elliot walked", "Hello there"]
    wants = {p: reference(completion_ids(reference, p), 24).text for p in prompts}

    def client_session(i: int) -> tuple[str, str | None]:
        stream = server.client().completions.create(model=server.model, prompt=prompts[i % 4], max_tokens=24,
                                                    temperature=0, stream=True)
        if i % 3 == 0:
            next(iter(stream))
            stream.close()  # hangs up mid-answer
            return prompts[i % 4], None
        return prompts[i % 4], "".join(c.choices[0].text for c in stream if c.choices)

    def soak_round(clients: int) -> list[tuple[str, str | None]]:
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(client_session, range(clients)))

    soak_round(6)  # warm-up: first requests grow the allocator's pools
    before = rss_mib(server.proc.pid)
    answers = [a for _ in range(4) for a in soak_round(12)]
    after = rss_mib(server.proc.pid)
    finished = [(p, text) for p, text in answers if text is not None]
    assert len(answers) == 48 and len(finished) == 32
    assert all(text == wants[p] for p, text in finished)
    assert after - before < 64, (before, after)
    print(f"soak: 4 rounds x 12 streaming clients, 16 disconnected mid-stream, 32 whole answers, 0 errors; "
          f"server RSS {before:.0f} -> {after:.0f} MiB")
    assert http("GET", f"{server.url}/health")[0] == 200
    assert "Traceback" not in server.log.read_text(errors="replace")


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (a child of the launcher with RANK=rank in its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int(re.search(r"PPid:\s+(\d+)", (proc / "status").read_text())[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, TypeError):  # not a process, or gone meanwhile
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} under process {launcher}")


@pytest.mark.slow
def test_a_rank_that_dies_brings_the_tensor_parallel_server_down(model_dir, tmp_path):
    srv = wait_ready(launch(model_dir, tmp_path / "tp.log", nproc=2))
    try:
        os.kill(rank_pid(srv.proc.pid, 1), signal.SIGKILL)
        started = time.monotonic()
        code = srv.proc.wait(timeout=120)  # never a hang: torchrun stops rank 0 and reports the failure
        print(f"rank 1 killed: the server exited with {code} after {time.monotonic() - started:.1f} s")
    finally:
        stop_server(srv.proc)
    assert code != 0


def test_ctrl_c_stops_the_server_cleanly(server):
    """Last in this file: it stops the module's server."""
    assert server.client().models.list().data
    code = stop_server(server.proc)
    log = server.log.read_text(errors="replace")
    assert code in (0, 130), log[-3000:]
    assert "Traceback" not in log
    assert http("GET", f"{server.url}/health") == (None, None)
