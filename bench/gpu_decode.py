"""Decode speed of sparsezip's layouts on a CUDA GPU (run by bench/gpu_check.sh): a random model of the 1.2B Llama
shape of bench/run.py, pruned to 50% by magnitude with L2 rounding (E5M2 values), compressed with each codec that has
a Triton kernel, then greedy decode at batch 1 and 8 in each layout, against the card's copy bandwidth.

Rows: dense fp16 (the unpruned folder; cuBLAS), and `--weights compressed` on the bitmap-v1 and huff-v2 folders
(the fused Triton kernels: the weights stay compressed on the GPU). The CPU's `sparse` layout has no CUDA class.
The limit of a step = copy bandwidth (a device-to-device copy, bytes read + written) ÷ the bytes a step reads
(every linear as held, the head, one embedding row, the KV cache at mid-decode), as in bench/run.py.

  python bench/gpu_decode.py --tokenizer DIR [--work DIR] [--layers 24] [--new_tokens 64] [--prepare_only]
                             [--out BENCHMARKS.md]
Needs a CUDA GPU and triton; exits with a one-line message otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
import run as cpu_bench  # noqa: E402  (folder preparation, step bytes and limits are shared with the CPU benchmark)
from measure import print_and_write  # noqa: E402

SECTION = "gpu-decode"
DENSE = "dense fp16 (cuBLAS)"  # the speed baseline
PRUNED = "dense fp16 (cuBLAS), 50% + L2 weights"  # the same weights as the compressed rows: their tokens' reference
CODECS = ("bitmap-v1", "huff-v2")


def copy_bandwidth(mib: int = 2048, repeats: int = 10) -> float:
    """Bytes per second of the best device-to-device copy of `mib` MiB, counting bytes read plus bytes written."""
    src = torch.randn(mib * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.nbytes / best


def prepare(work: Path, tokenizer: Path, layers: int) -> dict[str, tuple[Path, str]]:
    """{row label: (folder, --weights)}, every folder built once under `work`."""
    shape = dict(cpu_bench.LARGE, num_hidden_layers=layers)
    dense = cpu_bench.make_large_model(work / f"random{layers}l-fp16", tokenizer, shape)
    rows = {DENSE: (dense, "dense"), PRUNED: (cpu_bench.pruned(dense, work, "l2"), "dense")}
    for codec in CODECS:
        t0 = time.perf_counter()
        rows[f"compressed {codec}, 50% + L2 (Triton)"] = (cpu_bench.packed(dense, work, "l2", codec), "compressed")
        print(f"  {codec} folder ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def measure(folder: Path, weights: str, args, device: str = "cuda") -> dict:
    """Decode tokens/s at batch 1 and 8, the tokens of batch 1, weight bytes on the GPU and bytes a step reads
    (device="cpu" only for tests)."""
    from transformers import AutoTokenizer

    from sparsezip.generate import SamplingParams, generate_batch
    from sparsezip.runtime import load_model, weight_bytes

    model = load_model(folder, device=device, weights=weights)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = cpu_bench.llamacpp.default_prompt(args.prompt_len, vocab=min(20000, model.args.vocab_size))

    def rate(batch: int, tokens: int) -> tuple[float, list[int]]:
        gen = generate_batch(model, tokenizer, [prompt] * batch, SamplingParams(max_new_tokens=tokens), set(),
                             max_batch_size=batch)[0]
        return batch * gen.decode_rate, gen.tokens

    rate(1, 4)  # warm-up: Triton compiles its kernels, cuBLAS picks its algorithms
    rate(8, 4)
    decode1, tokens = max(rate(1, args.new_tokens) for _ in range(args.repeats))
    decode8 = max(rate(8, args.new_tokens)[0] for _ in range(args.repeats))
    result = {"decode1": decode1, "decode8": decode8, "tokens": tokens, "weights_mib": weight_bytes(model) / 2**20,
              "step_bytes": cpu_bench.sparsezip_step_bytes(model),
              "kv_element": model.model.norm.weight.element_size()}  # the cache holds the compute dtype
    if args.profile:
        result["profile"] = op_profile(lambda: rate(1, 9))  # a prefill and 8 decode steps
    return result


def op_profile(run) -> str:
    """torch.profiler's table of what `run` spends its host time on, op by op, with the GPU's time per op beside
    it: tells a step that waits on the host's launches from one that waits on its kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50)


