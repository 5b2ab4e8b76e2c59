"""Text generation with our model: chat template, prefill, cached greedy/sampled decode, run_pa-style output."""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import torch

from .model import Transformer

log = logging.getLogger("sparsezip")


def prompt_ids(tokenizer, text: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, wrapped in the model's chat template when it has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(text)["input_ids"]


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


@dataclass
class Generation:
    tokens: list[int]
    prefill_s: float
    decode_s: float


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, stop: set[int],
             temperature: float = 0.0, seed: int = 0) -> Generation:
    """Prefill the prompt, then decode one token at a time over a preallocated KV cache."""
    device = model.model.norm.weight.device
    tokens = torch.tensor([prompt], device=device)
    model.setup_cache(1, len(prompt) + max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[int] = []
    t0 = time.perf_counter()
    logits = model(tokens, torch.arange(len(prompt), device=device))[:, -1]
    t1 = time.perf_counter()
    pos = len(prompt)
    try:
        while len(out) < max_new_tokens:
            next_id = pick_token(logits, temperature, generator)
            out.append(next_id)
            if next_id in stop or len(out) == max_new_tokens:
                break
            logits = model(torch.tensor([[next_id]], device=device), torch.tensor([pos], device=device))[:, -1]
            pos += 1
    finally:
        model.clear_cache()
    return Generation(out, t1 - t0, time.perf_counter() - t1)


def pick_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0 (deterministic across folder kinds), else sample."""
    if temperature <= 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
