"""Memory (and speed) of sparsezip folders loaded through transformers (`make bench-integrations`): the demo model
dense as transformers loads it, next to its W16A16S and W16A16SC (one part) folders loaded by
`AutoModelForCausalLM.from_pretrained` after `import sparsezip`, in each weight layout. Writes the
"integrations" section of BENCHMARKS.md.

Each configuration runs in its own process, so the resident memory it reports is its own: weights = the bytes
the loaded model holds for its tensors (our layouts' own bytes, every other parameter, the shared scratch
buffer once); RSS = the process's resident memory after loading minus before. Decode speed is transformers'
`generate` (greedy, batch 1), overhead included; the machine is shared, so compare rows of one run only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import write_section  # noqa: E402
from run import machine, rss, sparsezip_cli  # noqa: E402

PROMPT = "What's deep learning?"
CONFIGS = (  # (label, folder key, dtype for a dense folder or sparsezip layout)
    ("transformers, dense folder, fp32", "dense", "float32"),
    ("transformers, dense folder, fp16", "dense", "float16"),
    ("transformers + sparsezip, W16A16S, dense layout", "sparse", "dense"),
    ("transformers + sparsezip, W16A16S, sparse layout", "sparse", "sparse"),
    ("transformers + sparsezip, W16A16SC, sparse layout", "compressed", "sparse"),
    ("transformers + sparsezip, W16A16SC, compressed layout", "compressed", "compressed"),
)


def folders(work: Path) -> dict[str, Path]:
    """The demo model pruned with Wanda 50% + L2 rounding and compressed at TP 1; cached. (Memory depends on the
    sparsity and the rounding, not on which weights the method keeps; Wanda takes a minute, float_sparse ten.)"""
    from sparsezip_demo.assets import austen_files, demo_model_dir

    dense = demo_model_dir()
    sparse, compressed = work / "w16a16s", work / "w16a16sc"
    if not sparse.exists():
        sparsezip_cli("sparsify", "--model_path", str(dense), "--save_path", str(sparse), "--method", "wanda",
                      "--rounding", "l2", "--sparsity", "0.5", "--calib", str(austen_files(["emma"])[0]), "--calib_samples", "8",
                      "--calib_seqlen", "256")
    if not compressed.exists():
        sparsezip_cli("compress", "--model_path", str(sparse), "--save_directory", str(compressed), "--tp", "1")
    return {"dense": dense, "sparse": sparse, "compressed": compressed}


def worker(folder: str, setting: str, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparsezip  # noqa: F401  (registers the quantizer)
    from sparsezip.integrations.hf_quantizer import SparsezipConfig
    from sparsezip.runtime import weight_bytes

    before, t0 = rss(), time.perf_counter()
    if setting in ("float32", "float16"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, setting))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SparsezipConfig(weights=setting))
    load_s, loaded = time.perf_counter() - t0, rss() - before
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    t1 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - t1
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"weights_mib": weight_bytes(model) / 2**20, "rss_mib": loaded / 2**20, "load_s": load_s,
            "tok_s": new_tokens / seconds, "answer": " ".join(answer.split())}


def measure(folder: Path, setting: str, threads: int, new_tokens: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--worker", str(folder), setting, str(new_tokens)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(rows: list[tuple[str, dict]], args, seconds: float) -> str:
    base = rows[0][1]
    lines = [
        "## transformers loading sparsezip folders: memory",
        "",
        f"Command: `make bench-integrations` ({datetime.date.today().isoformat()}, {seconds / 60:.1f} min). "
        f"Machine: {machine()}. {args.threads} thread(s).",
        "",
        "Demo model (SmolLM2-135M-Instruct), Wanda 50% + L2 rounding, compressed with nibble-v3 at TP 1; the "
        "linears of the 30 decoder layers are what sparsezip holds in its layouts; with sparsezip the embedding "
        "(tied to the output head) stays fp16 as stored, converted per use; the norms are fp32. Weights = bytes the "
        "model holds; RSS = resident memory the load added; generate = greedy decode of "
        f"{args.new_tokens} tokens at batch 1 with transformers' `generate`.",
        "",
        "| loaded as | weights MiB | vs fp32 | RSS MiB | load s | generate tok/s | vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['weights_mib']:.0f} | {r['weights_mib'] / base['weights_mib']:.2f}× | "
                     f"{r['rss_mib']:.0f} | {r['load_s']:.1f} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}× |")
    lines += ["", "Answers to \"What's deep learning?\" (greedy):", ""]
    lines += [f"- {label}: {r['answer']}" for label, r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--work", type=Path, default=Path("out/bench-integrations"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return
    start = time.perf_counter()
    paths = folders(args.work)
    rows = []
    for label, key, setting in CONFIGS:
        print(f"  {label}", file=sys.stderr, flush=True)
        rows.append((label, measure(paths[key], setting, args.threads, args.new_tokens)))
    write_section(args.out, "integrations", report(rows, args, time.perf_counter() - start))
    print(f"wrote the integrations section of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
