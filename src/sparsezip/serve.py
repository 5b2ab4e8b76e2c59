"""`sparsezip serve`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health).

Threads: uvicorn's event loop parses and validates requests and tokenizes prompts (with its own copy of the
tokenizer); one worker thread owns the model, because the KV cache lives inside it, and takes jobs from a queue.
Greedy jobs waiting together with equal sampling settings run as one `generate_batch` call. Under torchrun, rank 0
serves and its worker broadcasts every batch to the other ranks, which run the same `generate_batch` call.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Literal

from pydantic import BaseModel, Field

from .errors import SparsezipError
from .generate import Generation, SamplingParams, chat_ids, generate_batch, stop_ids
from .model import Transformer
from .tp import Dist, broadcast_object

log = logging.getLogger("sparsezip")

# an idle rank 0 broadcasts a no-op this often, so that the other ranks' blocking receive never reaches the
# process group's timeout (30 minutes for gloo) while nobody sends requests
KEEPALIVE_S = 60.0


# ---------------------------------------------------------------- jobs and the model's worker thread

@dataclass
class Job:
    """One request's prompts, and the asyncio queue through which the worker reports back to its handler."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def send(self, event: tuple) -> None:
        """Hand an event to the request's handler; called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutting down): nobody is listening any more
            pass


@dataclass(frozen=True)
class Work:
    """What rank 0 broadcasts to the other ranks: a batch to generate, a keepalive, or the end."""

    kind: Literal["generate", "ping", "stop"]
    prompts: tuple[tuple[int, ...], ...] = ()
    params: SamplingParams | None = None


def batchable(a: SamplingParams, b: SamplingParams) -> bool:
    """Whether two jobs may share a batch. Only greedy ones: sampled rows share one random generator, so a seeded
    request would give a different answer depending on which other requests ran beside it."""
    return a == b and a.temperature == 0


class Engine:
    """The worker thread that owns the model; `submit` is safe from any thread."""

    def __init__(self, model: Transformer, tokenizer, dist: Dist, eos: set[int], max_batch_size: int):
        self.model, self.tokenizer, self.dist, self.eos = model, tokenizer, dist, eos
        self.max_batch_size = max_batch_size
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # None asks the worker to stop
        self.thread = threading.Thread(target=self._run, name="sparsezip-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        """Finish the batch in progress, refuse the jobs still waiting, release the other ranks."""
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        waiting: list[Job] = []
        while self._collect(waiting):
            self._generate(self._take_batch(waiting))
        for job in waiting:
            job.send(("error", 503, "the server is shutting down"))
        self._tell_followers(Work("stop"))

    def _collect(self, waiting: list[Job]) -> bool:
        """Wait until a job is waiting, then add every job already queued; False once asked to stop."""
        while not waiting:
            try:  # under TP, wake up now and then to keep the other ranks' receive alive
                job = self.jobs.get(timeout=KEEPALIVE_S if self.dist.size > 1 else None)
            except queue.Empty:
                self._tell_followers(Work("ping"))
                continue
            if job is None:
                return False
            waiting.append(job)
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            waiting.append(job)

    def _tell_followers(self, work: Work) -> None:
        """Broadcast a ping or stop. The other ranks may be gone already: Ctrl-C in a terminal reaches them too."""
        try:
            broadcast_object(work, self.dist)
        except RuntimeError as e:  # expected at shutdown; while serving, later batches will fail with a 500
            log.log(logging.DEBUG if work.kind == "stop" else logging.WARNING, "the other ranks did not receive "
                    "%s: %s", work.kind, " ".join(str(e).split())[:200])

    def _take_batch(self, waiting: list[Job]) -> list[Job]:
        """The oldest job plus the later ones that can share its batch, up to max_batch_size prompts."""
        batch = [waiting.pop(0)]
        count = len(batch[0].prompts)
        for job in list(waiting):
            if count + len(job.prompts) > self.max_batch_size:
                break
            if batchable(batch[0].params, job.params):
                waiting.remove(job)
                batch.append(job)
                count += len(job.prompts)
        return batch

    def _generate(self, batch: list[Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        owner = [(job, i) for job in batch for i in range(len(job.prompts))]  # batch row -> (job, its prompt)

        def on_text(row: int, text: str) -> None:
            job, i = owner[row]
            if job.stream:
                job.send(("text", i, text))

        params = batch[0].params
        try:
            broadcast_object(Work("generate", tuple(map(tuple, prompts)), params), self.dist)
            gens = generate_batch(self.model, self.tokenizer, prompts, params, self.eos,
                                  on_text if any(job.stream for job in batch) else None, self.max_batch_size)
        except Exception as e:  # noqa: BLE001 - any failure becomes a 500 for these requests, never a dead worker
            log.exception("generation failed")
            for job in batch:
                job.send(("error", 500, f"generation failed: {' '.join(str(e).split()) or type(e).__name__}"))
            return
        start = 0
        for job in batch:
            job.send(("done", gens[start:start + len(job.prompts)]))
            start += len(job.prompts)


def follow(model: Transformer, tokenizer, dist: Dist, eos: set[int], max_batch_size: int) -> None:
    """Ranks > 0: run every batch that rank 0 broadcasts, with the same arguments, until it says stop."""
    while True:
        work: Work = broadcast_object(None, dist)
        if work.kind == "stop":
            return
        if work.kind == "generate":
            try:
                generate_batch(model, tokenizer, [list(p) for p in work.prompts], work.params, eos,
                               max_batch_size=max_batch_size)
            except SparsezipError:  # rank 0 got the same error before any collective, and reported it
                pass


# ---------------------------------------------------------------- request bodies (OpenAI's fields)

class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields shared by both endpoints; those not given take the server's command-line settings."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    repetition_penalty: float | None = None  # extension
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


@dataclass(frozen=True)
class ServerInfo:
    """What the request handlers need to know besides the engine."""

    model_name: str
    defaults: SamplingParams
    context: int  # the model's context length in tokens (prompt + new tokens)
    created: int


def sampling_for(req, info: ServerInfo, prompts: list[list[int]], max_tokens: int | None) -> SamplingParams:
    """The request's SamplingParams, checked against the settings' limits and the model's context."""
    if req.model not in (None, info.model_name):
        raise ApiError(404, f"model {req.model!r} does not exist; this server serves {info.model_name!r}",
                       "model_not_found")
    if req.n != 1:
        raise ApiError(400, f"n must be 1 (this server returns one choice per prompt), got {req.n}")
    if any(not p for p in prompts):
        raise ApiError(400, "a prompt is empty after tokenization")
    room = info.context - max(map(len, prompts))
    if room < 1:
        raise ApiError(400, f"the prompt has {max(map(len, prompts))} tokens; the model's context is "
                            f"{info.context} tokens", "context_length_exceeded")
    if max_tokens is None:  # the server's default, shortened to what still fits in the context
        max_tokens = min(info.defaults.max_new_tokens, room)
    elif max_tokens > room:
        raise ApiError(400, f"the prompt ({info.context - room} tokens) plus max_tokens ({max_tokens}) exceed the "
                            f"model's context of {info.context} tokens", "context_length_exceeded")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop) if req.stop is not None else None
    given = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
             "repetition_penalty": req.repetition_penalty, "stop": stop, "seed": req.seed}
    params = replace(info.defaults, **{k: v for k, v in given.items() if v is not None})
    try:
        params.check()
    except SparsezipError as e:
        raise ApiError(400, str(e)) from None
    return params


