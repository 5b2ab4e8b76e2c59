"""llama.cpp as a side-by-side peer for the generation benchmark, on exactly the same weights.

Four jobs, each a function and a CLI subcommand:
  setup    a separate venv (.venv-peers) with llama-cpp-python built from source for a portable x86-64 CPU
  export   a Hugging Face fp16 folder (dense or W16A16S) -> f16.gguf with the same fp16 bits, then q8_0.gguf and
           q4_0.gguf through llama.cpp's own quantizer
  speed    batch-1 (and batch-8) greedy decode tokens/s, prefill tokens/s and peak RSS of llama.cpp on a GGUF,
           one fresh process per measurement
  perplexity  llama.cpp's perplexity on given token windows (the ones `sparsezip eval` scores), for the quality
           benchmark (bench/quality.py)
plus `check`: llama.cpp's greedy tokens on a GGUF against transformers on the folder it came from.

This module needs only the standard library to import; export needs gguf and numpy (either venv has them),
check needs torch and transformers (the project venv). Everything llama.cpp runs in the peers venv, in a
subprocess (llamacpp_worker.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS_VENV = REPO / ".venv-peers"
WORKER = Path(__file__).resolve().with_name("llamacpp_worker.py")

LLAMA_CPP_PYTHON = "0.3.36"  # vendors llama.cpp commit 0c1e570
# the project venv's versions; tokenizers lets export name the pre-tokenizer the way llama.cpp's converter does
PEER_PACKAGES = ("gguf==0.19.0", "numpy==2.4.6", "tokenizers==0.23.3")
# A fixed AVX2-level x86-64 build: no -march=native (GGML_NATIVE=OFF) and nothing above AVX2, so the binary runs
# on every VM of ours, including those that list AVX-512/AMX in CPUID but trap on them. Runtime dispatch
# (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) is not used: llama-cpp-python's CMakeLists installs only a target
# named `ggml-cpu`, so the `ggml-cpu-<variant>` modules would not be in the package, and ggml scores the
# variants from CPUID alone ("does not check for OS support"), so it would pick the trapping AVX-512 variant.
# LLAVA_BUILD=OFF skips the multimodal library, which the benchmark does not load.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF "
    "-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
    "-DGGML_OPENMP=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF"
)  # scikit-build-core builds Release (-O3 -DNDEBUG) and ignores a CMAKE_BUILD_TYPE here
BUILD_RECORD = "sparsezip-peers.json"  # in the venv: what was installed and how it was built


class PeerError(Exception):
    """A one-line error for the user (bad input, missing venv, a failed subprocess)."""


# ------------------------------------------------------------------ setup


def peer_python(venv: Path = PEERS_VENV) -> Path:
    return venv / "bin" / "python"


def read_build_record(venv: Path = PEERS_VENV) -> dict:
    """What setup_peers recorded, or {} when the venv was not set up by it."""
    path = venv / BUILD_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def setup_peers(venv: Path = PEERS_VENV, log: Path | None = None) -> dict:
    """Create the peers venv if missing and install llama-cpp-python built from source with CMAKE_ARGS.

    A separate venv keeps llama-cpp-python and its dependencies out of the project's pinned environment.
    Skips the build when the recorded version and flags match. Returns the build record.
    """
    record = read_build_record(venv)
    if record.get("llama_cpp_python") == LLAMA_CPP_PYTHON and record.get("cmake_args") == CMAKE_ARGS:
        return record
    if not peer_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / ".gitignore").write_text("*\n")  # keep the venv out of `git status`, as virtualenv does
    log = log or venv / "build.log"
    pip = [str(peer_python(venv)), "-m", "pip"]
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "FORCE_CMAKE": "1",
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    with open(log, "w") as out:
        steps = [
            [*pip, "install", "--upgrade", "pip"],
            # one resolve, so the pins hold; --force-reinstall rebuilds an installed copy built with other flags,
            # --no-cache-dir keeps pip from reusing a wheel it cached from such a build
            [*pip, "install", "-v", "--force-reinstall", "--no-cache-dir", "--no-binary", "llama-cpp-python",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", *PEER_PACKAGES],
        ]
        for cmd in steps:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode != 0:
                raise PeerError(f"setup failed at `{' '.join(cmd[2:5])} ...`; see {log}")
    info = run_worker(venv, ["info"])
    record = {"llama_cpp_python": LLAMA_CPP_PYTHON, "cmake_args": CMAKE_ARGS, "packages": list(PEER_PACKAGES),
              **info}
    (venv / BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def run_worker(venv: Path, args: list[str], timeout: float | None = None, stdin: str | None = None) -> dict:
    """Run llamacpp_worker.py in the peers venv; its last stdout line is a JSON result. `stdin` carries input too
    large for the command line (argv strings are limited to 128 KiB each on Linux)."""
    if not peer_python(venv).exists():
        raise PeerError(f"no peers venv at {venv}; run `python bench/llamacpp.py --setup` first")
    proc = subprocess.run([str(peer_python(venv)), str(WORKER), *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerError(f"llama.cpp worker `{args[0]}` failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------ export: Hugging Face folder -> GGUF

QTYPES = ("f16", "q8_0", "q4_0")
LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2}  # llama.h LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0
ARCHES = {"llama": "llama", "qwen2": "qwen2"}  # HF model_type -> GGUF architecture
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
# tokenizer.ggml.pre from the hash of a fixed text's token ids, as llama.cpp's converter does it
# (chktxt and hashes copied from conversion/base.py get_vocab_base_pre of the vendored llama.cpp).
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType


def gguf_tensor_name(hf: str) -> str:
    """Hugging Face tensor name -> llama.cpp's GGUF name (llama and qwen2 share them)."""
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if module in LAYER_NAMES and kind in ("weight", "bias"):
            return f"blk.{parts[2]}.{LAYER_NAMES[module]}.{kind}"
    raise PeerError(f"tensor {hf} has no llama.cpp name (only llama/qwen2 dense decoders are supported)")


