"""Generation benchmark (`make bench-run`): sparsezip's weight layouts against llama.cpp and transformers on CPU,
each figure next to its memory-bandwidth limit; writes a section of BENCHMARKS.md and docs/decode_vs_size.png.

Models: the demo model (SmolLM2-135M-Instruct), the real Qwen2.5-Coder-1.5B (`make models`), and a random model
shaped like a 1.2B Llama (hidden 2048, 24 layers, 32 query / 4 KV heads, MLP 5632; the demo tokenizer). Each is
pruned to 50% by magnitude, once with L2 rounding (E5M2 values, what float_sparse outputs) and once without
(fp16 values), and compressed at TP 1 (speed does not depend on which weights are pruned, the sparse layout's
width and the codecs' bits do).

Engines, each in its own process so that its resident memory is its own:
  llama.cpp F16 / Q8_0 / Q4_0  llama-cpp-python on GGUFs exported from the same fp16 folder (bench/llamacpp.py;
                               F16 holds exactly the same weights), when .venv-peers exists
  transformers fp32            its own forward with a DynamicCache (no generate() overhead)
  dense fp16                   sparsezip on the unpruned folder
  sparse (fp16 values)         sparsezip --weights sparse on the 50% folder without rounding
  sparse (E5M2)                sparsezip --weights sparse on the 50% + L2 folder
  compressed nibble-v3 / huff-v2   sparsezip --weights compressed on the 50% + L2 folder, per codec
Measured per thread count: prefill tokens/s (batch 1), greedy decode tokens/s at batch 1 and 8 (all rows), resident
memory. The limit of a decode step is the read bandwidth (a C loop over 512 MiB) divided by the bytes a step reads:
every linear as held (layout bytes), the output head, one embedding row and the KV cache at mid-decode. The
bandwidth is probed right before and right after each engine's run at its thread count, and a row's limit uses the
higher of its two probes: on a shared machine it can swing by a factor of two within minutes, and one probe at the
start made rows measured later read "more than their limit".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
import llamacpp  # noqa: E402
from measure import write_section  # noqa: E402

LARGE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
             num_key_value_heads=4)
MODELS = ("demo", "qwen1.5b", "random1.2b")
PLOT = REPO / "docs" / "decode_vs_size.png"


@dataclass(frozen=True)
class Engine:
    label: str
    kind: str    # "llama.cpp", "transformers" or "sparsezip"
    folder: str  # which prepared folder: dense, sparse_fp16, sparse_l2, packed_nibble, packed_huff, or a GGUF name
    weights: str = "dense"  # sparsezip's --weights


ENGINES = (
    Engine("llama.cpp F16", "llama.cpp", "f16.gguf"),
    Engine("llama.cpp Q8_0", "llama.cpp", "q8_0.gguf"),
    Engine("llama.cpp Q4_0", "llama.cpp", "q4_0.gguf"),
    Engine("transformers fp32", "transformers", "dense"),
    Engine("sparsezip dense fp16", "sparsezip", "dense"),
    Engine("sparse 50%, fp16 values", "sparsezip", "packed_fp16", "sparse"),
    Engine("sparse 50% + L2 (E5M2)", "sparsezip", "packed_nibble", "sparse"),
    Engine("compressed nibble-v3, 50% + L2", "sparsezip", "packed_nibble", "compressed"),
    Engine("compressed huff-v2, 50% + L2", "sparsezip", "packed_huff", "compressed"),
)
BASELINE = "sparsezip dense fp16"


# ------------------------------------------------------------------ preparing folders


def sparsezip_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sparsezip", "-q", *args], check=True)


def make_large_model(folder: Path, demo: Path, shape: dict = LARGE) -> Path:
    """A random Llama-architecture fp16 model of `shape`, with the demo model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = LlamaConfig(**shape, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                         torch_dtype="float16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).half()  # transformers initialises N(0, 0.02): a plausible weight scale
    model.save_pretrained(tmp)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (demo / name).exists():
            shutil.copy(demo / name, tmp / name)
    tmp.rename(folder)
    return folder


def source_folder(model: str, work: Path) -> Path:
    from sparsezip_demo.assets import demo_model_dir

    if model == "demo":
        return demo_model_dir()
    if model == "qwen1.5b":
        from sparsezip_demo.models import fetch

        return fetch("qwen2.5-coder-1.5b")
    return make_large_model(work / "random1.2b-fp16", demo_model_dir())


def pruned(dense: Path, work: Path, rounding: str) -> Path:
    """`dense` pruned to 50% by magnitude with `rounding`, cached as work/magnitude50-<rounding>."""
    folder = work / f"magnitude50-{rounding}"
    if not folder.exists():
        print(f"  magnitude 50%, rounding {rounding}: {dense.name}", file=sys.stderr, flush=True)
        sparsezip_cli("sparsify", "--model_path", str(dense), "--save_path", str(folder), "--method", "magnitude",
                      "--sparsity", "0.5", "--rounding", rounding, "--overwrite")
    return folder


def packed(dense: Path, work: Path, rounding: str, codec: str) -> Path:
    """The 50% folder of `rounding` compressed with `codec`, cached as work/packed-<rounding>-<codec>."""
    folder = work / f"packed-{rounding}-{codec}"
    if not folder.exists():
        print(f"  compress ({codec}): {folder.name}", file=sys.stderr, flush=True)
        sparsezip_cli("compress", "--model_path", str(pruned(dense, work, rounding)), "--save_directory",
                      str(folder), "--codec", codec, "--overwrite")
    return folder


def prepare(model: str, work: Path, with_llamacpp: bool) -> dict[str, Path]:
    """Every folder and GGUF one model's engines read, built once and cached under work/model."""
    root = work / model
    root.mkdir(parents=True, exist_ok=True)
    dense = source_folder(model, work)
    folders = {"dense": dense,
               "packed_fp16": packed(dense, root, "none", "nibble-v3"),
               "packed_nibble": packed(dense, root, "l2", "nibble-v3"),
               "packed_huff": packed(dense, root, "l2", "huff-v2")}
    for rounding in ("none", "l2"):  # every packed folder exists: the pruned ones only take disk space now
        shutil.rmtree(root / f"magnitude50-{rounding}", ignore_errors=True)
    if with_llamacpp:
        gguf_dir = root / "gguf"
        if not all((gguf_dir / f"{q}.gguf").exists() for q in llamacpp.QTYPES):
            print(f"  GGUF F16/Q8_0/Q4_0 of {dense.name}", file=sys.stderr, flush=True)
            llamacpp.export_all(dense, gguf_dir)
        folders.update({f"{q}.gguf": gguf_dir / f"{q}.gguf" for q in llamacpp.QTYPES})
    return folders


# ------------------------------------------------------------------ bytes a decode step reads


def kv_bytes(layers: int, kv_heads: int, head_dim: int, context: int, element: int) -> int:
    return 2 * layers * kv_heads * head_dim * context * element


def model_shape(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    heads = config["num_attention_heads"]
    return {"layers": config["num_hidden_layers"], "kv_heads": config.get("num_key_value_heads", heads),
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads, "hidden": config["hidden_size"],
            "tied": config.get("tie_word_embeddings", False)}


def gguf_step_bytes(path: Path, tied: bool) -> int:
    """Bytes of a GGUF's tensors that a decode step reads: all but the token table, unless it is also the head."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    has_output = any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or (tied and not has_output))


def sparsezip_step_bytes(model) -> int:
    """Layout bytes of every linear (the untied head included), the tied head's table, and fp32 norms."""
    from sparsezip.layouts.base import WeightLayout

    total = sum(m.resident_bytes() for m in model.modules() if isinstance(m, WeightLayout))
    if model.args.tie_word_embeddings:
        head = model.head_weight
        total += head.numel() * head.element_size()
    return total + sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)


def transformers_step_bytes(model) -> int:
    """Every parameter but the token table (unless tied: then it is the head)."""
    table = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is table
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not table or tied)


