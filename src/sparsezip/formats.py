"""The folder kinds (dense Hugging Face, W16A16S, W16A16SC) and every name stored in them.

This is the only module that spells a file name, a stored tensor suffix (`.weight`, `.index`, `.info`,
`.weight.outdim`) or a description key; compress, the runtime, sparsify and inspect read and write folders
through the functions here. A description is always checked against the weights it describes.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from .checkpoint import ShardedWriter, TensorReader
from .codec import EncodedWeight, codec_for_id
from .config import ModelArgs, read_json, write_json
from .errors import SparsezipError
from .tp import source_shapes


class FolderKind(str, Enum):
    DENSE = "dense"
    W16A16S = "W16A16S"
    W16A16SC = "W16A16SC"

    def __str__(self) -> str:
        return self.value


FORMAT_VERSION = "1.0.0"
FLOAT = "FLOAT"  # description value of a tensor stored as it is (embeddings, norms, lm_head)
DESCRIPTION_FILE = "quant_model_description.json"
SPARSE_STEM = "quant_model_weights"  # W16A16S weights: <stem>.safetensors, or shards + <stem>.safetensors.index.json
COMPRESSED_FILE = "quant_model_weight_w16a16sc.safetensors"  # one per W16A16SC part
ONE_FILE = 2**62  # a part is one safetensors file, whatever its size
HEADER_KEYS = ("model_quant_type", "version", "metadata")
QUANT_METHOD = "sparsezip"  # config.json's quantization_config.quant_method for W16A16S/W16A16SC folders
TRANSFORMERS_WEIGHTS = "transformers_weights"  # config.json key: the weight file transformers reads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one of them makes a tokenizer
# Files other than weights that inference needs; copied as they are when present.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
)
PART_DIR = re.compile(r"^part(\d+)-of-(\d+)$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save/pickle files: never loaded
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
WEIGHT, INDEX, INFO, OUTDIM = ".weight", ".index", ".info", ".weight.outdim"


def part_dir_name(rank: int, tp: int) -> str:
    return f"part{rank}-of-{tp}"


def linear_prefix(weight_name: str) -> str:
    """`model.layers.0.mlp.down_proj.weight` -> `model.layers.0.mlp.down_proj`."""
    if not weight_name.endswith(WEIGHT):
        raise SparsezipError(f"{weight_name} is not a linear weight name")
    return weight_name[: -len(WEIGHT)]


# ---------------------------------------------------------------------------- folders


def check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise SparsezipError(f"model path {model_dir} does not exist")
    if not model_dir.is_dir():
        raise SparsezipError(f"model path {model_dir} is not a folder")
    if not (model_dir / "config.json").is_file():
        raise SparsezipError(f"{model_dir} has no config.json; point --model_path at a Hugging Face model folder")
    return model_dir


def part_dirs(model_dir: Path) -> list[Path]:
    """The part{r}-of-{N} folders of a W16A16SC model, in rank order; checks that they are complete."""
    found = {}
    for p in Path(model_dir).iterdir():
        m = PART_DIR.match(p.name)
        if m and p.is_dir():
            found[(int(m[1]), int(m[2]))] = p
    if not found:
        return []
    sizes = {n for _, n in found}
    if len(sizes) != 1:
        raise SparsezipError(f"{model_dir} mixes part folders of different TP sizes {sorted(sizes)}")
    n = sizes.pop()
    missing = [part_dir_name(r, n) for r in range(n) if (r, n) not in found]
    if missing:
        raise SparsezipError(f"{model_dir} is missing {', '.join(missing)}")
    stray = sorted(found[key].name for key in found if key[0] >= n)
    if stray:
        raise SparsezipError(f"{model_dir} has {', '.join(stray)}, a rank beyond its TP size {n}; remove it")
    return [found[(r, n)] for r in range(n)]


def detect_kind(model_dir: Path) -> FolderKind:
    """Which of the three folder kinds this is, judged by its files (and checked against what config.json says)."""
    model_dir = check_model_dir(model_dir)
    parts = part_dirs(model_dir)
    if parts:
        kind = FolderKind.W16A16SC
    elif (model_dir / DESCRIPTION_FILE).is_file():
        kind = read_json(model_dir / DESCRIPTION_FILE).get("model_quant_type")
        if kind != FolderKind.W16A16S:
            raise SparsezipError(f"{model_dir / DESCRIPTION_FILE} says model_quant_type {kind!r}; expected W16A16S")
        kind = FolderKind.W16A16S
    else:
        kind = FolderKind.DENSE
    check_quantization_entry(model_dir, kind, len(parts))
    return kind


def check_quantization_entry(model_dir: Path, kind: FolderKind, parts: int) -> None:
    """config.json's sparsezip `quantization_config` (what transformers and vLLM read) must say what the folder
    holds: its kind and, for W16A16SC, its number of parts. Folders without one (dense models, older ones) pass."""
    entry = read_json(model_dir / "config.json").get("quantization_config")
    if not isinstance(entry, dict) or entry.get("quant_method") != QUANT_METHOD:
        return
    where = model_dir / "config.json"
    check_format_version(entry.get("version", FORMAT_VERSION), where)
    if entry.get("format") != kind.value:
        raise SparsezipError(f"{where}'s quantization_config says format {entry.get('format')!r}, but the folder "
                             f"holds a {kind} model")
    if kind == FolderKind.W16A16SC and entry.get("tp_size") != parts:
        raise SparsezipError(f"{where}'s quantization_config says tp_size {entry.get('tp_size')!r}, but the folder "
                             f"has {parts} part folder{'s' * (parts != 1)}")


def weight_files(model_dir: Path) -> list[Path]:
    """Weight files of a dense or W16A16S folder, following a sharded index when there is one."""
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    if indexes:
        return indexed_weight_files(model_dir, indexes[0])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise SparsezipError(f"{model_dir} holds only pickle weights ({', '.join(pickles[:3])}), which can run code "
                                 "when loaded and are never read here; convert them to safetensors first, e.g. with "
                                 "transformers' save_pretrained(..., safe_serialization=True) on a machine you trust")
        raise SparsezipError(f"{model_dir} has no .safetensors weights (only safetensors checkpoints are supported)")
    return files


def indexed_weight_files(model_dir: Path, index: Path) -> list[Path]:
    """The shards a sharded index names, once its weight_map is checked against them: files of this folder only,
    and every tensor mapped to the shard that holds it (a map that points elsewhere would load other weights)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise SparsezipError(f"{index} has no weight_map")
    for file in weight_map.values():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise SparsezipError(f"{index}: weight_map entry {file!r} is not a file name of this folder")
    files = [model_dir / f for f in sorted(set(weight_map.values()))]
    reader = TensorReader(files)
    misplaced = sorted(name for name in reader.names() if weight_map.get(name) != reader.file_of(name).name)
    unknown = sorted(set(weight_map) - set(reader.names()))
    if misplaced or unknown:
        raise SparsezipError(f"{index} disagrees with its shards: mapped to another shard or not at all "
                             f"{misplaced[:3]}, mapped but stored nowhere {unknown[:3]}")
    return files


def copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def write_fp16_config(src: Path, dst: Path, kind: FolderKind = FolderKind.DENSE, tp_size: int = 1) -> None:
    """config.json saying float16 under both spellings (transformers 5 writes `dtype`, older readers
    read `torch_dtype`), so a bf16 or fp32 source's dtype does not contradict the fp16 weights. A W16A16S or
    W16A16SC folder also names its format (`quantization_config`), so transformers and vLLM load it through
    sparsezip's integrations. A W16A16S folder names its weight file too (`transformers_weights`): its tensors are
    the Hugging Face ones, so even a transformers without sparsezip loads it (dense). A W16A16SC part's streams
    mean nothing without sparsezip, which names the part file only once it is registered."""
    config = read_json(src / "config.json")
    config["torch_dtype"] = config["dtype"] = "float16"
    for key in ("quantization_config", TRANSFORMERS_WEIGHTS):
        config.pop(key, None)
    if kind != FolderKind.DENSE:
        config["quantization_config"] = quantization_entry(kind, tp_size)
        if kind == FolderKind.W16A16S:
            config[TRANSFORMERS_WEIGHTS] = transformers_weights_file(dst, kind, tp_size)
    write_json(dst / "config.json", config)


def quantization_entry(kind: FolderKind, tp_size: int) -> dict:
    """The `quantization_config` of a W16A16S/W16A16SC config.json (read by integrations/)."""
    entry = {"quant_method": QUANT_METHOD, "format": kind.value, "version": FORMAT_VERSION}
    if kind == FolderKind.W16A16SC:
        entry["tp_size"] = tp_size
    return entry