def llama_permute(w, n_head: int):
    """convert_hf_to_gguf LlamaModel.permute: rows of each head from HF's half-split rotary order to the
    interleaved order llama.cpp's rope kernel uses. Only reorders rows, so every fp16 bit is kept."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_safetensors(path: Path) -> dict:
    """name -> read-only numpy view of the stored bytes (memory-mapped, no dtype conversion).

    Read by hand (8-byte header length, JSON header, raw data) so the exporter needs no torch or
    safetensors package and runs in either venv."""
    import numpy as np

    dtypes = {"F16": np.float16, "F32": np.float32, "BF16": None}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = dtypes.get(meta["dtype"])
        if dtype is None:
            raise PeerError(f"{path.name}: {name} is {meta['dtype']}; export needs an fp16 folder")
        a, b = meta["data_offsets"]
        out[name] = data[a:b].view(dtype).reshape(meta["shape"])
    return out


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a dense (model*.safetensors) or W16A16S (quant_model_weights*) folder."""
    if any(p.is_dir() and p.name.startswith("part") and "-of-" in p.name for p in folder.iterdir()):
        raise PeerError(f"{folder} is a W16A16SC folder (codec streams); export the W16A16S folder it came from")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map") or {}
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        raise PeerError(f"{folder} has no (complete set of) .safetensors weight files")
    return files


def read_config(folder: Path) -> dict:
    """config.json, checked for what this exporter supports."""
    if not (folder / "config.json").is_file():
        raise PeerError(f"{folder} has no config.json; point at a Hugging Face model folder")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in ARCHES:
        raise PeerError(f"{folder}: model_type {config.get('model_type')!r} is not supported (llama, qwen2)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise PeerError(f"{folder}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    return config


def rope_theta(config: dict) -> float:
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def tokenizer_pre(folder: Path, config: dict) -> str:
    """tokenizer.ggml.pre: llama.cpp's name of the BPE pre-tokenizer. Only text tokenization depends on it
    (the benchmark feeds token ids), so an unknown tokenizer falls back to a default instead of failing."""
    from hashlib import sha256

    try:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(CHKTXT).ids
        found = PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest())
        if found:
            return found
    except ImportError:
        pass
    return "qwen2" if config["model_type"] == "qwen2" else "default"


