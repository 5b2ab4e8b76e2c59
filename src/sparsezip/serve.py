"""`sparsezip serve`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health).

Threads: uvicorn's event loop parses and validates requests and tokenizes prompts (with its own copy of the
tokenizer); one worker thread owns the model, because the KV cache lives inside it, and takes jobs from a queue.
Greedy jobs waiting together with equal sampling settings run as one `generate_batch` call. Under torchrun, rank 0
serves and its worker broadcasts every batch to the other ranks, which run the same `generate_batch` call.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Literal

from fastapi import Request  # at module level: FastAPI resolves handler annotations here

from .errors import SparsezipError
from .generate import (Generation, SamplingParams, chat_ids, check_batch_size, check_text, generate_batch,
                       stop_ids)
from .model import Transformer
from .openai_api import (ApiError, ChatRequest, CompletionRequest, ServerInfo, ServerLimits, chat_body,
                         completion_body, message_text, sampling_for, sse, usage)
from .tp import Dist, broadcast_object

log = logging.getLogger("sparsezip")

# an idle rank 0 broadcasts a no-op this often, so that the other ranks' blocking receive never reaches the
# process group's timeout (30 minutes for gloo) while nobody sends requests
KEEPALIVE_S = 60.0
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there


# ---------------------------------------------------------------- jobs and the model's worker thread

@dataclass
class Job:
    """One request's prompts, and the asyncio queue through which the worker reports back to its handler."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # its client has gone

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

    def __init__(self, model: Transformer, tokenizer, dist: Dist, eos: set[int], max_batch_size: int,
                 max_queue: int = ServerLimits.max_queue):
        self.model, self.tokenizer, self.dist, self.eos = model, tokenizer, dist, eos
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.slots = threading.BoundedSemaphore(max_queue)  # one per job waiting or generating
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # None asks the worker to stop
        self.thread = threading.Thread(target=self._run, name="sparsezip-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with a 429 when max_queue jobs are waiting or generating already."""
        if not self.slots.acquire(blocking=False):
            raise ApiError(429, f"the server is busy ({self.max_queue} requests waiting or running); try again "
                                "later", "rate_limit_exceeded")
        self.jobs.put(job)

    def _finish(self, job: Job, event: tuple) -> None:
        job.send(event)
        self.slots.release()

    def close(self) -> None:
        """Finish the batch in progress, refuse the jobs still waiting, release the other ranks."""
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        waiting: list[Job] = []
        while self._collect(waiting):
            self._generate(self._take_batch(waiting))
        for job in waiting:
            self._finish(job, ("error", 503, "the server is shutting down"))
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
        for job in [job for job in batch if job.cancelled.is_set()]:  # gone while waiting: nothing to do
            batch.remove(job)
            self._finish(job, ("error", 499, "the client closed the request"))
        if not batch:
            return
        prompts = [p for job in batch for p in job.prompts]
        owner = [(job, i) for job in batch for i in range(len(job.prompts))]  # batch row -> (job, its prompt)

        def on_text(row: int, text: str) -> None:
            job, i = owner[row]
            if job.stream:
                job.send(("text", i, text))

        def all_gone() -> bool:
            return all(job.cancelled.is_set() for job in batch)

        params = batch[0].params
        try:
            broadcast_object(Work("generate", tuple(map(tuple, prompts)), params), self.dist)
            # under TP every rank must run the same steps, and only rank 0 knows of the clients: no early stop
            gens = generate_batch(self.model, self.tokenizer, prompts, params, self.eos,
                                  on_text if any(job.stream for job in batch) else None, self.max_batch_size,
                                  cancelled=all_gone if self.dist.size == 1 else None)
        except Exception as e:  # noqa: BLE001 - any failure becomes a 500 for these requests, never a dead worker
            log.exception("generation failed")
            for job in batch:
                self._finish(job, ("error", 500, f"generation failed: {' '.join(str(e).split()) or type(e).__name__}"))
            return
        start = 0
        for job in batch:
            self._finish(job, ("done", gens[start:start + len(job.prompts)]))
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


async def wait_done(job: Job, disconnected: Callable[[], Awaitable[bool]] | None = None) -> list[Generation]:
    """The job's generations, once the worker is done (text events of a streamed job are skipped). When the client
    `disconnected`, the job is cancelled: the worker stops generating for nobody."""
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S if disconnected else None)
        except asyncio.TimeoutError:
            if await disconnected():
                job.cancelled.set()
                raise ApiError(499, "the client closed the request") from None
            continue
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

    try:
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
    finally:  # also when the client disconnected and the server closed this generator mid-stream
        job.cancelled.set()


