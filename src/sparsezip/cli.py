"""Command line: one subcommand per pipeline step, each calling one library function by keyword."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

from . import __version__, layouts
from .errors import SparsezipError

log = logging.getLogger("sparsezip")


class UsageError(SparsezipError):
    """A mistake in the command line itself; exits with status 2 like argparse does."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake like any other error: one line, no usage dump, no SystemExit.

    Subparsers inherit this class, so every subcommand behaves the same.
    """

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("sparsezip").strip()
        where = f"{command}: " if command else ""
        raise UsageError(f"{where}{message} (see `{self.prog} --help`)")


def flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Accept both --snake_case (the original's spelling) and --kebab-case."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    parser.add_argument(*names, **kwargs)


def port_number(text: str) -> int:
    port = int(text) if text.strip().isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return port


def add_device(p: argparse.ArgumentParser) -> None:
    flag(p, "--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """Sampling, weight mode and device flags shared by run, chat and serve."""
    flag(p, "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    flag(p, "--top_k", type=int, default=0, help="sample among the k likeliest tokens (default: 0 = all)")
    flag(p, "--top_p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    flag(p, "--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1.0)")
    flag(p, "--stop", nargs="+", default=None, help="stop before any of these strings")
    flag(p, "--seed", type=int, default=0, help="sampling seed (default: 0)")
    flag(p, "--weights", choices=layouts.names(), default=layouts.AUTO,
         help=f"how the pruned linears are held in memory: {layouts.help_text()} (default: {layouts.AUTO})")
    add_device(p)


def sparsify_config(ns: argparse.Namespace, **fixed) -> "SparsifyConfig":
    from .config import OwlConfig, SparsifyConfig
    from .pruners import damping_setting
    from .runtime import pick_device

    settings = dict(calib=tuple(ns.calib or ()), device=pick_device(ns.device))
    for name in ("method", "sparsity", "pattern", "rounding", "targets", "target_blend", "admm_rho", "mask_scope", "mask_score",
                 "calib_samples", "calib_seqlen", "seed", "part_file_size"):
        if hasattr(ns, name):
            settings[name] = getattr(ns, name)
    if hasattr(ns, "admm_damp"):
        settings["admm_damp"] = damping_setting(ns.admm_damp)
    owl_given = {"threshold": getattr(ns, "owl_threshold", None), "lam": getattr(ns, "owl_lambda", None)}
    owl_options = {name: value for name, value in owl_given.items() if value is not None}
    if getattr(ns, "owl", False):
        settings["owl"] = OwlConfig(**owl_options)
    elif owl_options:
        raise SparsezipError("--owl_threshold and --owl_lambda tune OWL: add --owl, or drop them")
    return SparsifyConfig(**(settings | fixed))


def own_allocator_for_sparsify() -> None:
    """sparsify's process is ours: map its large blocks (checkpoint.map_large_allocations), so the memory each
    layer frees goes back to the OS. A process-wide setting, so the library's sparsify() leaves it to its caller."""
    from .checkpoint import map_large_allocations

    map_large_allocations()


def cmd_sparsify(ns: argparse.Namespace) -> None:
    from .sparsify import sparsify

    own_allocator_for_sparsify()
    sparsify(ns.model_path, ns.save_path, sparsify_config(ns), overwrite=ns.overwrite)
    print(f"saved W16A16S model to {ns.save_path}")


def cmd_quant(ns: argparse.Namespace) -> None:
    """The original's `quant --quant_type w16a16s`: float_sparse at ratio 0.4 with L2 rounding."""
    from .sparsify import sparsify

    if ns.quant_type.lower() != "w16a16s":
        raise SparsezipError(f"--quant_type {ns.quant_type} is not supported; only w16a16s")
    if ns.model_type:
        from .config import ModelArgs

        actual = ModelArgs.from_dir(ns.model_path).model_type
        if ns.model_type.lower().split("-")[0].rstrip("0123456789.") not in actual:
            raise SparsezipError(f"--model_type {ns.model_type} does not match config.json's model_type {actual}")
    own_allocator_for_sparsify()
    sparsify(ns.model_path, ns.save_path, sparsify_config(ns, method="float_sparse", sparsity=0.4),
             overwrite=ns.overwrite)
    print(f"saved W16A16S model to {ns.save_path}")


def cmd_compress(ns: argparse.Namespace) -> None:
    from .compress import compress
    from .tp import process_group

    with process_group("cpu") as dist:
        compress(ns.model_path, ns.save_directory, tp=ns.tp, workers=ns.workers, verify=ns.verify,
                 codec_name=ns.codec, overwrite=ns.overwrite, dist=dist)
        if dist.is_main:
            print(f"saved W16A16SC model to {ns.save_directory}")