def vocab_lists(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types by id, as convert_hf_to_gguf get_vocab_base writes them for a BPE tokenizer:
    ids without a token become [PAD{i}] (unused) so the list is as long as the embedding."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise PeerError(f"{folder} has no tokenizer.json (a BPE tokenizer is needed for the GGUF metadata)")
    tok = json.loads(path.read_text())
    if tok.get("model", {}).get("type") != "BPE":
        raise PeerError(f"{path}: only BPE tokenizers are supported, not {tok.get('model', {}).get('type')}")
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise PeerError(f"{path}: token id {max(by_id)} does not fit the embedding's {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            looks_special = by_id[i].startswith(("<|", "<｜")) and by_id[i].endswith(("|>", "｜>"))
            types.append(TOKEN_CONTROL if added[i].get("special") or looks_special else TOKEN_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL)
    return tokens, types


def write_f16_gguf(folder: Path, out: Path) -> None:
    """Write the folder's model as a GGUF with its fp16 matrices unchanged (F16) and 1-D tensors in F32
    (exact for fp16 values), the way convert_hf_to_gguf --outtype f16 stores them."""
    import gguf
    import numpy as np

    config = read_config(folder)
    arch = ARCHES[config["model_type"]]
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    tensors: dict = {}
    for f in weight_files(folder):
        tensors.update(read_safetensors(f))
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.get("tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # llama.cpp uses token_embd when there is no output.weight
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(folder.name)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(vocab_size)
    tokens, types = vocab_lists(folder, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre(folder, config))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(w)  # merges, bos/eos, template

    for name in sorted(tensors, key=tensor_order):
        a = tensors[name]
        if a.ndim == 1:
            a = a.astype(np.float32)
        elif a.dtype != np.float16:
            raise PeerError(f"{name} is {a.dtype}; export needs fp16 matrices")
        elif arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = np.ascontiguousarray(llama_permute(a, heads if "q_proj" in name else kv_heads))
        w.add_tensor(gguf_tensor_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tensor_order(hf: str) -> tuple:
    """Embedding first, then layer by layer, then the final norm and head, as llama.cpp's converter orders them."""
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), hf)
    return (0 if "embed_tokens" in hf else 2, 0, hf)


def export_gguf(hf_folder: Path, out: Path, qtype: str, f16: Path | None = None,
                venv: Path = PEERS_VENV, overwrite: bool = False, threads: int | None = None) -> Path:
    """Write `out` as a GGUF of type f16, q8_0 or q4_0 with the weights of a Hugging Face fp16 folder
    (dense or W16A16S). q8_0/q4_0 go through llama.cpp's own quantizer (llama_model_quantize, default
    per-tensor choices, on `threads` threads, default all CPUs) from `f16` when given, else from a temporary
    F16 export. The file appears under its name only when complete."""
    hf_folder, out = Path(hf_folder), Path(out)
    if qtype not in QTYPES:
        raise PeerError(f"qtype {qtype!r} is not one of {', '.join(QTYPES)}")
    if not hf_folder.is_dir():
        raise PeerError(f"{hf_folder} is not a folder")
    read_config(hf_folder)  # refuse bad input before creating anything
    if out.exists() and not overwrite:
        raise PeerError(f"{out} already exists (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    made_f16 = None
    try:
        if qtype == "f16":
            write_f16_gguf(hf_folder, tmp)
        else:
            if f16 is None:
                made_f16 = f16 = out.with_name(f".{out.name}.f16.tmp")
                write_f16_gguf(hf_folder, f16)
            run_worker(venv, ["quantize", str(f16), str(tmp), str(LLAMA_FTYPES[qtype]),
                              str(threads or os.cpu_count() or 1)])
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
        if made_f16 is not None:
            made_f16.unlink(missing_ok=True)
    return out


def check_f16(hf_folder: Path, f16: Path) -> int:
    """Compare every tensor of an F16 GGUF with the folder's, bit for bit (q/k rows un-permuted, 1-D tensors
    back from F32). Returns how many tensors were compared; raises PeerError on the first difference."""
    import gguf
    import numpy as np

    hf_folder = Path(hf_folder)
    config = read_config(hf_folder)
    source: dict = {}
    for f in weight_files(hf_folder):
        source.update(read_safetensors(f))
    stored = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    compared = 0
    for name, want in source.items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.get("tie_word_embeddings")):
            continue
        t = stored.pop(gguf_tensor_name(name), None)
        if t is None:
            raise PeerError(f"{f16} has no tensor for {name}")
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != tuple(want.shape):
            raise PeerError(f"{f16}: {t.name} has shape {shape}, {name} {tuple(want.shape)}")
        got = np.asarray(t.data).reshape(want.shape)
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            order = llama_permute(np.arange(want.shape[0]), heads if "q_proj" in name else kv_heads)
            got = got[np.argsort(order)]
        if not np.array_equal(got.astype(want.dtype).view(np.uint8), np.asarray(want).view(np.uint8)):
            raise PeerError(f"{f16}: {name} differs from {hf_folder}")
        compared += 1
    if stored:
        raise PeerError(f"{f16} has tensors the folder lacks: {', '.join(sorted(stored)[:3])}")
    return compared


def transformers_model(folder: Path):
    """The folder's model in transformers, fp32. A W16A16S folder's quant_model_weights* files hold Hugging Face
    names but not a file name transformers looks for, so those are loaded into a model built from config.json."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    files = weight_files(folder)
    if all(f.name.startswith("model") for f in files):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for f in files for k, v in read_safetensors(f).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise PeerError(f"{folder}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()


def check_tokens(hf_folder: Path, gguf: Path, prompt_ids: list[int], new_tokens: int = 32,
                 venv: Path = PEERS_VENV) -> dict:
    """Greedy tokens of llama.cpp on `gguf` against transformers (fp32) on `hf_folder`, same prompt ids.
    Needs torch and transformers (the project venv); transformers runs in this process."""
    import torch

    theirs = generate(gguf, prompt_ids, new_tokens, threads=os.cpu_count() or 1, warmup=0, venv=venv)
    model = transformers_model(Path(hf_folder))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(prompt_ids):].tolist()
    got = theirs["tokens"][0]
    first_diff = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    return {"agree": sum(a == b for a, b in zip(ref, got)), "of": new_tokens, "first_difference": first_diff,
            "transformers": ref, "llama_cpp": got}

def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF holds (llama.cpp's quantizer keeps some at higher precision)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def linear_bits(path: Path) -> dict:
    """Stored size of a GGUF's per-layer matrices (the 2-D `blk.*` tensors: attention and MLP projections, the
    same matrices sparsezip prunes): bytes, elements and bits per weight, block scales included. Embedding, output
    and norms are left out on both sides of the comparison."""
    import gguf

    matrices = [t for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    if not matrices:
        raise PeerError(f"{path} has no 2-D blk.* tensors")
    stored, weights = sum(int(t.n_bytes) for t in matrices), sum(int(t.n_elements) for t in matrices)
    return {"bytes": stored, "weights": weights, "bits_per_weight": 8 * stored / weights,
            "tensors": len(matrices)}


def export_all(hf_folder: Path, out_dir: Path, venv: Path = PEERS_VENV, overwrite: bool = False) -> dict:
    """f16.gguf, q8_0.gguf and q4_0.gguf of one folder in out_dir; returns {file: tensor type counts}."""
    out_dir = Path(out_dir)
    f16 = export_gguf(hf_folder, out_dir / "f16.gguf", "f16", overwrite=overwrite)
    done = {"f16.gguf": tensor_types(f16), "f16_bit_identical_tensors": check_f16(hf_folder, f16)}
    for q in QTYPES[1:]:
        path = export_gguf(hf_folder, out_dir / f"{q}.gguf", q, f16=f16, venv=venv, overwrite=overwrite)
        done[path.name] = tensor_types(path)
    return done


# ------------------------------------------------------------------ measure


def generate(gguf: Path, prompt_ids: list[int], new_tokens: int, threads: int = 1, rows: int = 1,
             warmup: int = 4, venv: Path = PEERS_VENV, timeout: float = 1800) -> dict:
    """One fresh llama.cpp process: load `gguf` without mmap, warm up, prefill `prompt_ids` in `rows`
    sequences and greedy-decode `new_tokens` tokens each. Returns tokens, timings and memory."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise PeerError(f"{gguf} does not exist")
    if not prompt_ids or any(not isinstance(t, int) or t < 0 for t in prompt_ids):
        raise PeerError("prompt_ids must be a non-empty list of token ids")
    if new_tokens < 2 or threads < 1 or rows < 1:
        raise PeerError("new_tokens must be >= 2, threads and rows >= 1")
    spec = {"gguf": str(gguf.resolve()), "prompt": prompt_ids, "new_tokens": new_tokens, "threads": threads,
            "rows": rows, "warmup": warmup}
    return run_worker(venv, ["run", json.dumps(spec)], timeout=timeout)


def perplexity(gguf: Path, windows: list[list[int]], threads: int = 1, venv: Path = PEERS_VENV,
               timeout: float = 3600) -> dict:
    """llama.cpp's perplexity on `gguf` over token windows of equal length, each decoded alone from an empty
    cache with logits at every position, every next token scored (as sparsezip's evaluate.perplexity, not
    llama-perplexity, which scores only the second half of each window). The NLL is summed in float64 in
    the worker. Returns nll, tokens, ppl = exp(nll / tokens), per-window NLL and the decode seconds."""
    import math

    gguf = Path(gguf)
    if not gguf.is_file():
        raise PeerError(f"{gguf} does not exist")
    windows = [[int(t) for t in w] for w in windows]
    if not windows or len({len(w) for w in windows}) != 1 or len(windows[0]) < 2:
        raise PeerError("windows must be a non-empty list of token lists of one length >= 2")
    if threads < 1 or min(min(w) for w in windows) < 0:
        raise PeerError("threads must be >= 1 and token ids >= 0")
    spec = {"gguf": str(gguf.resolve()), "windows": windows, "threads": threads}
    result = run_worker(venv, ["perplexity"], timeout=timeout, stdin=json.dumps(spec))
    return {"gguf": str(gguf), **result, "ppl": math.exp(result["nll"] / result["tokens"])}


def text_windows(tokenizer_folder: Path, data: list[Path], seqlen: int, max_windows: int | None) -> list[list[int]]:
    """The token windows `sparsezip eval --data ... --seqlen ... --max_windows ...` scores (needs the project venv)."""
    from sparsezip.data import eval_windows, load_tokenizer
    from sparsezip.errors import SparsezipError

    try:
        return eval_windows(load_tokenizer(Path(tokenizer_folder)), list(data), seqlen, max_windows).tolist()
    except SparsezipError as err:
        raise PeerError(str(err)) from None


def summarise(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs if r.get(key) is not None]
    return {"median": statistics.median(values) if values else None, "all": values}


def decode_speed(gguf: Path, prompt_ids: list[int], new_tokens: int, threads: int, repeats: int,
                 batch8: bool = True, venv: Path = PEERS_VENV) -> dict:
    """Greedy decode speed of llama.cpp on a GGUF, one fresh process per repeat (and per batch size).

    decode_tok_s: llama.cpp's own perf counters over the new_tokens - 1 single-token llama_decode calls after
    the prefill (the first new token comes from the prefill, as in bench/run.py); decode_wall_tok_s: wall time
    around that loop, including the Python argmax of each step. Batch 8: 8 copies of the prompt in 8 KV
    streams (kv_unified off), tokens/s counts all rows. Weights are read into memory at load (no mmap), so
    peak RSS includes them. Otherwise llama.cpp's context defaults: F16 KV cache, flash attention "auto"
    (on for CPU), Q4_0 repacked at load for AVX2 (GGML_CPU_REPACK), a warm-up generation of 4 tokens first."""
    if repeats < 1:
        raise PeerError("repeats must be >= 1")
    one = [generate(gguf, prompt_ids, new_tokens, threads, 1, venv=venv) for _ in range(repeats)]
    result = {
        "gguf": str(gguf), "threads": threads, "prompt_len": len(prompt_ids), "new_tokens": new_tokens,
        "repeats": repeats, "mmap": False,
        "decode_tok_s": summarise(one, "decode_tok_s"),
        "decode_wall_tok_s": summarise(one, "decode_wall_tok_s"),
        "prefill_tok_s": summarise(one, "prefill_tok_s"),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in one),
        "load_rss_mib": statistics.median(r["load_rss_mib"] for r in one),
        "tokens": one[0]["tokens"][0],
    }
    if batch8:
        eight = [generate(gguf, prompt_ids, new_tokens, threads, 8, venv=venv) for _ in range(repeats)]
        result["batch8"] = {"decode_tok_s": summarise(eight, "decode_tok_s"),
                            "decode_wall_tok_s": summarise(eight, "decode_wall_tok_s"),
                            "peak_rss_mib": max(r["peak_rss_mib"] for r in eight),
                            "rows_agree": all(len({tuple(t) for t in r["tokens"]}) == 1 for r in eight)}
    return result


