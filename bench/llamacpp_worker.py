"""The llama.cpp side of bench/llamacpp.py; runs only in the peers venv (.venv-peers), one job per process.

Jobs (argv[1]):
  info                                  llama-cpp-python version and llama.cpp's system info (CPU features used)
  quantize IN OUT FTYPE NTHREAD         llama_model_quantize with llama.cpp's default per-tensor choices
  run JSON                              load a GGUF, prefill a prompt of token ids, greedy-decode; timings
  perplexity                            (spec JSON on stdin) next-token NLL of token windows, each scored alone

Prints one JSON line on stdout as its result; llama.cpp's own log goes to stderr.
"""
from __future__ import annotations

import ctypes
import json
import resource
import sys
import time


def info() -> dict:
    """Which llama.cpp this is and which CPU features its build uses."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    return {"llama_cpp_python_imported": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def quantize(src: str, dst: str, ftype: str, nthread: str) -> dict:
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(nthread)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    return {"ok": True}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Session:
    """One model and one context: greedy generation of `rows` identical sequences (one per KV stream)."""

    def __init__(self, gguf: str, threads: int, rows: int, n_ctx_seq: int, prompt_len: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.load_mode = 0  # LLAMA_LOAD_MODE_NONE: read the weights into memory, no mmap
        mparams.lazy_mode = 0
        before = rss_bytes()
        self.model = L.llama_model_load_from_file(gguf.encode(), mparams)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        self.load_rss = rss_bytes() - before
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        cparams = L.llama_context_default_params()
        cparams.n_seq_max = rows
        cparams.kv_unified = False  # one KV stream per sequence: a row attends only to its own cache
        cparams.n_ctx = n_ctx_seq * rows
        cparams.n_batch = cparams.n_ubatch = max(prompt_len * rows, rows)  # the prefill in one ubatch
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise SystemExit("llama_init_from_model failed")
        self.rows = rows
        self.batch = L.llama_batch_init(cparams.n_batch, 0, rows)

    def fill(self, tokens: list[list[int]], start: int, last_only: bool) -> None:
        """Put tokens[row][i] at position start+i of sequence `row`; logits for each row's last token."""
        b, n = self.batch, 0
        for row, ids in enumerate(tokens):
            for i, t in enumerate(ids):
                b.token[n], b.pos[n], b.n_seq_id[n] = t, start + i, 1
                b.seq_id[n][0] = row
                b.logits[n] = (i == len(ids) - 1) or not last_only
                n += 1
        b.n_tokens = n

    def step(self, tokens: list[list[int]], start: int) -> list[int]:
        """Decode one batch and return each row's greedy next token."""
        import numpy as np

        self.fill(tokens, start, last_only=True)
        if self.L.llama_decode(self.ctx, self.batch) != 0:
            raise SystemExit("llama_decode failed (context too small?)")
        out, n = [], 0
        for ids in tokens:
            n += len(ids)
            logits = self.L.llama_get_logits_ith(self.ctx, n - 1)
            out.append(int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax()))
        return out

    def generate(self, prompt: list[int], new_tokens: int) -> dict:
        """Prefill the prompt in every row, then new_tokens - 1 single-token steps (the first new token comes
        from the prefill, as in bench/run.py). Timings from llama.cpp's perf counters and from wall time."""
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        L.llama_perf_context_reset(self.ctx)
        t0 = time.perf_counter()
        nxt = self.step([prompt] * self.rows, 0)
        t1 = time.perf_counter()
        prefill = L.llama_perf_context(self.ctx)
        L.llama_perf_context_reset(self.ctx)
        tokens = [nxt]
        for k in range(new_tokens - 1):
            nxt = self.step([[t] for t in nxt], len(prompt) + k)
            tokens.append(nxt)
        t2 = time.perf_counter()
        perf = L.llama_perf_context(self.ctx)
        # llama.cpp files a 1-token batch under t_eval and a larger one under t_p_eval
        decode_ms, decode_n = (perf.t_eval_ms, perf.n_eval) if self.rows == 1 else (perf.t_p_eval_ms, perf.n_p_eval)
        steps = new_tokens - 1
        return {
            "tokens": [[row[r] for row in tokens] for r in range(self.rows)],
            "prefill_tok_s": len(prompt) * self.rows / (prefill.t_p_eval_ms / 1e3),
            "prefill_wall_tok_s": len(prompt) * self.rows / (t1 - t0),
            "decode_tok_s": decode_n / (decode_ms / 1e3) if decode_ms > 0 else None,
            "decode_wall_tok_s": steps * self.rows / (t2 - t1) if steps > 0 else None,
            "decode_counted": decode_n,
        }