def message_text(content) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


# ---------------------------------------------------------------- responses

def usage(gens: list[Generation]) -> dict:
    prompt, completion = sum(g.prompt_tokens for g in gens), sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(rid: str, model: str, gens: list[Generation]) -> dict:
    choices = [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
               for i, g in enumerate(gens)]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(gens)}


def chat_body(rid: str, model: str, gen: Generation) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": None,
              "finish_reason": gen.finish_reason}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage([gen])}


def sse(chunk: dict | str) -> str:
    """One server-sent event."""
    return f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"


async def wait_done(job: Job) -> list[Generation]:
    """The job's generations, once the worker is done (text events of a streamed job are skipped)."""
    while True:
        event = await job.events.get()
        if event[0] == "done":
            return event[1]
        if event[0] == "error":
            raise ApiError(event[1], event[2])


async def stream_events(job: Job, rid: str, model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """The job's server-sent events: text pieces as the worker makes them, then each prompt's finish reason."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        return sse({"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
                    **extra})

    def piece(i: int, text: str | None, finish: str | None = None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

    if chat:  # OpenAI's first chat chunk announces the role
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    while True:
        event = await job.events.get()
        if event[0] == "text":
            yield chunk([piece(event[1], event[2])])
        elif event[0] == "error":  # the status line has gone out already: report it in the stream
            yield sse(ApiError(event[1], event[2]).body())
            break
        else:
            gens = event[1]
            for i, g in enumerate(gens):
                yield chunk([piece(i, None, g.finish_reason)])
            if include_usage:
                yield chunk([], usage=usage(gens))
            break
    yield sse("[DONE]")


# ---------------------------------------------------------------- the application

def build_app(engine: Engine, tokenizer, info: ServerInfo):
    """The FastAPI application. `tokenizer` must be used by this event loop only (the worker has its own)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="sparsezip", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        if "json" not in request.headers.get("content-type", ""):  # FastAPI reads JSON bodies only when told so
            problems = "send the body as JSON with the header Content-Type: application/json"
        else:
            problems = "; ".join("the body is not valid JSON" if err["type"] == "json_invalid" else
                                 f"{'.'.join(map(str, err['loc'][1:])) or 'body'}: {err['msg']}" for err in e.errors())
        return JSONResponse(ApiError(400, f"invalid request: {problems}").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:  # unknown path, wrong method
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    async def run(prompts: list[list[int]], params: SamplingParams, stream: bool) -> Job:
        job = Job(prompts, params, stream, asyncio.get_running_loop())
        engine.submit(job)
        return job

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": info.model_name, "object": "model", "created": info.created,
                                            "owned_by": "sparsezip"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.echo or req.logprobs:
            raise ApiError(400, "echo and logprobs are not supported")
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise ApiError(400, "prompt must not be an empty list")
        prompts = [tokenizer(text)["input_ids"] for text in texts]
        job = await run(prompts, sampling_for(req, info, prompts, req.max_tokens), req.stream)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(job, rid, info.model_name, False, include),
                                     media_type="text/event-stream")
        return completion_body(rid, info.model_name, await wait_done(job))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported")
        # "developer" is OpenAI's newer name for "system"; chat templates know only the older one
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)}
                    for m in req.messages]
        try:
            prompts = [chat_ids(tokenizer, messages)]
        except SparsezipError as e:
            raise ApiError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - templates raise their own errors, e.g. on a role order they refuse
            raise ApiError(400, f"the chat template refused these messages: {e}") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = await run(prompts, sampling_for(req, info, prompts, max_tokens), req.stream)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(job, rid, info.model_name, True, include),
                                     media_type="text/event-stream")
        return chat_body(rid, info.model_name, (await wait_done(job))[0])

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, opened before uvicorn starts so that a busy port is a clear one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        reason = (e.strerror or str(e)).split(" (while")[0]  # socket.create_server appends the address again
        raise SparsezipError(f"cannot listen on {host}:{port} ({reason}); check --host, or pick another --port if "
                             "another program uses this one") from None