# ------------------------------------------------------------------ command line


def default_prompt(n: int, vocab: int = 20000) -> list[int]:
    """n pseudo-random token ids in [100, vocab), fixed (a small LCG), so runs are comparable without torch."""
    x, out = 12345, []
    for _ in range(n):
        x = (1103515245 * x + 12345) % 2**31
        out.append(100 + x % (vocab - 100))
    return out


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise PeerError(f"--prompt_ids must be integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise PeerError("--prompt_ids is empty")
    return ids


def to_json(obj) -> str:
    """Indented JSON with each list of numbers on one line (token lists stay readable)."""
    import re

    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+([-0-9.e,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/llamacpp.py",
        description="llama.cpp (llama-cpp-python, own venv .venv-peers) as a peer for the generation and quality "
                    "benchmarks, on the same fp16 weights.",
        epilog="examples:\n"
               "  python3 bench/llamacpp.py --setup     # once; builds llama.cpp (tens of minutes on 2 cores)\n"
               "  M=~/.cache/sparsezip/smollm2-135m-instruct-fp16\n"
               "  .venv/bin/python bench/llamacpp.py export $M out/gguf   # f16.gguf, q8_0.gguf, q4_0.gguf\n"
               "  .venv/bin/python bench/llamacpp.py check $M out/gguf/f16.gguf\n"
               "  .venv/bin/python bench/llamacpp.py speed out/gguf/q8_0.gguf --threads 2 --new 128 --repeats 3\n"
               "  .venv/bin/python bench/llamacpp.py perplexity out/gguf/q4_0.gguf --tokenizer $M \\\n"
               "      --data $SPARSEZIP_AUSTEN/prideprejudice.txt --seqlen 256 --max_windows 16 --threads 2\n"
               "export needs gguf + numpy (both venvs have them); check and perplexity need torch + transformers "
               "(.venv).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true",
                   help=f"create {PEERS_VENV.name} if missing and build llama-cpp-python=={LLAMA_CPP_PYTHON} from "
                        "source for a portable AVX2 CPU (log in the venv's build.log); prints the build record")
    sub = p.add_subparsers(dest="command", metavar="{export,check,speed,perplexity}")
    e = sub.add_parser("export", help="HF fp16 folder (dense or W16A16S) -> OUT_DIR/{f16,q8_0,q4_0}.gguf")
    e.add_argument("hf_folder", type=Path, metavar="HF_FOLDER", help="llama or qwen2 fp16 folder with config.json")
    e.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where f16.gguf, q8_0.gguf and q4_0.gguf go")
    e.add_argument("--overwrite", action="store_true", help="replace existing .gguf files")
    c = sub.add_parser("check", help="greedy tokens of llama.cpp on GGUF vs transformers (fp32) on HF_FOLDER "
                                     "(needs torch: run with .venv/bin/python)")
    c.add_argument("hf_folder", type=Path, metavar="HF_FOLDER")
    c.add_argument("gguf", type=Path, metavar="GGUF")
    c.add_argument("--new", type=int, default=32, help="greedy tokens to compare (default 32)")
    c.add_argument("--prompt_len", type=int, default=20, help="length of the default fixed random prompt")
    c.add_argument("--prompt_ids", help="explicit prompt token ids, e.g. '1,2,3' (overrides)")
    s = sub.add_parser("speed", help="decode/prefill tokens/s and peak RSS of llama.cpp on a GGUF, as JSON")
    s.add_argument("gguf", type=Path, metavar="GGUF")
    s.add_argument("--threads", type=int, default=1, help="n_threads = n_threads_batch (default 1)")
    s.add_argument("--new", type=int, default=128, help="new tokens per sequence (default 128)")
    s.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement; median reported")
    s.add_argument("--prompt_len", type=int, default=128,
                   help="length of the default fixed random prompt (default 128, as bench/run.py)")
    s.add_argument("--prompt_ids", help="explicit prompt token ids, e.g. '1,2,3' (overrides)")
    s.add_argument("--no_batch8", action="store_true", help="skip the batch-8 decode measurement")
    q = sub.add_parser("perplexity", help="llama.cpp's perplexity on a GGUF over the windows `sparsezip eval` "
                       "scores, and the bits/weight of its blk.* matrices, as JSON (run with .venv/bin/python)")
    q.add_argument("gguf", type=Path, metavar="GGUF")
    q.add_argument("--tokenizer", type=Path, required=True, metavar="HF_FOLDER",
                   help="folder whose tokenizer makes the windows (the model the GGUF was exported from)")
    q.add_argument("--data", type=Path, nargs="+", required=True, help=".txt files, joined with blank lines")
    q.add_argument("--seqlen", type=int, default=1024, help="tokens per window (default 1024, as sparsezip eval)")
    q.add_argument("--max_windows", type=int, default=None, help="use only the first K windows")
    q.add_argument("--threads", type=int, default=1, help="n_threads = n_threads_batch (default 1)")
    q.add_argument("--per_window", action="store_true", help="also print each window's NLL")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.setup:
            print(to_json(setup_peers()))
        if args.command == "export":
            try:
                import gguf  # noqa: F401
            except ImportError:
                raise PeerError("export needs the gguf package: run it with .venv/bin/python or "
                                ".venv-peers/bin/python") from None
            print(to_json(export_all(args.hf_folder, args.out_dir, overwrite=args.overwrite)))
        elif args.command == "check":
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError:
                raise PeerError("check needs torch and transformers: run it with .venv/bin/python") from None
            ids = parse_ids(args.prompt_ids) if args.prompt_ids else default_prompt(args.prompt_len)
            print(to_json(check_tokens(args.hf_folder, args.gguf, ids, args.new)))
        elif args.command == "speed":
            ids = parse_ids(args.prompt_ids) if args.prompt_ids else default_prompt(args.prompt_len)
            print(to_json(decode_speed(args.gguf, ids, args.new, args.threads, args.repeats,
                                       batch8=not args.no_batch8)))
        elif args.command == "perplexity":
            try:
                windows = text_windows(args.tokenizer, args.data, args.seqlen, args.max_windows)
            except ImportError:
                raise PeerError("perplexity tokenizes with sparsezip: run it with .venv/bin/python") from None
            result = perplexity(args.gguf, windows, args.threads)
            if not args.per_window:
                result.pop("window_nll")
            print(to_json({**result, "windows": len(windows), "linear": linear_bits(args.gguf)}))
        elif not args.setup:
            build_parser().print_help()
    except (PeerError, subprocess.TimeoutExpired) as err:
        print(f"llamacpp: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
