"""A vLLM plugin: vLLM serves W16A16S and W16A16SC folders with the pruned linears held in sparsezip's sparse layout.

vLLM finds `register` through the `vllm.general_plugins` entry point and calls it in every process it starts.
It registers two things:

- the quantization method `sparsezip` (what config.json's `quantization_config.quant_method` says): each linear
  layer is created and filled by vLLM as usual (its own loader, its own tensor-parallel split), then packed
  per rank into the sparse layout (`kernels.cpu.gemv.pack_sparse`); the dense weight is dropped. Products run
  through the custom op `sparsezip::sparse_linear`, so both enforce_eager and vLLM's torch.compile mode work.
  Embeddings and the LM head stay vLLM's own; on a GPU the linears stay dense (the layout's kernels are CPU code).
- a model loader for load format `auto` (and `sparsezip`, to name it explicitly): vLLM's default loader, except
  that a W16A16SC folder, whose codec streams lie in part folders, is read here and handed to vLLM as the
  Hugging Face-named fp16 tensors it expects, so vLLM splits them for whatever TP size it runs with.

Only vLLM imports this module: `import sparsezip` never imports vLLM.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from ..config import ModelArgs
from ..errors import SparsezipError
from ..formats import QUANT_METHOD, FolderKind, PartReader, detect_kind, linear_prefix, part_dirs
from ..kernels.cpu.gemv import SparseWeight, pack_sparse, sparse_linear
from ..layouts.base import LinearSource, Scratch
from ..tp import SplitRule, all_rules, source_shapes, unshard

log = logging.getLogger("sparsezip")
# The buffer into which the sparse layout unpacks a weight for inputs of many rows, shared by all linears of this
# process (see layouts/sparse.py): resident memory stays the layouts' bytes plus the largest single matrix.
SCRATCH = Scratch("cpu")

SPARSEZIP_LOAD_FORMAT = "sparsezip"
AUTO_LOAD_FORMAT = "auto"  # vLLM's default: replaced by our loader, which behaves as vLLM's for other folders


def register() -> None:
    """The plugin's entry point; vLLM may call it in several processes, each gets its own registration."""
    register_quantization_config(QUANT_METHOD)(SparsezipConfig)
    for load_format in (SPARSEZIP_LOAD_FORMAT, AUTO_LOAD_FORMAT):
        register_model_loader(load_format)(SparsezipModelLoader)


# ---------------------------------------------------------------------------- quantization method


class SparsezipConfig(QuantizationConfig):
    """config.json's `quantization_config` of a W16A16S or W16A16SC folder."""

    def __init__(self, kind: FolderKind, version: str):
        super().__init__()
        self.kind = kind
        self.version = version

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        # the sparse layout multiplies fp32 activations; other dtypes take a dense product (SparseLinearMethod.apply)
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # no GPU kernel is required: on a GPU the linears stay dense

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparsezipConfig:
        if config.get("quant_method") != QUANT_METHOD:
            raise SparsezipError(f"quantization_config.quant_method is {config.get('quant_method')!r}, "
                                 f"expected {QUANT_METHOD!r}")
        kinds = (FolderKind.W16A16S, FolderKind.W16A16SC)
        if config.get("format") not in [k.value for k in kinds]:
            raise SparsezipError(f"quantization_config.format is {config.get('format')!r}; sparsezip folders are "
                                 f"{' or '.join(k.value for k in kinds)}")
        return cls(FolderKind(config["format"]), str(config.get("version", "")))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> SparseLinearMethod | None:
        # None: vLLM's own unquantized method (embeddings, the LM head, attention)
        return SparseLinearMethod() if isinstance(layer, LinearBase) else None


class SparseLinearMethod(LinearMethodBase):
    """A linear whose weight vLLM loads densely, then held in the sparse layout on CPU (dense elsewhere)."""

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        # the same parameter vLLM's unquantized linears have, so its weight loaders fill and split it unchanged
        weight_loader = extra_weight_attrs.pop("weight_loader")
        weight = ModelWeightParameter(
            data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            input_dim=1, output_dim=0, weight_loader=weight_loader)
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight.data
        if weight.is_meta or weight.device.type != "cpu":
            return  # the sparse layout's kernels are CPU code; a GPU keeps the dense weight
        layer.sparse_arrays = as_tensors(pack_sparse(fp16_exactly(weight, getattr(layer, "prefix", "a linear"))))
        layer.sparse_shape = tuple(weight.shape)
        SCRATCH.reserve(weight.numel(), torch.float32)
        # an empty parameter rather than none: vLLM still reads the weight's dtype and device
        layer.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        arrays = getattr(layer, "sparse_arrays", None)
        if arrays is None:
            return F.linear(x, layer.weight, bias)
        return torch.ops.sparsezip.sparse_linear(x, *arrays, bias)