def load_for_inference(ns: argparse.Namespace, dist):
    """(model, tokenizer, device) for run, chat, serve and eval, on every folder kind."""
    from .config import ModelArgs
    from .data import auto_tokenizer
    from .formats import check_model_dir
    from .runtime import load_model, pick_device

    check_model_dir(Path(ns.model_path))
    ModelArgs.from_dir(Path(ns.model_path))  # the config first: the tokenizer reads it too, with worse errors
    device = dist.device(pick_device(ns.device))
    tokenizer = auto_tokenizer(ns.model_path)  # before the model: a damaged tokenizer should not cost a load
    model = load_model(Path(ns.model_path), device=device, dist=dist, weights=getattr(ns, "weights", layouts.AUTO))
    return model, tokenizer, device


def inference(command):
    """Run an inference command inside torchrun's process group (a no-op in one process), left on every path."""

    def run(ns: argparse.Namespace) -> None:
        from .runtime import pick_device
        from .tp import process_group

        with process_group(pick_device(ns.device)) as dist:
            command(ns, dist)

    return run


def sampling_params(ns: argparse.Namespace, max_new_tokens: int):
    from .generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=ns.temperature, top_k=ns.top_k,
                            top_p=ns.top_p, repetition_penalty=ns.repetition_penalty, stop=tuple(ns.stop or ()),
                            seed=ns.seed)
    params.check()
    return params


@inference
def cmd_run(ns: argparse.Namespace, dist) -> None:
    from .generate import check_batch_size, generate_batch, memory_mb, peak_memory_mb, prompt_ids, stop_ids

    params = sampling_params(ns, ns.max_output_length)
    check_batch_size(ns.max_batch_size)  # before the minutes a large model takes to load
    model, tokenizer, device = load_for_inference(ns, dist)
    loaded = memory_mb(device)
    prompts = [prompt_ids(tokenizer, text, use_chat_template=not ns.no_chat_template) for text in ns.input_texts]
    stream = dist.is_main and ns.stream and len(prompts) == 1
    if ns.stream and len(prompts) > 1:
        log.warning("--stream prints one prompt's answer as it comes; the answers to %d prompts print when done",
                    len(prompts))
    on_text = (lambda _, text: print(text, end="", flush=True)) if stream else None
    if stream:
        print(f"Question[0]: {ns.input_texts[0]}\nAnswer[0]: ", end="", flush=True)
    gens = generate_batch(model, tokenizer, prompts, params, stop_ids(tokenizer, ns.model_path), on_text,
                          ns.max_batch_size)
    if not dist.is_main:
        return
    for i, (text, gen) in enumerate(zip(ns.input_texts, gens)):
        if stream:
            print()
        else:
            print(f"Question[{i}]: {text}")
            print(f"Answer[{i}]: {gen.text}")
        print(f"Generate[{i}] token num: {len(gen.tokens)}")
        print(f"Generate[{i}] prefill: {gen.prefill_s * 1000:.0f} ms, decode: {gen.decode_rate:.1f} tokens/s")
    print(f"Memory: {loaded:.0f} MiB after loading, peak {peak_memory_mb(device):.0f} MiB ({device})")


@inference
def cmd_chat(ns: argparse.Namespace, dist) -> None:
    from .chat import chat_loop

    params = sampling_params(ns, ns.max_new_tokens)
    model, tokenizer, _ = load_for_inference(ns, dist)
    chat_loop(model, tokenizer, params, dist, ns.model_path, system=ns.system)


@inference
def cmd_serve(ns: argparse.Namespace, dist) -> None:
    from .openai_api import ServerLimits
    from .serve import check_exposure, serve

    limits = ServerLimits(ns.max_tokens_limit, ns.max_queue, ns.max_body_bytes, ns.api_key).check()
    check_exposure(ns.host, limits, ns.allow_unauthenticated)  # before minutes of model loading
    defaults = sampling_params(ns, ns.max_new_tokens)
    model, tokenizer, _ = load_for_inference(ns, dist)
    serve(model, tokenizer, dist, ns.model_path, host=ns.host, port=ns.port, defaults=defaults,
          model_name=ns.model_name or Path(ns.model_path).name, max_batch_size=ns.max_batch_size, limits=limits)


