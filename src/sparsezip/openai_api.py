"""The OpenAI API's side of `sparsezip serve`: request bodies, the JSON error object, the checks of a request
against the server's settings and limits, and the response bodies."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import BaseModel, Field

from .errors import SparsezipError
from .generate import Generation, SamplingParams


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
class ServerLimits:
    """What clients may ask of the server. The defaults suit one machine serving a few users."""

    max_tokens: int = 4096  # the largest max_tokens a request may ask (the context caps it too)
    max_queue: int = 64  # requests waiting or generating; one more is answered 429
    max_body_bytes: int = 1 << 20  # a larger request body is answered 413 before it is read
    api_key: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer <key>"

    def check(self) -> ServerLimits:
        for name, flag in (("max_tokens", "--max_tokens_limit"), ("max_queue", "--max_queue"),
                           ("max_body_bytes", "--max_body_bytes")):
            if getattr(self, name) < 1:
                raise SparsezipError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise SparsezipError("--api_key must not be empty")
        return self


@dataclass(frozen=True)
class ServerInfo:
    """What the request handlers need to know besides the engine."""

    model_name: str
    defaults: SamplingParams
    context: int  # the model's context length in tokens (prompt + new tokens)
    created: int
    limits: ServerLimits = ServerLimits()


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
        max_tokens = min(info.defaults.max_new_tokens, room, info.limits.max_tokens)
    elif max_tokens > info.limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {info.limits.max_tokens}")
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
