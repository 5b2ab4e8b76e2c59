"""transformers loads W16A16S and W16A16SC folders: `import sparsezip`, then
`AutoModelForCausalLM.from_pretrained(folder)`.

The folder's config.json names quant_method "sparsezip" (written by `sparsify` and `compress`). Before
transformers reads any weight, the quantizer builds every pruned linear in one of our weight layouts, straight from
the folder (`runtime`'s loaders, so the same checks run), and puts it inside the Hugging Face modules;
transformers then loads only the tensors kept as they are (embeddings, norms, lm_head) from the file config.json
or this quantizer names; afterwards the embedding and lm_head go back to fp16, as stored. Our fused q|k|v and
gate|up products stay fused: `q_proj`, `k_proj` and `v_proj` each return their rows of one product computed once
per input.

CPU only, one process: a W16A16SC folder of one part (`compress --tp 1`); W16A16S folders of any size.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import layouts
from ..config import ModelArgs
from ..errors import SparsezipError
from ..formats import (FORMAT_VERSION, QUANT_METHOD, TRANSFORMERS_WEIGHTS, FolderKind, check_format_version,
                       detect_kind, linear_prefix, part_dirs, transformers_weights_file)
from ..layouts.base import LayoutContext, LinearSource, WeightLayout
from ..layouts.dense import DenseLinear
from ..runtime import (RankWeights, auto_layout, build_layer, check_the_rest, choose_layout, rank_weights_from_dense,
                       rank_weights_from_part, separate_linears)
from ..tp import LAYER_RULES, Dist, layer_rules, source_rows

log = logging.getLogger("sparsezip")
DEVICE = "cpu"


class SparsezipConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of a sparsezip folder; `weights` picks the layout (see `sparsezip run
    --help`; "auto" = the fastest that fits in memory)."""

    def __init__(self, format: str = FolderKind.W16A16S.value, version: str = FORMAT_VERSION, tp_size: int = 1,
                 weights: str = layouts.AUTO, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.version = version
        self.tp_size = tp_size
        self.weights = weights

    def get_loading_attributes(self) -> dict:
        """What `from_pretrained(folder, quantization_config=SparsezipConfig(weights=...))` may change."""
        return {"weights": self.weights}


class FusedProduct:
    """One fused layer's product, computed once per input and handed out in row blocks (q, k, v or gate, up):
    the Hugging Face modules call each projection with the same input tensor."""

    def __init__(self, layer: WeightLayout, sizes: list[int]):
        self.layer, self.sizes = layer, sizes
        self.input: torch.Tensor | None = None
        self.version = -1
        self.blocks: tuple[torch.Tensor, ...] = ()
        self.left = 0

    def block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if x is not self.input or x._version != self.version or self.left == 0:
            self.input, self.version, self.left = x, x._version, len(self.sizes)
            self.blocks = self.layer(x).split(self.sizes, dim=-1)
        out = self.blocks[i]
        self.left -= 1
        if self.left == 0:  # every block taken: hold no activation between layers
            self.input, self.blocks = None, ()
        return out


class FusedRows(nn.Module):
    """A Hugging Face projection (q_proj, gate_proj, ...) served by its rows of a fused product."""

    def __init__(self, product: FusedProduct, i: int):
        super().__init__()
        self.product, self.i = product, i
        self.out_features, self.in_features = product.sizes[i], product.layer.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product.block(x, self.i)


def folder_of(checkpoint_files: list[str] | None) -> Path:
    """The model folder from the weight file transformers resolved (a W16A16SC part file sits one level down)."""
    if not checkpoint_files:
        raise SparsezipError("transformers found no weight file for this sparsezip folder")
    first = Path(checkpoint_files[0]).parent
    return first.parent if part_dirs(first.parent) else first


def stored_linear_names() -> str:
    """A regex of the tensors we load ourselves: the pruned linears under their Hugging Face and fused names,
    with the stream tensors of a W16A16SC part."""
    stems = {re.escape(linear_prefix(name)) for r in LAYER_RULES if r.compressed
             for name in (r.target, *r.sources)}
    return rf"^model\.layers\.\d+\.({'|'.join(sorted(stems))})\.(weight|bias|index|info)$"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    if not isinstance(getattr(model.get_submodule(parent), child, None), nn.Module):
        raise SparsezipError(f"the transformers model has no module {name}")
    setattr(model.get_submodule(parent), child, mark_loaded(module))


def mark_loaded(module: nn.Module) -> nn.Module:
    """Keep a module we built out of the state dict: transformers expects every state-dict key from its files, and
    would replace what it misses with empty tensors (like the other layouts, ours are saved by sparsezip); and flag
    it initialised, or transformers would draw random weights into an nn.Linear (our dense layout is one)."""
    module.register_state_dict_post_hook(drop_own_keys)
    for m in module.modules():
        m._is_hf_initialized = True
        for p in m.parameters(recurse=False):
            p._is_hf_initialized = True
    return module


def drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def install_linears(model: nn.Module, weights: RankWeights, args: ModelArgs, layout: type[WeightLayout],
                    ctx: LayoutContext) -> None:
    """Every pruned linear built in `layout` and put in place of the Hugging Face projections it serves."""
    for i in range(args.num_layers):
        for rule in layer_rules(args, i):
            if not rule.compressed:
                continue
            prefix = linear_prefix(rule.target)
            layer = build_layer(weights.take(prefix), weights.state.pop(prefix + ".bias", None), layout, ctx)
            rows = source_rows(rule, args)
            if len(rows) == 1:
                set_module(model, prefix, layer)
                continue
            parent = model.get_submodule(prefix.rpartition(".")[0])
            parent.add_module(prefix.rpartition(".")[2], mark_loaded(layer))  # counted in the modules, called by none
            product = FusedProduct(layer, [s.stop - s.start for _, s in rows])
            for j, (name, _) in enumerate(rows):
                set_module(model, linear_prefix(name), FusedRows(product, j))


class HalfTableEmbedding(nn.Embedding):
    """An embedding table held in fp16 (as the folder stores it) whose rows come out in the compute dtype: the same
    floats as transformers' fp32 table (fp16 -> fp32 is exact) in half the bytes."""

    def __init__(self, table: torch.Tensor, padding_idx: int | None, compute: torch.dtype):
        super().__init__(*table.shape, padding_idx=padding_idx, _weight=table, _freeze=True)
        self.compute = compute

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute)


