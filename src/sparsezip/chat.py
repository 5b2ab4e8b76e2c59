"""`sparsezip chat`: an interactive multi-turn conversation in the model's chat template, streamed."""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from .errors import SparsezipError
from .generate import SamplingParams, chat_ids, generate_batch, stop_ids
from .model import Transformer
from .tp import Dist, broadcast_object

HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def read_stdin_line(prompt: str) -> str | None:
    """The next line typed by the user, or None at end of input. Bytes that are not UTF-8 come through as lone
    surrogates, which the prompt's check (generate.check_text) turns into an error the session survives."""
    if hasattr(sys.stdin, "reconfigure") and sys.stdin.errors != "surrogateescape":  # only before the first read
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        return input(prompt)
    except EOFError:
        return None


def chat_loop(model: Transformer, tokenizer, params: SamplingParams, dist: Dist, model_dir,
              system: str | None = None, read_line: Callable[[str], str | None] = read_stdin_line,
              out: TextIO = sys.stdout) -> list[dict]:
    """Run the conversation until /exit or end of input; returns the final history (for tests).

    Under torchrun only rank 0 reads and prints; every rank generates the same reply from the same history.
    """
    say = (lambda text, end="\n": print(text, end=end, file=out, flush=True)) if dist.is_main else (
        lambda text, end="\n": None)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    eos = stop_ids(tokenizer, model_dir)
    say(HELP)
    while True:
        line = broadcast_object(read_line("> ") if dist.is_main else None, dist)
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(start)
            say("(new conversation)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt = chat_ids(tokenizer, history)
            reply = generate_batch(model, tokenizer, [prompt], params, eos, on_text=lambda _, t: say(t, end=""))[0]
        except SparsezipError as e:  # e.g. the conversation outgrew the context: keep the session alive
            history.pop()
            say(f"\nerror: {e} (type /reset to start over)")
            continue
        say("")
        history.append({"role": "assistant", "content": reply.text})
    return history