def transformers_weights_file(folder: Path, kind: FolderKind, tp_size: int) -> str | None:
    """The file transformers reads a folder's tensors from: the W16A16S weights (or their index), or the one
    part of a TP 1 W16A16SC folder. None for several parts: their vocabulary rows are split per rank."""
    if kind == FolderKind.W16A16SC:
        return f"{part_dir_name(0, 1)}/{COMPRESSED_FILE}" if tp_size == 1 else None
    index = f"{SPARSE_STEM}.safetensors.index.json"
    return index if (folder / index).is_file() else f"{SPARSE_STEM}.safetensors"


# ---------------------------------------------------------------------------- descriptions


@dataclass
class Description:
    """A quant_model_description.json: the folder kind, how it was made, and the kind of every stored tensor
    (plus, in W16A16SC, the output rows of every compressed linear), in file order."""

    kind: FolderKind
    metadata: dict = field(default_factory=dict)
    entries: dict[str, str | int] = field(default_factory=dict)  # tensor kinds and `.weight.outdim` integers
    version: str = FORMAT_VERSION

    def add(self, name: str, kind: str) -> None:
        self.entries[name] = kind

    def add_linear(self, prefix: str, outdim: int) -> None:
        """A codec-stored linear: its three tensors and its output rows."""
        for suffix in (WEIGHT, INDEX, INFO):
            self.entries[prefix + suffix] = FolderKind.W16A16SC.value
        self.entries[prefix + OUTDIM] = outdim

    @property
    def tensors(self) -> dict[str, str]:
        """Stored tensor name -> FLOAT | W16A16S | W16A16SC."""
        return {k: v for k, v in self.entries.items() if not k.endswith(OUTDIM)}

    def outdim(self, prefix: str) -> object:
        return self.entries.get(prefix + OUTDIM)

    def to_json(self) -> dict:
        return {"model_quant_type": self.kind.value, "version": self.version, "metadata": self.metadata,
                **self.entries}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> Description:
        try:
            kind = FolderKind(data.get("model_quant_type"))
        except ValueError:
            raise SparsezipError(f"{where} has unknown model_quant_type {data.get('model_quant_type')!r}") from None
        metadata = data.get("metadata", {})
        entries = {k: v for k, v in data.items() if k not in HEADER_KEYS}
        return cls(kind, metadata if isinstance(metadata, dict) else {}, entries,
                   str(data.get("version", FORMAT_VERSION)))

    def compressed_linears(self) -> list[str]:
        """Prefixes `<p>` of the codec-stored linears (`<p>.weight`, `<p>.index`, `<p>.info`)."""
        return [linear_prefix(name) for name, kind in self.tensors.items()
                if kind == FolderKind.W16A16SC and name.endswith(WEIGHT)]

    def float_tensors(self) -> list[str]:
        return [name for name, kind in self.tensors.items() if kind == FLOAT]

    def is_sparse(self, name: str) -> bool:
        """Whether a W16A16S tensor was pruned (described W16A16S rather than FLOAT)."""
        return self.entries.get(name) == FolderKind.W16A16S

    def check_values(self, where: Path) -> None:
        allowed = {FLOAT, FolderKind.W16A16S.value if self.kind == FolderKind.W16A16S else FolderKind.W16A16SC.value}
        for name, kind in self.tensors.items():
            if kind not in allowed:
                raise SparsezipError(f"{where}: unknown tensor type {kind!r} for {name} in the description")


def description_weight_files(folder: Path, kind: FolderKind) -> list[Path]:
    """The safetensors files a description speaks for: a part's one file, or a W16A16S folder's shards."""
    return [folder / COMPRESSED_FILE] if kind == FolderKind.W16A16SC else weight_files(folder)