# A custom op, so that torch.compile (vLLM's default outside enforce_eager) calls the native kernels as one opaque
# step instead of failing to trace into them. Its inputs are the layout's arrays as tensors: nothing else to look
# up, so a compiled graph that vLLM caches on disk stays valid in a new process.
@torch.library.custom_op("sparsezip::sparse_linear", mutates_args=(), device_types="cpu",
                         schema="(Tensor x, Tensor codes, Tensor values, Tensor row_start, Tensor chunk_start, "
                                "Tensor? bias) -> Tensor")
def sparse_linear_op(x, codes, values, row_start, chunk_start, bias):
    sparse = from_tensors((codes, values, row_start, chunk_start), x.shape[-1])
    # fp32 activations multiply straight from the layout; others get the weight unpacked (sparse_linear)
    return sparse_linear(x, sparse, bias, lambda: SCRATCH.view(sparse.shape, torch.float32))


@sparse_linear_op.register_fake
def sparse_linear_shape(x, codes, values, row_start, chunk_start, bias):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


# torch has few unsigned dtypes: the uint64 chunk offsets travel as their signed twin (same bits)
AS_SIGNED = {np.dtype(np.uint64): np.int64}


def as_tensors(sparse: SparseWeight) -> tuple[torch.Tensor, ...]:
    """The layout's arrays as tensors sharing their memory (codes, values, row_start, chunk_start)."""
    with warnings.catch_warnings():  # the arrays are read-only and the tensors are never written
        warnings.simplefilter("ignore", UserWarning)
        return tuple(torch.from_numpy(a.view(AS_SIGNED.get(a.dtype, a.dtype))) for a in sparse.arrays())


def from_tensors(arrays: tuple[torch.Tensor, ...], in_features: int) -> SparseWeight:
    codes, values, row_start, chunk_start = (t.numpy() for t in arrays)
    return SparseWeight((codes.shape[0], in_features), codes, values, row_start, chunk_start.view(np.uint64))


def fp16_exactly(weight: torch.Tensor, name: str) -> torch.Tensor:
    """The weight as fp16, which sparsezip folders store; refuses to round (the folder would not be ours)."""
    half = weight.to(torch.float16).contiguous()
    if weight.dtype != torch.float16 and not torch.equal(half.to(weight.dtype), weight):
        raise SparsezipError(f"{name}: the weight is not made of float16 values; is this a sparsezip folder?")
    return half


def sparse_linears(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Every linear that holds its weight in the sparse layout: layout bytes and what is left of the dense weight
    (for `LLM.apply_model`, which runs it in each worker)."""
    return {name: {"sparse_bytes": sum(t.nbytes for t in module.sparse_arrays), "dense_numel": module.weight.numel(),
                   "rows": module.sparse_shape[0], "cols": module.sparse_shape[1]}
            for name, module in model.named_modules() if getattr(module, "sparse_arrays", None) is not None}


# ---------------------------------------------------------------------------- W16A16SC loading


class SparsezipModelLoader(DefaultModelLoader):
    """vLLM's default loader, plus W16A16SC folders: their part folders decoded into Hugging Face tensors."""

    def download_model(self, model_config) -> None:
        if compressed_folder(model_config.model) is None:
            super().download_model(model_config)

    def get_all_weights(self, model_config, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        folder = compressed_folder(model_config.model)
        if folder is None:
            yield from super().get_all_weights(model_config, model)
            return
        yield from hf_tensors_from_parts(folder)


def compressed_folder(model: str) -> Path | None:
    """The model as a local W16A16SC folder, or None for anything else (left to vLLM's default loader)."""
    path = Path(model)
    if not (path / "config.json").is_file():
        return None  # a hub name or something else vLLM resolves itself
    return path if detect_kind(path) == FolderKind.W16A16SC else None


def hf_tensors_from_parts(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every Hugging Face tensor of a W16A16SC folder as fp16, rebuilt from all its parts one fused tensor at a
    time (each rank's piece decoded, split into its sources, the ranks' chunks joined)."""
    args = ModelArgs.from_dir(folder)
    parts = [PartReader(p) for p in part_dirs(folder)]
    shapes = source_shapes(args)
    log.info("sparsezip: decoding %s (%d parts) into Hugging Face tensors for vLLM", folder, len(parts))
    for rule in all_rules(args):
        pieces = [rank_tensor(part, rule) for part in parts]
        yield from unshard(rule, pieces, shapes)


def rank_tensor(part: PartReader, rule: SplitRule) -> torch.Tensor:
    """One part's tensor for a rule: a codec stream decoded (with its CRC checked), or a stored float tensor."""
    if rule.compressed:
        prefix = linear_prefix(rule.target)
        return LinearSource(prefix, part.file, stored=part.read_linear(prefix)).weight()
    return part.read_float(rule.target)