def serve(model: Transformer, tokenizer, dist: Dist, model_path, host: str = "127.0.0.1", port: int = 8000,
          defaults: SamplingParams = SamplingParams(), model_name: str = "sparsezip", max_batch_size: int = 8) -> None:
    """Serve until Ctrl-C. Rank 0 runs the HTTP server; under torchrun the other ranks follow its worker."""
    if max_batch_size < 1:
        raise SparsezipError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    eos = stop_ids(tokenizer, model_path)
    if not dist.is_main:
        follow(model, tokenizer, dist, eos, max_batch_size)
        return
    import uvicorn

    try:
        sock = listen(host, port)  # before the worker starts: a failure here leaves nothing to clean up
    except SparsezipError:
        broadcast_object(Work("stop"), dist)  # the other ranks wait for work: let them exit too
        raise
    engine = Engine(model, tokenizer, dist, eos, max_batch_size)
    info = ServerInfo(model_name, defaults, model.args.max_position_embeddings, int(time.time()))
    app = build_app(engine, copy.deepcopy(tokenizer), info)  # a Rust tokenizer must not be shared across threads
    quiet = not log.isEnabledFor(logging.INFO)
    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet, lifespan="off",
                            timeout_graceful_shutdown=3)
    engine.start()
    try:
        shown = f"[{host}]" if ":" in host else host
        port = sock.getsockname()[1]  # the real one when --port 0 asked for any free port
        print(f"serving {model_name} on http://{shown}:{port} "
              "(OpenAI-compatible: /v1/completions, /v1/chat/completions)", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