def same_tokens(label: str, results: dict) -> str:
    if label == DENSE or label == PRUNED:
        return "–"
    return "yes" if results[label]["tokens"] == results[PRUNED]["tokens"] else "no"


def report(results: dict, shape: dict, bandwidth: float, args, device_name: str) -> str:
    base = results[DENSE]
    lines = [
        f"GPU: **{device_name}**; copy bandwidth {bandwidth / 1e12:.2f} TB/s (device-to-device, read + write). "
        f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.  ",
        f"Command: `python bench/gpu_decode.py {' '.join(sys.argv[1:])}`", "",
        f"Random Llama model, hidden {shape['hidden']}, {args.layers} layers, GQA "
        f"{cpu_bench.LARGE['num_attention_heads']}/{shape['kv_heads']}, MLP {cpu_bench.LARGE['intermediate_size']}, "
        "tied head; "
        f"prompt of {args.prompt_len} fixed token ids, greedy, {args.new_tokens} new tokens, best of {args.repeats}; "
        "tokens/s counts every row of the batch. Limit = copy bandwidth ÷ bytes a step reads. 'Same tokens': batch "
        "1's greedy tokens equal those of cuBLAS on the same 50% + L2 weights (in fp16 compute the fused kernel's "
        "fp32 sums in another order may flip a near tie).", "",
        "| layout | weights on GPU MiB | MB read / token | decode b=1 tok/s | of limit | vs dense | decode b=8 tok/s "
        "| vs dense | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        limit1, _ = cpu_bench.limits(r, shape, bandwidth, args)
        lines.append(f"| {label} | {r['weights_mib']:.0f} | {r['step_bytes'] / 1e6:.0f} | {r['decode1']:.1f} | "
                     f"{100 * r['decode1'] / limit1:.1f}% | {r['decode1'] / base['decode1']:.2f}x | "
                     f"{r['decode8']:.1f} | {r['decode8'] / base['decode8']:.2f}x | {same_tokens(label, results)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="folder with the demo model's tokenizer files")
    p.add_argument("--work", type=Path, default=REPO / "out" / "gpu-decode", help="cache of prepared folders")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also print each layout's op profile of a prefill and 8 "
                   "decode steps at batch 1 (to stderr)")
    p.add_argument("--prepare_only", action="store_true", help="build the folders and stop (CPU work, no GPU needed)")
    p.add_argument("--out", type=Path, help="also write the table into this markdown file's gpu-decode section")
    args = p.parse_args(argv)
    if args.layers < 1 or args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--layers, --prompt_len and --repeats must be >= 1 and --new_tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.prepare_only and not torch.cuda.is_available():
        sys.exit("bench/gpu_decode.py needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was measured")
    if not (args.tokenizer / "tokenizer.json").exists():
        sys.exit(f"{args.tokenizer} has no tokenizer.json; pass the demo model's folder with --tokenizer")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = prepare(args.work, args.tokenizer, args.layers)
    if args.prepare_only:
        return
    bandwidth = copy_bandwidth()
    dense = rows[DENSE][0]
    shape = cpu_bench.model_shape(dense)
    results = {}
    for label, (folder, weights) in rows.items():
        print(f"  {label} ...", file=sys.stderr, flush=True)
        results[label] = measure(folder, weights, args)
        print(f"  {label}: {results[label]['decode1']:.1f} / {results[label]['decode8']:.1f} tok/s",
              file=sys.stderr, flush=True)
        if args.profile:
            print(results[label]["profile"], file=sys.stderr, flush=True)
    print_and_write(report(results, shape, bandwidth, args, torch.cuda.get_device_name()), args.out, SECTION)


if __name__ == "__main__":
    main()