class Gate:
    """ASGI middleware that refuses a request before its body is read: without the API key (401), a POST without
    Content-Length (411), or a body over the limit (413). Answers are OpenAI's JSON error objects."""

    def __init__(self, app, limits: ServerLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(refusal.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if refusal.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])  # ASGI gives lower-case names
        key = self.limits.api_key
        if key and scope["path"] != "/health" and not hmac.compare_digest(
                headers.get(b"authorization", b""), f"Bearer {key}".encode()):
            return ApiError(401, "a valid API key is required: send the header Authorization: Bearer <key>",
                            "invalid_api_key")
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            if length is None:
                return ApiError(411, "send the request body with a Content-Length header")
            if not length.isdigit() or int(length) > self.limits.max_body_bytes:
                return ApiError(413, f"the request body is over this server's limit of "
                                     f"{self.limits.max_body_bytes} bytes")
        return None


# ---------------------------------------------------------------- the application

def build_app(engine: Engine, tokenizer, info: ServerInfo):
    """The FastAPI application. `tokenizer` must be used by this event loop only (the worker has its own)."""
    from fastapi import FastAPI
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

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:  # the trace goes to the log, never to clients
        return JSONResponse(ApiError(500, "internal server error").body(), status_code=500)

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
    async def completions(req: CompletionRequest, request: Request):
        if req.echo or req.logprobs:
            raise ApiError(400, "echo and logprobs are not supported")
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise ApiError(400, "prompt must not be an empty list")
        try:
            prompts = [tokenizer(check_text(text))["input_ids"] for text in texts]
        except SparsezipError as e:
            raise ApiError(400, str(e)) from None
        job = await run(prompts, sampling_for(req, info, prompts, req.max_tokens), req.stream)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(job, rid, info.model_name, False, include),
                                     media_type="text/event-stream")
        return completion_body(rid, info.model_name, await wait_done(job, request.is_disconnected))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
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
        return chat_body(rid, info.model_name, (await wait_done(job, request.is_disconnected))[0])

    return Gate(app, info.limits)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, opened before uvicorn starts so that a busy port is a clear one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        reason = (e.strerror or str(e)).split(" (while")[0]  # socket.create_server appends the address again
        raise SparsezipError(f"cannot listen on {host}:{port} ({reason}); check --host, or pick another --port if "
                             "another program uses this one") from None


def loopback_only(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (127.0.0.1, ::1, localhost)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:  # `listen` reports an unknown host with its own words
        return True
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, limits: ServerLimits, allow_unauthenticated: bool) -> None:
    """Refuse to let other machines reach a server without an API key unless the user insists."""
    if not (limits.api_key or allow_unauthenticated or loopback_only(host)):
        raise SparsezipError(f"--host {host} lets other machines reach this server: set --api_key (or "
                             "$SPARSEZIP_API_KEY), or pass --allow_unauthenticated to serve without a key anyway")


def serve(model: Transformer, tokenizer, dist: Dist, model_path, host: str = "127.0.0.1", port: int = 8000,
          defaults: SamplingParams = SamplingParams(), model_name: str = "sparsezip", max_batch_size: int = 8,
          limits: ServerLimits = ServerLimits()) -> None:
    """Serve until Ctrl-C. Rank 0 runs the HTTP server; under torchrun the other ranks follow its worker."""
    limits.check()
    check_batch_size(max_batch_size)
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
    engine = Engine(model, tokenizer, dist, eos, max_batch_size, limits.max_queue)
    info = ServerInfo(model_name, defaults, model.args.max_position_embeddings, int(time.time()), limits)
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