def hold_tables_in_fp16(model: nn.Module, where: Path) -> None:
    """The embedding and the output head back in fp16 under fp32 compute, as `sparsezip run` holds them; the head
    multiplies with our dense layout's kernels (fp16 weight, fp32 activations). Left as they are when a table does
    not hold fp16 values."""
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    compute = table.weight.dtype
    half = table.weight.detach().to(torch.float16)
    if compute != torch.float32 or not torch.equal(half.to(compute), table.weight):
        return
    embedding = HalfTableEmbedding(half, table.padding_idx, compute)
    model.set_input_embeddings(embedding)
    if head is None or getattr(head, "bias", None) is not None or not isinstance(head, nn.Linear):
        return
    tied = head.weight is table.weight
    head_half = half if tied else head.weight.detach().to(torch.float16)
    if not torch.equal(head_half.to(compute), head.weight):
        return
    if tied:  # still one parameter, as transformers tied them: the table's rows, never held in column blocks
        with torch.device("meta"):
            layer = DenseLinear(half.shape[1], half.shape[0], bias=False)
        layer.weight = embedding.weight
    else:
        layer = DenseLinear.build(LinearSource("lm_head", where, dense=head_half), None, LayoutContext(DEVICE, compute))
    model.set_output_embeddings(layer)


class SparsezipQuantizer(HfQuantizer):
    requires_calibration = True  # only folders sparsezip wrote: there is nothing to quantize at load

    def validate_environment(self, device_map=None, **kwargs) -> None:
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if not devices <= {None, DEVICE, torch.device(DEVICE)}:
            raise SparsezipError(f"sparsezip's transformers integration runs on the CPU; got device_map={device_map}")
        if self.quantization_config.weights != layouts.AUTO:
            layouts.spec_named(self.quantization_config.weights)  # an unknown layout name fails here
        check_format_version(self.quantization_config.version, Path("config.json's quantization_config"))

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # like `sparsezip run`: the CPU computes in fp32 (fp16 matmuls there are slow and less accurate)
        return torch.float32 if dtype in (None, torch.float16) else dtype

    def update_attn_implementation(self, config):
        """A W16A16SC folder's tensors sit in its part; name that file (a one-part folder only)."""
        if self.quantization_config.format == FolderKind.W16A16SC:
            folder = Path(config.name_or_path)
            parts = part_dirs(folder) if folder.is_dir() else []
            if not parts:
                raise SparsezipError(f"{folder}: config.json says W16A16SC, but there are no part folders")
            if len(parts) != 1:
                raise SparsezipError(f"{folder} has {len(parts)} parts; transformers loads a W16A16SC folder of one "
                                     "part (`sparsezip compress --tp 1`); run several parts with `torchrun ... "
                                     "sparsezip run` or vLLM")
            setattr(config, TRANSFORMERS_WEIGHTS, transformers_weights_file(folder, FolderKind.W16A16SC, 1))
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        folder = folder_of(checkpoint_files)
        kind = detect_kind(folder)
        if kind.value != self.quantization_config.format:
            raise SparsezipError(f"{folder} is a {kind} folder but its config.json says "
                                 f"{self.quantization_config.format}")
        args = ModelArgs.from_dir(folder)
        dtype = model.config.dtype
        if kind == FolderKind.W16A16SC:
            weights = rank_weights_from_part(folder, Dist())
        else:
            weights = rank_weights_from_dense(folder, kind, args, Dist())
        separate_linears(weights, args, folder)
        check_the_rest(weights, args, Dist(), folder)  # transformers would fill a missing tensor with fresh values
        name = self.quantization_config.weights
        with torch.device(DEVICE):  # transformers builds the model under a meta-device context; ours are real
            if name == layouts.AUTO:
                name = auto_layout(folder, kind, args, DEVICE, dtype, Dist(), weights)
            layout = choose_layout(name, kind, DEVICE, dtype)
            install_linears(model, weights, args, layout, LayoutContext(DEVICE, dtype))
        ours = stored_linear_names()
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {ours}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {ours}
        self.layout, self.folder = name, folder
        log.info("transformers: %s folder %s with the pruned linears in the %s layout", kind, folder, name)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        hold_tables_in_fp16(model, self.folder)
        return model

    def is_serializable(self) -> bool:
        return False  # save with sparsezip's own commands; the folder already is the saved form

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Teach transformers quant_method "sparsezip" (once per process)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(SparsezipConfig)
    register_quantizer(QUANT_METHOD)(SparsezipQuantizer)
    # transformers lets a config passed to from_pretrained override the folder's only for the classes in this
    # tuple; without it `weights=` would be ignored with a warning
    quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES += (SparsezipConfig,)


register()