# ------------------------------------------------------------------ one engine in one process


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker(spec: dict) -> dict:
    threads = spec["threads"]
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by sparsezip's kernels: set before they are asked
    if spec["kind"] == "sparsezip":
        from sparsezip.cli import prefer_passive_openmp

        prefer_passive_openmp()  # as the sparsezip command does
    import torch

    torch.set_num_threads(threads)
    prompt = llamacpp.default_prompt(spec["prompt_len"])
    folder = Path(spec["folder"])
    before = rss()
    if spec["kind"] == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        weights, step_bytes = transformers_step_bytes(model), transformers_step_bytes(model)
        kv_element = 4
        run = lambda batch, tokens=spec["new_tokens"]: hf_generate(model, prompt, batch, tokens)
    else:
        from transformers import AutoTokenizer

        from sparsezip.runtime import load_model, weight_bytes

        model = load_model(folder, weights=spec["weights"])
        weights, step_bytes = weight_bytes(model), sparsezip_step_bytes(model)
        kv_element = 4  # the cache holds the compute dtype, fp32
        tokenizer = AutoTokenizer.from_pretrained(folder)
        run = lambda batch, tokens=spec["new_tokens"]: our_generate(model, tokenizer, prompt, batch, tokens)
    loaded = rss() - before
    run(1, 4)  # warm-up: first-call allocations and kernel selection are not what we measure
    prefill_s, decode1 = run(1)
    _, decode8 = run(8)
    return {"prefill": spec["prompt_len"] / prefill_s, "decode1": decode1, "decode8": decode8,
            "resident_mib": loaded / 2**20, "weights_mib": weights / 2**20, "step_bytes": step_bytes,
            "kv_element": kv_element}