@inference
def cmd_eval(ns: argparse.Namespace, dist) -> None:
    from .config import ModelArgs
    from .data import check_text_file, eval_windows
    from .evaluate import check_eval_settings, perplexity

    check_eval_settings(ModelArgs.from_dir(ns.model_path), ns.seqlen, ns.batch_size, ns.max_windows)
    for path in ns.data:  # before the model loads
        check_text_file(path)
    model, tokenizer, _ = load_for_inference(ns, dist)
    windows = eval_windows(tokenizer, ns.data, ns.seqlen, ns.max_windows)
    ppl = perplexity(model, windows, ns.batch_size, show_progress=dist.is_main)
    if dist.is_main:
        from .formats import detect_kind

        print(f"perplexity: {ppl:.4f} ({len(windows)} windows of {ns.seqlen} tokens; "
              f"{detect_kind(ns.model_path)} folder {ns.model_path})")


def cmd_inspect(ns: argparse.Namespace) -> None:
    from .report import format_report, inspect_folder

    kind, rows = inspect_folder(Path(ns.path))
    print(format_report(kind, rows, per_tensor=not ns.summary))


def cmd_convert_gguf(ns: argparse.Namespace) -> None:
    from .convert.gguf import convert_gguf

    convert_gguf(ns.gguf, ns.save_path, overwrite=ns.overwrite, part_file_size=ns.part_file_size)
    print(f"saved fp16 model to {ns.save_path}")


