"""Text generation with our model: chat template, batched prefill, cached decode, sampling, stop strings,
streaming text, run_pa-style timings."""

from __future__ import annotations

import logging
import math
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .errors import SparsezipError
from .model import Transformer

log = logging.getLogger("sparsezip")

# called with (prompt index, new text) as soon as text is final (no partial character, no possible stop string)
OnText = Callable[[int, str], None]


def check_text(text: str) -> str:
    """Text a tokenizer can take: bytes that were not UTF-8 reach Python as lone surrogates (from the command line,
    a terminal, JSON's \\ud800), which tokenizers reject with an error about their input types."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SparsezipError(f"the text is not valid UTF-8: an undecodable byte or lone surrogate at character "
                             f"{e.start}") from None
    return text


def prompt_ids(tokenizer, text: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, wrapped in the model's chat template when it has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(check_text(text))["input_ids"]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the model's chat template, ending where the assistant's turn begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise SparsezipError("this model's tokenizer has no chat template; use `sparsezip run` for plain prompts")
    for message in messages:
        if isinstance(message.get("content"), str):
            check_text(message["content"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def stop_ids(tokenizer, model_dir) -> set[int]:
    """EOS ids from the tokenizer and generation_config.json (which may list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    return ids


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 is greedy (and then top_k/top_p do nothing)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the answer
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    seed: int = 0

    def check(self) -> None:
        """Refuse settings that would crash or silently misbehave deep inside the decode loop."""
        if self.max_new_tokens < 1:
            raise SparsezipError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SparsezipError(f"temperature must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SparsezipError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SparsezipError(f"top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SparsezipError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise SparsezipError("stop strings must not be empty")
        if not -2**63 <= self.seed < 2**63:
            raise SparsezipError(f"seed must fit in 64 bits (-2**63 to 2**63 - 1), got {self.seed}")


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prefill_s: float  # of the whole batch this prompt ran in
    decode_s: float
    decode_steps: int  # forward passes after the prefill (one new token per prompt of the batch each)

    @property
    def decode_rate(self) -> float:
        """Tokens per second of this prompt while decoding (the batch makes one token per row per step)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


class TextStream:
    """Turns one sequence's tokens into text as they come: holds back an unfinished UTF-8 character and any
    tail that could still grow into a stop string, and ends the text before a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.text = ""  # final text so far (what has been emitted)
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly final text ('' while holding back)."""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            cut = full.find(s, max(0, len(self.text) - len(s)))
            if cut >= 0:
                self.stopped = True
                return self._emit(full[:cut])
        if full.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        return self._emit(full[: len(full) - self._held_tail(full)])

    def finish(self) -> str:
        """The text held back at the end (no stop string can complete any more)."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _held_tail(self, full: str) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        new, self.text = upto[len(self.text):], upto
        return new


def check_batch_size(max_batch_size: int) -> None:
    if max_batch_size < 1:
        raise SparsezipError(f"--max_batch_size must be at least 1, got {max_batch_size}")


@torch.no_grad()
def generate_batch(model: Transformer, tokenizer, prompts: list[list[int]], params: SamplingParams,
                   eos: set[int], on_text: OnText | None = None, max_batch_size: int = 8,
                   cancelled: Callable[[], bool] | None = None) -> list[Generation]:
    """Generate for every prompt, `max_batch_size` prompts at a time (left-padded into one batch); stop early,
    with what is there, as soon as `cancelled()` says nobody waits for the answers any more."""
    params.check()
    check_batch_size(max_batch_size)
    if any(not p for p in prompts):
        raise SparsezipError("a prompt is empty after tokenization")
    results: list[Generation] = []
    for start in range(0, len(prompts), max_batch_size):
        chunk = prompts[start:start + max_batch_size]
        emit = None if on_text is None else (lambda i, text, base=start: on_text(base + i, text))
        results += _generate_chunk(model, tokenizer, chunk, params, eos, emit, cancelled)
    return results


def _generate_chunk(model: Transformer, tokenizer, prompts: list[list[int]], params: SamplingParams,
                    eos: set[int], on_text: OnText | None, cancelled: Callable[[], bool] | None) -> list[Generation]:
    device = model.model.norm.weight.device
    batch, width = len(prompts), max(map(len, prompts))
    total = width + params.max_new_tokens
    check_context(model, total)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)  # [B] left padding
    tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = torch.tensor(p, device=device)
    key_padding = torch.arange(total, device=device)[None, :] >= pads[:, None]  # [B, total] real tokens
    sampler = Sampler(params, model.args.vocab_size, tokens, key_padding[:, :width], device)
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    finish = [""] * batch

    model.setup_cache(batch, total)
    try:
        t0 = time.perf_counter()
        slots = torch.arange(width, device=device)
        logits = model(tokens, slots, key_padding, positions=(slots[None, :] - pads[:, None]).clamp(min=0),
                       last_only=True)[:, -1]
        t1 = time.perf_counter()
        steps = 0
        with torch_ops_on_one_thread(device):
            for step in range(params.max_new_tokens):
                next_ids = sampler.pick(logits)  # [B]
                take_tokens(next_ids.tolist(), streams, finish, eos, on_text)
                if all(finish) or step == params.max_new_tokens - 1 or (cancelled is not None and cancelled()):
                    break
                slot = torch.tensor([width + step], device=device)
                logits = model(next_ids[:, None], slot, key_padding, positions=(slot - pads)[:, None])[:, -1]
                steps += 1
        decode_s = time.perf_counter() - t1
    finally:
        model.clear_cache()

    results = []
    for b, stream in enumerate(streams):
        tail = stream.finish()
        if tail and on_text:
            on_text(b, tail)
        results.append(Generation(len(prompts[b]), stream.tokens, stream.text, finish[b] or "length",
                                  t1 - t0, decode_s, steps))
    return results


def take_tokens(tokens: list[int], streams: list[TextStream], finish: list[str], eos: set[int],
                on_text: OnText | None) -> None:
    """Give each unfinished row its new token: EOS finishes the row, other tokens extend its text (streamed)."""
    for b, token in enumerate(tokens):
        if finish[b]:
            continue
        if token in eos:
            finish[b] = "stop"
            continue
        text = streams[b].push(token)
        if text and on_text:
            on_text(b, text)
        if streams[b].stopped:
            finish[b] = "stop"


@contextmanager
def torch_ops_on_one_thread(device: torch.device) -> Iterator[None]:
    """Run torch's own ops on one CPU thread while decoding. A decode step's torch ops (norms, attention over a
    few queries, sampling) are tiny, and waking a sleeping OpenMP team for each costs more than the op. The matrix
    products run in the native kernels, which keep their own threads (kernels/cpu)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_context(model: Transformer, total: int) -> None:
    limit = model.args.max_position_embeddings
    if limit and total > limit:
        raise SparsezipError(f"prompt plus new tokens ({total}) exceed the model's context of {limit} tokens; "
                             "shorten the prompt or ask for fewer new tokens")


@dataclass
class Sampler:
    """Picks the next token of every row: repetition penalty, then greedy or temperature/top-k/top-p sampling.

    Greedy needs no random numbers, so it gives the same tokens in any batch and on any folder kind of the
    same weights; sampling is seeded, and every tensor-parallel rank draws the same token from the same logits.
    """

    params: SamplingParams
    vocab: int
    prompt: torch.Tensor  # [B, T] token ids
    real: torch.Tensor  # [B, T] True where prompt holds a real token (not padding)
    device: torch.device | str
    seen: torch.Tensor = field(init=False)  # [B, vocab] tokens in the prompt or the answer so far
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        self.seen = torch.zeros(len(self.prompt), self.vocab, dtype=torch.bool, device=self.device)
        # padding slots repeat the row's last (real: padding is on the left) token, so they add nothing
        self.seen.scatter_(1, torch.where(self.real, self.prompt, self.prompt[:, -1:]), True)
        self.generator = torch.Generator(device=self.device).manual_seed(self.params.seed)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, vocab] -> token ids [B]."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0:  # the CTRL rule: shrink the logit of every token already seen
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.temperature <= 0:
            chosen = logits.argmax(-1)
        else:
            # relative to the top logit (so at most 0), in float64 (which holds any temperature a float can say):
            # a tiny temperature then gives 0 and -inf, where float32 had made inf and NaN of it
            scaled = (logits - logits.amax(-1, keepdim=True)).double() / p.temperature
            chosen = torch.multinomial(torch.softmax(truncate(scaled, p.top_k, p.top_p), -1), 1,
                                       generator=self.generator)[:, 0]
        self.seen.scatter_(1, chosen[:, None], True)
        return chosen


def truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top_k and outside the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability mass ranked above each token
        beyond = before >= top_p
        beyond[:, 0] = False  # the top token always stays, even for a top_p that is 0 in float32
        drop = torch.zeros_like(ordered, dtype=torch.bool).scatter(1, order, beyond)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def memory_mb(device: str) -> float:
    """Memory in use now: resident (RSS) on the CPU, allocated on a GPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
