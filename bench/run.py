"""Generation benchmark (`make bench-run`): transformers vs sparsezip on CPU; writes a section of BENCHMARKS.md.

Two models: the demo model (SmolLM2-135M-Instruct) and a random model shaped like a real 1B one (hidden 2048,
24 layers, 32 query / 4 KV heads, MLP 5632; Llama architecture, the demo tokenizer). Each is pruned to 50% by
magnitude with L2 rounding (speed does not depend on the values, but the sparse layout's width does, and L2
rounding is what float_sparse outputs) and compressed at TP 1. Engines, each in its own process so its resident
memory is its own:
  transformers  AutoModelForCausalLM in fp32 on the dense folder, its own forward with a DynamicCache (no
                generate() overhead: the strongest baseline)
  sparsezip     our model on the dense folder
  W16A16SC/dense, W16A16SC/sparse, W16A16SC/compressed  our model on the compressed folder, in each weight mode
Measured: prefill tokens/s (batch 1), decode tokens/s at batch 1 and 8 (all rows' tokens per second), and
resident memory (RSS growth while loading; and the weights' bytes). Ratios are to transformers in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from measure import write_section  # noqa: E402

ENGINES = ["transformers", "sparsezip", "W16A16SC/dense", "W16A16SC/sparse", "W16A16SC/compressed"]
LARGE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
             num_key_value_heads=4)


def sparsezip_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sparsezip", "-q", *args], check=True)


def make_large_model(folder: Path, demo: Path, layers: int) -> Path:
    """A random Llama-architecture fp16 model of the LARGE shape, with the demo model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = LlamaConfig(**{**LARGE, "num_hidden_layers": layers}, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, torch_dtype="float16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).half()  # transformers initialises N(0, 0.02): a plausible weight scale
    model.save_pretrained(tmp)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (demo / name).exists():
            shutil.copy(demo / name, tmp / name)
    tmp.rename(folder)
    return folder


def prepare(work: Path, large_layers: int) -> dict[str, dict[str, Path]]:
    """{model label: {"dense": folder, "packed": W16A16SC folder}}, built once and cached under `work`."""
    from sparsezip_demo.assets import demo_model_dir

    demo = demo_model_dir()
    models = {"SmolLM2-135M (demo)": demo}
    if large_layers:
        models[f"random 2048x{large_layers} GQA"] = make_large_model(work / f"large{large_layers}", demo, large_layers)
    out = {}
    for i, (label, dense) in enumerate(models.items()):
        sparse, packed = work / f"m{i}-sparse", work / f"m{i}-l2-packed"
        if not packed.exists():
            print(f"preparing {label}: magnitude 50% + L2 rounding and compress", file=sys.stderr)
            sparsezip_cli("sparsify", "--model_path", str(dense), "--save_path", str(sparse), "--method",
                          "magnitude", "--sparsity", "0.5", "--rounding", "l2", "--overwrite")
            sparsezip_cli("compress", "--model_path", str(sparse), "--save_directory", str(packed), "--overwrite")
            shutil.rmtree(sparse)
        out[label] = {"dense": dense, "packed": packed}
    return out


# ------------------------------------------------------------------ worker (one engine, one process)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker(engine: str, folder: Path, prompt_len: int, new_tokens: int) -> dict:
    import torch

    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (prompt_len,)).tolist()
    before = rss()
    if engine == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        run = lambda batch, tokens=new_tokens: hf_generate(model, prompt, batch, tokens)
    else:
        from transformers import AutoTokenizer

        from sparsezip.runtime import load_model, weight_bytes

        model = load_model(folder, weights=engine.split("/")[1] if "/" in engine else "dense")
        weights = weight_bytes(model)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        run = lambda batch, tokens=new_tokens: our_generate(model, tokenizer, prompt, batch, tokens)
    loaded = rss() - before
    run(1, 4)  # warm-up: first-call allocations and kernel selection are not what we measure
    prefill_s, decode1 = run(1)
    _, decode8 = run(8)
    return {"prefill": prompt_len / prefill_s, "decode1": decode1, "decode8": decode8,
            "rss_mib": loaded / 2**20, "weights_mib": weights / 2**20}


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


# ------------------------------------------------------------------ driver


def measure(engine: str, folders: dict[str, Path], args) -> dict:
    folder = folders["dense"] if engine in ("transformers", "sparsezip") else folders["packed"]
    cmd = [sys.executable, __file__, "--worker", engine, "--folder", str(folder), "--prompt_len",
           str(args.prompt_len), "--new_tokens", str(args.new_tokens)]
    print(f"  {engine} ...", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{engine} failed on {folder}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> str:
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {psutil.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, no GPU")


def report(results: dict, args, seconds: float) -> str:
    from sparsezip.kernels import cpu

    lines = [
        "## Generation speed and memory on CPU (`make bench-run`)", "",
        f"Machine: {machine()}.  ",
        f"Command: `make bench-run` (`python bench/run.py --large_layers {args.large_layers} --prompt_len "
        f"{args.prompt_len} --new_tokens {args.new_tokens}`), {seconds / 60:.0f} min.  ",
        f"Date: {datetime.date.today().isoformat()}. Native fp16 GEMV: {'yes' if cpu.available() else 'no'}.",
        "",
        "Prompt of random token ids; greedy decode; decode tokens/s counts every row of the batch. transformers runs "
        "in fp32 (its fastest CPU mode here) with its own KV cache, on the dense folder; sparsezip on the dense folder "
        "and on the magnitude-50% + L2-rounded W16A16SC folder in each weight mode (dense: fp16; sparse: bitmap + E5M2 "
        "bytes; compressed: huff-v2 tiles). Resident = RSS growth while loading; weights "
        "= bytes of the weights the engine holds. Ratios are to transformers, measured in the same run.", "",
    ]
    for label, rows in results.items():
        base = rows["transformers"]
        lines += [f"**{label}**", "",
                  "| engine | prefill tok/s | decode tok/s, batch 1 | decode tok/s, batch 8 | resident MiB | weights MiB |",
                  "|---|---|---|---|---|---|"]
        for engine, r in rows.items():
            ratio = lambda key: "" if engine == "transformers" else f" ({r[key] / base[key]:.2f}x)"
            lines.append(f"| {engine} | {r['prefill']:.0f}{ratio('prefill')} | {r['decode1']:.1f}{ratio('decode1')} | "
                         f"{r['decode8']:.1f}{ratio('decode8')} | {r['rss_mib']:.0f}{ratio('rss_mib')} | "
                         f"{r['weights_mib']:.0f}{ratio('weights_mib')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="BENCHMARKS.md to update (section 'run'); default: print only")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench-run", help="model cache folder")
    p.add_argument("--large_layers", type=int, default=24, help="layers of the large random model (0 = skip it)")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.prompt_len, args.new_tokens)))
        return
    start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for label, folders in prepare(args.work, args.large_layers).items():
        print(label, file=sys.stderr)
        results[label] = {engine: measure(engine, folders, args) for engine in ENGINES}
    text = report(results, args, time.perf_counter() - start)
    print(text)
    if args.out:
        write_section(args.out, "run", text)


if __name__ == "__main__":
    main()