def cmd_info(ns: argparse.Namespace) -> None:
    """Which native kernels this machine runs, and why."""
    from .kernels import cpu

    found = cpu.features()
    flags = ", ".join(name for name, on in found["flags"].items() if on) or "none"
    print(f"sparsezip {__version__}")
    print(f"native CPU kernels: level {cpu.describe_level(found['level'])}; best for this CPU and OS: "
          f"{found['detected']}; cap with ${cpu.ISA_ENV}=scalar|avx2|avx512")
    print(f"CPU features enabled: {flags}")
    print(f"kernel threads: {cpu.threads()}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sparsezip", description="Float sparsity + lossless compression for LLM weights (W16A16S/W16A16SC).")
    parser.add_argument("--version", action="version", version=f"sparsezip {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sparsify", help="prune a dense model into a W16A16S folder")
    flag(p, "--model_path", required=True, type=Path, help="dense Hugging Face model folder")
    flag(p, "--save_path", required=True, type=Path, help="output W16A16S folder (must not exist)")
    flag(p, "--method", default="float_sparse", help="float_sparse (the original's ADMM algorithm, the best in "
         "BENCHMARKS.md), sparsegpt, wanda or magnitude (default: float_sparse)")
    flag(p, "--sparsity", type=float, default=0.5, help="fraction of weights to zero (default: 0.5)")
    flag(p, "--pattern", default="unstructured", help="unstructured, or N:M such as 2:4 (default: unstructured)")
    flag(p, "--calib", nargs="+", type=Path, help=".txt or .jsonl calibration files")
    flag(p, "--calib_samples", type=int, default=32, help="random windows drawn from .txt files (default: 32)")
    flag(p, "--calib_seqlen", type=int, default=512, help="tokens per calibration window (default: 512)")
    flag(p, "--seed", type=int, default=0, help="seed of the window draw (default: 0)")
    flag(p, "--rounding", choices=("l2", "none"), default=None,
         help="L2 precision rounding of kept weights to E5M2 with 2%% kept exact (default: l2 for float_sparse, "
         "none otherwise)")
    flag(p, "--targets", choices=("dense", "local"), default="local",
         help="what float_sparse's weight update fits: the linear's own output on the pruned inputs (local, the "
         "original algorithm, the default) or the dense model's output of each linear, which also corrects the "
         "error of the pruned layers before it, for linears with at least 8 calibration tokens per input (dense: "
         "better on the demo model, BENCHMARKS.md)")
    flag(p, "--target_blend", type=float, default=1.0,
         help="with --targets dense, the share of float_sparse's target taken from the dense model's outputs, the "
         "rest from the linear's own output on the pruned inputs (default: 1.0, all dense)")
    flag(p, "--admm_rho", type=float, default=1.0,
         help="float_sparse's ADMM penalty on the normalised Hessian (default: 1.0, the original's; 0.6 was better "
         "on the demo model and on Qwen2.5-Coder-1.5B, BENCHMARKS.md)")
    flag(p, "--mask_scope", choices=("matrix", "row"), default="matrix",
         help="what float_sparse's unstructured mask ranks: each whole matrix (matrix, the original's, the "
         "default) or each output row on its own, as SparseGPT and Wanda do (row: better on the demo model and on "
         "Qwen2.5-Coder-1.5B, BENCHMARKS.md)")
    flag(p, "--mask_score", default="magnitude", metavar="{magnitude,obs}",
         help="what float_sparse's mask ranks its weights by: magnitude on the normalised Hessian (the original's, "
         "the default) or obs, that magnitude over the square root of the inverse Hessian's diagonal, OBS's "
         "saliency (obs: better on the demo model and on Qwen2.5-Coder-1.5B, BENCHMARKS.md)")
    flag(p, "--admm_damp", default="0.1",
         help="float_sparse's damping of the normalised Hessian: a number (default: 0.1, the original's) or auto, "
         "0.3 on linears with fewer calibration tokens than inputs and 0.1 on the others (auto: better on "
         "Qwen2.5-Coder-1.5B's down projections, BENCHMARKS.md)")
    flag(p, "--owl", action="store_true", help="OWL: give layers with more activation outliers less sparsity")
    flag(p, "--owl_threshold", type=float, help="OWL outlier threshold M x layer mean (default: 5)")
    flag(p, "--owl_lambda", type=float, help="OWL max deviation from --sparsity (default: 0.08)")
    flag(p, "--part_file_size", type=float, default=5.0, help="GB per safetensors shard (default: 5)")
    flag(p, "--overwrite", action="store_true", help="replace an existing output folder")
    add_device(p)
    p.set_defaults(func=cmd_sparsify)

    p = sub.add_parser("quant", help="seed-compatible: --quant_type w16a16s (float_sparse, ratio 0.4)")
    flag(p, "--model_path", required=True, type=Path)
    flag(p, "--save_path", required=True, type=Path)
    flag(p, "--quant_type", required=True, help="w16a16s")
    flag(p, "--model_type", default=None, help="e.g. Qwen3-32B; checked against config.json")
    flag(p, "--calib", nargs="+", type=Path, required=True, help=".txt or .jsonl calibration files")
    flag(p, "--overwrite", action="store_true", help="replace an existing output folder")
    add_device(p)
    p.set_defaults(func=cmd_quant)

    p = sub.add_parser("compress", help="split a W16A16S folder per TP rank and encode it losslessly")
    flag(p, "--model_path", required=True, type=Path, help="W16A16S folder")
    flag(p, "--save_directory", required=True, type=Path, help="output W16A16SC folder (must not exist)")
    flag(p, "--tp", type=int, default=None, help="tensor-parallel size (default: 1, or the torchrun world size)")
    flag(p, "--workers", type=int, default=os.cpu_count() or 1, help="parallel encoding threads")
    flag(p, "--verify", action="store_true", help="decode every tensor and compare bit for bit")
    flag(p, "--codec", default="nibble-v3", help="tile codec: nibble-v3 (default: fast to run from, ~4.5 bits per "
         "weight after L2 rounding), huff-v2 (~6%% smaller, slower to decode) or bitmap-v1")
    flag(p, "--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("run", help="generate text from a dense, W16A16S or W16A16SC folder")
    flag(p, "--model_path", required=True, type=Path)
    flag(p, "--input_texts", nargs="+", default=["What's deep learning?"], help="prompts (several are batched)")
    flag(p, "--max_output_length", type=int, default=20, help="new tokens per prompt (default: 20)")
    flag(p, "--max_batch_size", type=int, default=8, help="prompts decoded together (default: 8)")
    flag(p, "--stream", action="store_true", help="print the answer as it is generated (one prompt)")
    flag(p, "--no_chat_template", action="store_true", help="feed the prompts as plain text")
    add_generation_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    flag(p, "--model_path", required=True, type=Path)
    flag(p, "--max_new_tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    flag(p, "--system", default=None, help="system prompt")
    add_generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    flag(p, "--model_path", required=True, type=Path)
    flag(p, "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    flag(p, "--port", type=port_number, default=8000, help="port, 0 for any free one (default: 8000)")
    flag(p, "--model_name", default=None, help="model id reported by /v1/models (default: the folder's name)")
    flag(p, "--max_new_tokens", type=int, default=256, help="default max_tokens of a request (default: 256)")
    flag(p, "--max_batch_size", type=int, default=8, help="requests decoded together (default: 8)")
    flag(p, "--api_key", default=os.environ.get("SPARSEZIP_API_KEY"),
         help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $SPARSEZIP_API_KEY, "
              "which keeps the key out of the process list)")
    flag(p, "--allow_unauthenticated", action="store_true",
         help="serve on a non-loopback --host without an API key (refused otherwise)")
    flag(p, "--max_tokens_limit", type=int, default=4096, help="largest max_tokens a request may ask (default: 4096)")
    flag(p, "--max_queue", type=int, default=64,
         help="requests waiting or generating at once; more are answered 429 (default: 64)")
    flag(p, "--max_body_bytes", type=int, default=1 << 20,
         help="largest request body; larger ones are answered 413 (default: 1048576)")
    add_generation_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="perplexity over non-overlapping windows of text files")
    flag(p, "--model_path", required=True, type=Path)
    flag(p, "--data", required=True, nargs="+", type=Path, help=".txt files, joined with blank lines")
    flag(p, "--seqlen", type=int, default=1024, help="tokens per window (default: 1024)")
    flag(p, "--max_windows", type=int, default=None, help="use only the first K windows")
    flag(p, "--batch_size", type=int, default=1)
    add_device(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="sizes, sparsity and bits/weight of a folder")
    p.add_argument("path", type=Path)
    flag(p, "--summary", action="store_true", help="totals only")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert-gguf", help="dequantize a GGUF model (or its split parts) to an fp16 Hugging Face "
                       "folder, tensor by tensor")
    flag(p, "--gguf", required=True, nargs="+", type=Path, help="the .gguf file, or its byte-range parts in order")
    flag(p, "--save_path", required=True, type=Path, help="output Hugging Face folder (must not exist)")
    flag(p, "--part_file_size", type=float, default=5.0, help="GB per safetensors shard (default: 5)")
    flag(p, "--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("info", help="the native kernels and CPU features this machine runs")
    p.set_defaults(func=cmd_info)
    return parser


def setup_logging(quiet: bool) -> None:
    from .tp import Dist

    level = logging.WARNING if quiet or not Dist.from_env().is_main else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def print_error(error: BaseException) -> None:
    """The single stderr line of a failed command; embedded newlines are folded so it stays one line."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"sparsezip: error: {message}", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM as an exception, so that it unwinds like Ctrl-C: temporary folders removed, process groups left."""


def raise_terminated(signum, frame) -> NoReturn:
    raise Terminated


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block (main thread only, where Python runs signal handlers), SIGTERM raises Terminated."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_progress_bars() -> None:
    """Close the bars a signal left drawn, so that their line ends and the stop message stands on a line of its own
    (a signal that lands while a bar is drawing leaves it open, mid-line). tqdm keeps its live bars in a WeakSet."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
    except UsageError as e:
        print_error(e)
        return 2
    stopped = None
    previous_hook = sys.unraisablehook
    try:
        try:
            with sigterm_unwinds():
                setup_logging(ns.quiet)
                ns.func(ns)
        except (SparsezipError, OSError, MemoryError) as e:
            print_error(e)
            return 1
        except KeyboardInterrupt:
            sys.unraisablehook = ignore_unraisable
            stopped = "sparsezip: interrupted", 130
        except Terminated:
            sys.unraisablehook = ignore_unraisable
            stopped = "sparsezip: terminated", 143
        if stopped is not None:
            gc.collect()  # while the hook is quiet: objects the interrupt left half-built, in reference cycles
    finally:
        sys.unraisablehook = previous_hook
    if stopped is None:
        return 0
    end_progress_bars()
    print(stopped[0], file=sys.stderr)
    return stopped[1]


def prefer_passive_openmp() -> None:
    """Let torch's OpenMP threads sleep as soon as an op is done, unless the user chose otherwise. By default they
    spin for a while after each op, and a prompt or a pruning step alternates torch ops with the native kernels,
    whose own threads then share the cores with spinning ones. Read once, when torch loads OpenMP: so set before
    torch is imported (the command does not import it before main)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_as_process() -> NoReturn:
    """The `sparsezip` command and `python -m sparsezip`: main(), then the process exit. A process of a torchrun
    group leaves through os._exit once its output is flushed: at interpreter exit, after the command had finished
    and left its process group, the C++ side of torch.distributed was now and then torn down mid-flight (SIGABRT,
    "terminate called without an active exception"), which turned a finished command into a failed one."""
    prefer_passive_openmp()
    code = main()
    if in_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def in_process_group() -> bool:
    """Whether this process was started as one of several by torchrun. Only a process that imported torch can
    have joined a group, so a command that never needed torch does not import it here."""
    if "torch" not in sys.modules:
        return False
    from .tp import Dist

    try:
        return Dist.from_env().size > 1
    except SparsezipError:  # main has already said what is wrong with the environment
        return False


def ignore_unraisable(_unraisable) -> None:
    """A signal can land inside a constructor (tqdm's, say); the half-built object's __del__ then fails when the
    unwound frames are freed, and Python would print that traceback after our one-line message."""