def read_description(folder: Path, expected_kind: FolderKind) -> Description:
    """A folder's description, checked against the tensors its weight files actually hold.

    Every reader goes through here, so a description that names a tensor the weights lack, misses one they hold,
    or gives a wrong outdim is refused everywhere alike instead of being trusted by whichever reader forgot to check.
    """
    where = folder / DESCRIPTION_FILE
    desc = Description.from_json(read_json(where), where)
    if desc.kind != expected_kind:
        raise SparsezipError(f"{where} is not a {expected_kind} description")
    check_format_version(desc.version, where)
    desc.check_values(where)
    reader = TensorReader(description_weight_files(folder, expected_kind))
    check_description_matches(desc, reader.names(), where)
    if expected_kind == FolderKind.W16A16SC:
        codec_ids = check_part_entries(desc, reader, where)
        check_part_metadata(desc, codec_ids, Path(folder).name, where)
    return desc


def check_format_version(version: str, where: Path) -> None:
    """Folders of our major version load (a minor version adds only what older readers may ignore)."""
    if str(version).split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise SparsezipError(f"{where} is format version {version}; this sparsezip reads versions "
                             f"{FORMAT_VERSION.split('.')[0]}.x")


def write_description(folder: Path, desc: Description) -> None:
    write_json(folder / DESCRIPTION_FILE, desc.to_json())


def check_description_matches(desc: Description, names: list[str], where: Path) -> None:
    described, stored = set(desc.tensors), set(names)
    if described != stored:
        extra, missing = sorted(described - stored)[:3], sorted(stored - described)[:3]
        raise SparsezipError(f"{where} disagrees with the weights: described but not stored {extra}, "
                             f"stored but not described {missing}")


def check_part_entries(desc: Description, reader: TensorReader, where: Path) -> set[int]:
    """A part's entries say what its tensors are: a compressed linear is `<p>.weight`, `.index` and `.info`, all
    three W16A16SC, with an integer `<p>.weight.outdim` equal to the rows its `.info` stores (the 1-D stream cannot
    tell its shape); a FLOAT tensor holds floats. Otherwise a stream would be read as a float tensor, or a wrongly
    sized model built. Returns the codec ids the `.info`s name."""
    tensors = desc.tensors
    for name, kind in tensors.items():
        suffix = next((s for s in (WEIGHT, INDEX, INFO) if name.endswith(s)), None)
        prefix = name[: -len(suffix)] if suffix else name
        if kind == FLOAT and (suffix is None or (suffix == WEIGHT and prefix + INDEX not in tensors)):
            if not reader.dtype(name).is_floating_point:
                raise SparsezipError(f"{where}: {name} is described FLOAT but stores {reader.dtype(name)}")
            continue
        kinds = [tensors.get(prefix + s) for s in (WEIGHT, INDEX, INFO)]
        if suffix is None or kinds != [FolderKind.W16A16SC.value] * 3:
            raise SparsezipError(f"{where}: {name} is described {kind}, but a compressed linear is {prefix}.weight, "
                                 f".index and .info, all described W16A16SC (here {kinds})")
    codec_ids = set()
    for prefix in desc.compressed_linears():
        outdim = desc.outdim(prefix)
        info = reader.get(prefix + INFO).flatten().tolist()
        stored = info[3] if len(info) == 5 else None
        if type(outdim) is not int or outdim != stored:
            raise SparsezipError(f"{where}: {prefix}{OUTDIM} is {outdim!r} but the stored .info says {stored} "
                                 "output rows")
        codec_ids.add(int(info[4]))
    return codec_ids


def check_part_metadata(desc: Description, codec_ids: set[int], folder_name: str, where: Path) -> None:
    """A part's metadata must agree with its folder's name (a renamed or swapped rank would otherwise run with
    another rank's rows) and name the codec, version and id its streams carry."""
    meta, place = desc.metadata, PART_DIR.match(folder_name)
    if place:
        for key, value in (("tp_size", int(place[2])), ("rank", int(place[1]))):
            if meta.get(key) != value:
                raise SparsezipError(f"{where}: metadata {key} is {meta.get(key)!r}, but the folder is {folder_name}; "
                                     "was a part folder renamed or moved?")
    for codec_id in sorted(codec_ids):
        coder = codec_for_id(codec_id)
        said = (meta.get("codec"), meta.get("codec_version"), meta.get("codec_id"))
        if said != (coder.name, coder.version, coder.codec_id):
            raise SparsezipError(f"{where}: metadata says codec {said[0]!r} version {said[1]!r} id {said[2]!r}, but "
                                 f"the streams are {coder.name} version {coder.version} (id {coder.codec_id})")