def run(spec_json: str) -> dict:
    """spec: gguf, prompt (ids), new_tokens, threads, rows, warmup (tokens of a warm-up generation; 0 = none)."""
    spec = json.loads(spec_json)
    prompt, new = spec["prompt"], spec["new_tokens"]
    n_ctx_seq = len(prompt) + new + 16
    s = Session(spec["gguf"], spec["threads"], spec["rows"], n_ctx_seq, len(prompt))
    if max(prompt) >= s.n_vocab:
        raise SystemExit(f"prompt token id {max(prompt)} is not below the model's vocabulary size {s.n_vocab}")
    if spec.get("warmup"):
        s.generate(prompt, spec["warmup"])  # first-call allocations and page faults are not what we measure
    result = s.generate(prompt, new)
    result.update(load_rss_mib=s.load_rss / 2**20,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  n_ctx=s.L.llama_n_ctx(s.ctx))
    return result


def window_nll(logits, tokens) -> float:
    """Summed next-token negative log-likelihood of one window, in float64: logits[i] (row i of [L, V]) predicts
    tokens[i + 1]; the last row predicts nothing. Same sum as F.cross_entropy(reduction="sum") in evaluate.py,
    but in float64 so that 0.1% differences between engines are not lost in the summation."""
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)[:-1]
    targets = np.asarray(tokens[1:], dtype=np.int64)
    top = rows.max(axis=1)
    log_norm = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
    return float((log_norm - rows[np.arange(len(targets)), targets]).sum())


def perplexity() -> dict:
    """spec on stdin (a window list is too long for argv): gguf, windows (lists of token ids, equal length),
    threads. Each window is decoded alone from an empty cache, with logits for every position, like
    sparsezip's evaluate.perplexity; returns total NLL and the number of scored tokens."""
    import numpy as np

    spec = json.load(sys.stdin)
    windows = spec["windows"]
    seqlen = len(windows[0])
    s = Session(spec["gguf"], spec["threads"], rows=1, n_ctx_seq=seqlen, prompt_len=seqlen)
    if max(max(w) for w in windows) >= s.n_vocab:
        raise SystemExit(f"a token id is not below the model's vocabulary size {s.n_vocab}")
    L, per_window = s.L, []
    start = time.perf_counter()
    for ids in windows:
        L.llama_memory_clear(L.llama_get_memory(s.ctx), True)
        s.fill([ids], 0, last_only=False)
        if L.llama_decode(s.ctx, s.batch) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(L.llama_get_logits(s.ctx), shape=(len(ids), s.n_vocab))
        per_window.append(window_nll(logits, ids))
    return {"nll": sum(per_window), "tokens": sum(len(w) - 1 for w in windows), "window_nll": per_window,
            "seqlen": seqlen, "seconds": time.perf_counter() - start, "n_ctx": L.llama_n_ctx(s.ctx)}


def main(argv: list[str]) -> int:
    jobs = {"info": info, "quantize": quantize, "run": run, "perplexity": perplexity}
    if not argv or argv[0] not in jobs:
        print(f"usage: llamacpp_worker.py {{{','.join(jobs)}}} ...", file=sys.stderr)
        return 2
    print(json.dumps(jobs[argv[0]](*argv[1:])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