def hf_generate(model, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s over all rows) with transformers' own forward and KV cache."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([prompt] * batch)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        cache, step = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens - 1):
            out = model(step, past_key_values=cache, use_cache=True)
            cache, step = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return t1 - t0, batch * (new_tokens - 1) / (t2 - t1)


def our_generate(model, tokenizer, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, float]:
    from sparsezip.generate import SamplingParams, generate_batch

    gen = generate_batch(model, tokenizer, [prompt] * batch, SamplingParams(max_new_tokens=new_tokens), set(),
                         max_batch_size=batch)[0]
    return gen.prefill_s, batch * gen.decode_rate


def llamacpp_measure(gguf: Path, spec: dict) -> dict:
    """llama.cpp in fresh processes (batch 1, then batch 8). Decode tokens/s from wall time around its step loop,
    a Python argmax per step included, as in our own loop."""
    prompt = llamacpp.default_prompt(spec["prompt_len"])
    one = llamacpp.generate(gguf, prompt, spec["new_tokens"], spec["threads"], 1)
    eight = llamacpp.generate(gguf, prompt, spec["new_tokens"], spec["threads"], 8)
    return {"prefill": one["prefill_wall_tok_s"], "decode1": one["decode_wall_tok_s"],
            "decode8": eight["decode_wall_tok_s"], "resident_mib": one["load_rss_mib"],
            "weights_mib": gguf.stat().st_size / 2**20, "step_bytes": gguf_step_bytes(gguf, spec["tied"]),
            "kv_element": 2}


def measure(engine: Engine, folders: dict[str, Path], threads: int, args, tied: bool) -> dict:
    spec = {"kind": engine.kind, "folder": str(folders[engine.folder]), "weights": engine.weights,
            "threads": threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "tied": tied}
    print(f"  {engine.label}, {threads} thread(s) ...", file=sys.stderr, flush=True)
    if engine.kind == "llama.cpp":
        return llamacpp_measure(folders[engine.folder], spec)
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{engine.label} failed on {spec['folder']}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ bandwidth, limits, report