# ---------------------------------------------------------------------------- W16A16SC parts


def check_weights_match_config(reader: TensorReader, args: ModelArgs, where: Path) -> None:
    """Before any work: every tensor config.json implies is stored with that shape, and no stored decoder layer
    lies beyond num_hidden_layers (a config that disagrees with its weights would otherwise fail mid-run)."""
    stored = set(reader.names())
    for name, shape in source_shapes(args).items():
        if name not in stored:
            raise SparsezipError(f"{where} lacks tensor {name}, which its config.json implies")
        if reader.shape(name) != shape:
            raise SparsezipError(f"{where}: {name} has shape {list(reader.shape(name))}, "
                                 f"its config.json implies {list(shape)}")
    layers = [int(m.group(1)) for m in map(LAYER_NAME.match, stored) if m]
    if layers and max(layers) >= args.num_layers:
        raise SparsezipError(f"{where} stores decoder layer {max(layers)}, but its config.json says "
                             f"num_hidden_layers = {args.num_layers}")


class PartReader:
    """One W16A16SC part folder, its description checked: FLOAT tensors and codec-stored linears by name."""

    def __init__(self, part_dir: Path):
        self.path = Path(part_dir)
        self.file = self.path / COMPRESSED_FILE
        self.description = read_description(self.path, FolderKind.W16A16SC)
        self.reader = TensorReader([self.file])

    def float_names(self) -> list[str]:
        return self.description.float_tensors()

    def linear_prefixes(self) -> list[str]:
        return self.description.compressed_linears()

    def contents(self) -> list[tuple[str, bool]]:
        """(FLOAT tensor name, False) or (compressed linear prefix, True) for all the part stores, in file order."""
        linears = set(self.linear_prefixes())
        found = []
        for name, kind in self.description.tensors.items():
            if kind == FLOAT:
                found.append((name, False))
            elif name.endswith(WEIGHT) and linear_prefix(name) in linears:
                found.append((linear_prefix(name), True))
        return found

    def linear_bytes(self, prefix: str) -> int:
        """Stored bytes of a compressed linear's three tensors, from the file header (nothing is read)."""
        return sum(self.reader.nbytes(prefix + suffix) for suffix in (WEIGHT, INDEX, INFO))

    def linear_numel(self, prefix: str) -> int:
        info = self.reader.get(prefix + INFO).tolist()  # [tile_k, tile_n, in, out, codec id], checked on decode
        return int(info[2]) * int(info[3]) if len(info) == 5 else 0

    def read_float(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def read_linear(self, prefix: str) -> EncodedWeight:
        """The stored `<p>.weight`, `<p>.index` and `<p>.info` of one compressed linear."""
        return EncodedWeight(*(self.reader.get(prefix + suffix) for suffix in (WEIGHT, INDEX, INFO)))


def part_metadata(tp: int, rank: int, coder, tool: str, sparsify: dict) -> dict:
    """How a part was made: its place in the TP group, the codec (name, version, id) and the W16A16S metadata."""
    return {"tp_size": tp, "rank": rank, "codec": coder.name, "codec_version": coder.version,
            "codec_id": coder.codec_id, "tool": tool, "sparsify": sparsify}


class PartWriter:
    """Writes one part folder entry by entry, in order: FLOAT tensors by name, compressed linears by prefix.
    Entries go to disk as they come (ShardedWriter's chunks), so a rank never holds all its encoded linears."""

    def __init__(self, part_dir: Path, metadata: dict):
        part_dir.mkdir()
        self.part_dir = part_dir
        self.writer = ShardedWriter(part_dir, COMPRESSED_FILE.removesuffix(".safetensors"), ONE_FILE)
        self.description = Description(FolderKind.W16A16SC, metadata)

    def add(self, name: str, value: torch.Tensor | EncodedWeight) -> None:
        if isinstance(value, EncodedWeight):
            for suffix, tensor in zip((WEIGHT, INDEX, INFO), (value.weight, value.index, value.info)):
                self.writer.add(name + suffix, tensor)
            self.description.add_linear(name, value.shape[0])
        else:
            self.writer.add(name, value)
            self.description.add(name, FLOAT)

    def close(self) -> None:
        self.writer.close()
        write_description(self.part_dir, self.description)