def probe_buffer(mib: int = 512):
    """The buffer read_bandwidth reads: `mib` MiB, far beyond the caches, allocated once per run."""
    import numpy as np

    from sparsezip.kernels import cpu

    cpu.require()
    return np.ones(mib * 2**20 // 8, np.uint64)


def read_bandwidth(buffer, threads: int, repeats: int = 5) -> float:
    """Bytes per second of the best of `repeats` passes of a C loop reading `buffer` on `threads` threads."""
    from sparsezip.kernels import cpu

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        cpu.native.read_sum(buffer, threads)
        best = min(best, time.perf_counter() - t0)
    return buffer.nbytes / best


def measure_between_probes(engine: Engine, folders: dict[str, Path], threads: int, args, tied: bool,
                           buffer) -> dict:
    """measure(), with the read bandwidth at its thread count probed right before and right after it: the row's
    "bandwidth" is the higher of the two, "probes" both."""
    before = read_bandwidth(buffer, threads)
    result = measure(engine, folders, threads, args, tied)
    after = read_bandwidth(buffer, threads)
    return {**result, "bandwidth": max(before, after), "probes": [before, after]}


def limits(r: dict, shape: dict, bandwidth: float, args) -> tuple[float, float]:
    """Decode tokens/s at batch 1 and 8 if a step only read its bytes at the probed bandwidth."""
    context = args.prompt_len + args.new_tokens // 2
    kv = kv_bytes(shape["layers"], shape["kv_heads"], shape["head_dim"], context, r["kv_element"])
    row = shape["hidden"] * 2
    return bandwidth / (r["step_bytes"] + row + kv), 8 * bandwidth / (r["step_bytes"] + 8 * (row + kv))


def machine() -> str:
    import psutil

    from sparsezip.kernels import cpu

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
    level = cpu.describe_level(cpu.features()["level"])
    return (f"{name}, {psutil.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"native kernels at level {level}, Python {platform.python_version()}, no GPU")


def model_table(label: str, rows: dict, shape: dict, args) -> list[str]:
    lines = [f"**{label}** — decode tokens/s (% of the bandwidth limit), ratio to {BASELINE} at the same threads", "",
             "| engine | threads | read GB/s | MB read / token | prefill tok/s | decode b=1 | b=1 vs dense "
             "| decode b=8 | b=8 vs dense | resident MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, threads), r in rows.items():
        base = rows.get((BASELINE, threads))
        limit1, limit8 = limits(r, shape, r["bandwidth"], args)
        ratio = lambda key: f"{r[key] / base[key]:.2f}x" if base else "–"
        lines.append(f"| {name} | {threads} | {r['bandwidth'] / 1e9:.1f} | {r['step_bytes'] / 1e6:.0f} | "
                     f"{r['prefill']:.0f} | "
                     f"{r['decode1']:.1f} ({100 * r['decode1'] / limit1:.0f}%) | {ratio('decode1')} | "
                     f"{r['decode8']:.1f} ({100 * r['decode8'] / limit8:.0f}%) | {ratio('decode8')} | "
                     f"{r['resident_mib']:.0f} |")
    return lines + [""]


def probe_ranges(results: dict) -> str:
    """The lowest and highest probe at each thread count over the whole run, as text."""
    probes: dict[int, list[float]] = {}
    for rows in results.values():
        for (_, threads), r in rows.items():
            probes.setdefault(threads, []).extend(r["probes"])
    return ", ".join(f"{min(p) / 1e9:.1f}-{max(p) / 1e9:.1f} GB/s at {t} thread{'s' * (t > 1)}"
                     for t, p in sorted(probes.items()))


def report(results: dict, shapes: dict, args, seconds: float, notes: list[str]) -> str:
    lines = [
        "## Generation speed, memory and the bandwidth limit on CPU (`make bench-run`)", "",
        f"Machine: {machine()}.  ",
        f"Command: `make bench-run` (`python bench/run.py --models {','.join(args.models)} --threads "
        f"{','.join(map(str, args.threads))} --prompt_len {args.prompt_len} --new_tokens {args.new_tokens}`), "
        f"{seconds / 60:.0f} min.  ",
        f"Date: {datetime.date.today().isoformat()}. Read bandwidth (a C loop over 512 MiB, probed right before and "
        f"after each engine's run; \"read GB/s\" is the higher of a row's two probes, its limit's bandwidth): "
        f"{probe_ranges(results)} over the run.", "",
        "Prompt of fixed pseudo-random token ids; greedy decode; tokens/s counts every row of the batch; wall time "
        "around each engine's own step loop (an argmax per step included). The limit = read bandwidth ÷ bytes a "
        "step reads (every linear as held, the head, one embedding row, the KV cache at mid-decode; at batch 8 the "
        "weights once for 8 rows). Resident = RSS growth while loading. Ratios and percentages come from this one "
        "run; absolute figures drift with this shared machine's load.", "",
        f"![decode tokens/s against resident weight bytes]({PLOT.relative_to(REPO)})", "",
    ]
    for label, rows in results.items():
        lines += model_table(label, rows, shapes[label], args)
    return "\n".join(lines + notes)


def plot(results: dict, path: Path, threads: int) -> None:
    """Decode tokens/s at batch 1 against resident MiB, one panel per model, one point per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.8), squeeze=False)
    for ax, (label, rows) in zip(axes[0], results.items()):
        for (name, t), r in rows.items():
            if t != threads:
                continue
            marker = "s" if name.startswith("llama.cpp") else "^" if name.startswith("transformers") else "o"
            ax.scatter(r["resident_mib"], r["decode1"], marker=marker, s=50)
            ax.annotate(name, (r["resident_mib"], r["decode1"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("resident MiB (weights as held)")
        ax.set_ylabel(f"decode tokens/s, batch 1, {threads} thread(s)")
        ax.grid(alpha=0.3)
    fig.suptitle("Decode speed against memory: up and left is better (■ llama.cpp, ▲ transformers, ● sparsezip)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def label_of(model: str) -> str:
    return {"demo": "SmolLM2-135M (demo)", "qwen1.5b": "Qwen2.5-Coder-1.5B",
            "random1.2b": "random 1.2B Llama shape (2048x24, GQA 32/4)"}[model]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="BENCHMARKS.md to update (section 'run') and write the plot; "
                                            "default: print only")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench-run", help="cache of prepared folders")
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    p.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2],
                   help="comma-separated thread counts (default 1,2)")
    p.add_argument("--engines", type=lambda s: s.split(","), help="only engines whose label contains one of these")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    if args.new_tokens < 2 or args.prompt_len < 1 or not args.threads or min(args.threads) < 1:
        p.error("--new_tokens must be >= 2, --prompt_len >= 1 and every thread count >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    start = time.perf_counter()
    with_llamacpp = llamacpp.peer_python().exists()
    notes = [] if with_llamacpp else ["llama.cpp rows are missing: its venv is not built "
                                      "(`python3 bench/llamacpp.py --setup`)."]
    engines = [e for e in ENGINES if (with_llamacpp or e.kind != "llama.cpp")
               and (not args.engines or any(s in e.label for s in args.engines))]
    buffer = probe_buffer()
    results, shapes = {}, {}
    for model in args.models:
        label = label_of(model)
        print(label, file=sys.stderr, flush=True)
        folders = prepare(model, args.work, with_llamacpp)
        shapes[label] = shape = model_shape(folders["dense"])
        results[label] = {(e.label, t): measure_between_probes(e, folders, t, args, shape["tied"], buffer)
                          for t in args.threads for e in engines}
    text = report(results, shapes, args, time.perf_counter() - start, notes)
    print(text)
    if args.out:
        plot(results, PLOT, max(args.threads))
        write_section(args.out, "run", text)


if __name__ == "__main__":
    main()
