"""Calibration mechanics for sparsify: decoder layers loaded one at a time, calibration samples embedded in
batches, and the stage-by-stage pass that gives every linear the statistics of its *pruned* predecessors.

Sequential calibration with one forward pass per layer: the calibration activations go through a layer stage
by stage (q/k/v, then o, then gate/up, then down); each linear's statistics come from inputs that already
passed through the pruned linears before it, the linear is pruned (by the hook), and the stage's output feeds
the next stage. The layer's pruned output is the next layer's input.

With dense targets (float_sparse's `--targets dense`) the dense model's activations travel beside the pruned
ones: before a layer is pruned, its dense forward records every linear's dense inputs, and each linear is fitted to
reproduce its dense outputs from its pruned inputs, so the error of the layers before it is corrected, not carried
on (where the calibration has enough tokens per input to determine that fit: sparsify.fits_dense_target).
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import TensorReader, to_fp16
from .config import ModelArgs
from .layouts.dense import DenseLinear
from .model import DecoderLayer, attention_mask, rope_cos_sin
from .pruners import LinearStats
from .tp import EMBEDDING, Dist, layer_rules, shard

# Calibration samples per batch. 4 x 512 tokens keeps every activation (gate/up's output included) under glibc's
# 32 MB mmap ceiling, so freed buffers are reused instead of mapped and zeroed afresh (fewer page faults).
SAMPLES_PER_BATCH = 4
ATTENTION_CHUNK = 64  # queries per attention call: causal chunks skip masked scores (model.attend)
LinearHook = Callable[[str, nn.Linear, LinearStats], None]
# A layer's linears in the order a calibration pass reaches them, by their names in DecoderLayer
STAGES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def read_layer(args: ModelArgs, reader: TensorReader, index: int) -> dict[str, torch.Tensor]:
    """One decoder layer's fused fp16 tensors (tp=1, keys with the layer prefix), read from the checkpoint."""
    return {r.target: shard(r, lambda n: to_fp16(n, reader.get(n)), 0, 1) for r in layer_rules(args, index)}


class HeldLinear(DenseLinear):
    """A calibration layer's linear. It holds its fp16 weight, half an fp32 one's memory (0.44 GB of a 7B layer,
    held beside the down projection's pruning), and multiplies by its exact fp32 upcast whatever the row count,
    so its floats are an fp32 layer's: DenseLinear's native GEMV for few rows sums in another order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def load_layer(args: ModelArgs, state: dict[str, torch.Tensor], index: int, device: str) -> DecoderLayer:
    """A tp=1 decoder layer from its fused fp16 tensors (keys with the layer prefix): the linears' weights (the
    matrices) stay fp16 in HeldLinears, the norms and biases become fp32."""
    with torch.device("meta"):
        layer = DecoderLayer(args, Dist())
        for name, module in list(layer.named_modules()):
            if isinstance(module, DenseLinear):
                layer.set_submodule(name, HeldLinear(module.in_features, module.out_features,
                                                     bias=module.bias is not None))
    prefix = f"model.layers.{index}."
    local = {k[len(prefix):]: v.to(device=device, dtype=torch.float16 if v.dim() == 2 else torch.float32)
             for k, v in state.items()}
    layer.load_state_dict(local, strict=True, assign=True)
    return layer.eval()


def batches(samples: list[torch.Tensor]) -> Iterator[list[int]]:
    """Indices of up to SAMPLES_PER_BATCH consecutive samples of equal length (jsonl samples vary)."""
    group: list[int] = []
    for i, s in enumerate(samples):
        if group and (len(group) == SAMPLES_PER_BATCH or s.shape[0] != samples[group[0]].shape[0]):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def embed_samples(reader: TensorReader, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """The calibration batches [B, L, hidden] fp32 that LayerPass takes, from token sequences [L] each.

    The table is memory-mapped and only the looked-up rows are converted: an fp32 copy of a 150k-token vocabulary
    would be the largest thing sparsify ever holds (0.9 GB at 1.5B, 2.2 GB at 7B)."""
    table = reader.mapped(EMBEDDING)

    def embed(group: list[int]) -> torch.Tensor:
        rows = F.embedding(torch.stack([samples[i] for i in group]), table)
        return to_fp16(EMBEDDING, rows).float()

    return [embed(group) for group in batches(samples)]


class Spill:
    """Tensors written to an unlinked temporary file and read back one at a time, in order.

    The MLP's activations (intermediate_size wide: 0.3 GB for 32 x 256 calibration tokens at 1.5B, 0.6 GB at 7B)
    are needed again only after the down projection is pruned; on disk they leave the memory to the pruner's
    Hessian work instead. The file has no name, so nothing is left behind however the process ends."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()
        self.shapes: list[torch.Size] = []

    def put(self, x: torch.Tensor) -> None:
        self.file.write(memoryview(x.float().contiguous().numpy()).cast("B"))
        self.shapes.append(x.shape)

    def read_back(self) -> Iterator[torch.Tensor]:
        self.file.seek(0)
        for shape in self.shapes:
            x = torch.empty(shape)
            if self.file.readinto(memoryview(x.numpy()).cast("B")) != x.nbytes:
                raise OSError(f"temporary file {self.file.name} came back short")
            yield x

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


@dataclass
class Activations:
    """The calibration batches [B, L, hidden] at one point of the model: through the pruned layers and, when the
    linears fit the dense model's outputs, through the dense layers too (the same tokens, batch for batch)."""

    pruned: list[torch.Tensor]
    dense: list[torch.Tensor] | None = None


StageHook = Callable[[str, nn.Linear, Iterable[torch.Tensor]], None]


class LayerPass:
    """Runs calibration batches ([B, L, hidden] each) through one layer stage by stage, on `device`, keeping
    activations on the CPU. The batches are formed once (embed_samples) and never restacked. With a dense stream,
    only the linears of `dense_stages` get dense targets: the others' dense inputs are neither kept nor used."""

    def __init__(self, args: ModelArgs, device: str, needs_hessian: bool, dense_stages: Collection[str] = STAGES):
        self.args, self.device, self.needs_hessian = args, device, needs_hessian
        self.dense_stages = frozenset(dense_stages)

    def apply(self, fn: Callable[..., torch.Tensor], *inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        return [fn(*(x.to(self.device) for x in xs)).cpu() for xs in zip(*inputs)]

    def stats(self, linear: nn.Linear, inputs: Iterable[torch.Tensor],
              dense_inputs: Iterable[torch.Tensor] | None = None) -> LinearStats:
        """The linear's input statistics; with `dense_inputs` (the dense model's inputs of the linear, batch for
        batch) also the dense target, from the linear's weights as they are now: not yet pruned."""
        stats = LinearStats(linear.in_features, self.device, hessian=self.needs_hessian)
        pairs = zip(inputs, dense_inputs, strict=True) if dense_inputs is not None else ((x, None) for x in inputs)
        for x, x_dense in pairs:
            x = x.to(self.device)
            stats.add_batch(x)
            if x_dense is not None:  # no bias: the pruned linear keeps it, so it cancels out of the fit
                x_dense = x_dense.to(self.device)
                stats.add_dense_target(x, F.linear(x_dense, linear.weight.to(x_dense.dtype)))
        return stats

    def rope_and_mask(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_cos_sin(self.args, pos, h.dtype)
        return cos, sin, attention_mask(self.args, pos, h.shape[1])

    @torch.no_grad()
    def __call__(self, layer: DecoderLayer, acts: Activations, on_linear: LinearHook,
                 last: bool = False) -> Activations:
        """The layer's output activations; `on_linear` may prune in place. `last`: the model's final layer, whose
        output nothing reads: no down_proj forward, and no batches returned."""
        with ExitStack() as keep:
            dense_inputs: dict[str, Iterable[torch.Tensor]] = {}
            dense_out = None
            if acts.dense is not None:  # first, while the layer still holds its dense weights
                def record(stage: str, _linear: nn.Linear, inputs: Iterable[torch.Tensor]) -> None:
                    if stage in self.dense_stages:
                        dense_inputs[stage] = self.kept(inputs, stage, keep)
                        return
                    for _ in inputs:  # the MLP's activations reach its down projection only by being consumed
                        pass

                dense_out = self.stages(layer, acts.dense, record, last)

            def prune(stage: str, linear: nn.Linear, inputs: Iterable[torch.Tensor]) -> None:
                on_linear(stage, linear, self.stats(linear, inputs, dense_inputs.pop(stage, None)))

            return Activations(self.stages(layer, acts.pruned, prune, last), dense_out)

    @staticmethod
    def kept(inputs: Iterable[torch.Tensor], stage: str, keep: ExitStack) -> Iterable[torch.Tensor]:
        """A stage's dense inputs, kept for its pruned pass: the MLP's wide activations on disk."""
        if stage != "mlp.down_proj":
            return list(inputs)
        spill = keep.enter_context(Spill())
        for x in inputs:
            spill.put(x.cpu())
        return spill.read_back()

    def stages(self, layer: DecoderLayer, hidden: list[torch.Tensor], on_inputs: StageHook,
               last: bool) -> list[torch.Tensor]:
        """hidden: batches [B, L, hidden] -> the layer's output batches; `hidden` is emptied once read. Before each
        linear's forward, `on_inputs(stage, linear, its input batches)` consumes the inputs once and may prune the
        linear."""
        attn, mlp = layer.self_attn, layer.mlp

        def attend(h: torch.Tensor) -> torch.Tensor:
            return attn.attend(attn.qkv_proj(h), *self.rope_and_mask(h), None, query_chunk=ATTENTION_CHUNK)

        normed = self.apply(layer.input_layernorm, hidden)
        on_inputs("self_attn.qkv_proj", attn.qkv_proj, normed)
        attended = self.apply(attend, normed)
        del normed
        on_inputs("self_attn.o_proj", attn.o_proj, attended)
        # residual sums in place into the fresh linear output (y + x and x + y are the same floats)
        resid = self.apply(lambda x, a: attn.o_proj(a).add_(x), hidden, attended)
        del attended
        hidden.clear()  # consumed: the layer's input batches are not needed again, and sparsify's peak is ahead
        normed = self.apply(layer.post_attention_layernorm, resid)
        on_inputs("mlp.gate_up_proj", mlp.gate_up_proj, normed)
        with Spill() as spill:
            def activations() -> Iterator[torch.Tensor]:  # to the hook and to disk, one batch at a time
                while normed:
                    act = mlp.activate(mlp.gate_up_proj(normed.pop(0).to(self.device)))
                    if not last:
                        spill.put(act.cpu())
                    yield act

            on_inputs("mlp.down_proj", mlp.down_proj, activations())
            if last:
                return []
            return self.apply(lambda r, a: mlp.down_proj(a).add_(r), resid, spill.read_back())


def owl_allocation(outlier_ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL (Yin et al. 2024): layers with more outliers get less sparsity, within sparsity ± lam, mean kept."""
    r = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    r = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    return (sparsity - (r - r.mean())).tolist()


def owl_outlier_ratios(args: ModelArgs, reader: TensorReader, hidden: list[torch.Tensor], device: str,
                       threshold: float) -> list[float]:
    """Share of Wanda scores above `threshold` x their layer mean, per layer, on the dense model."""
    run = LayerPass(args, device, needs_hessian=False)
    hidden = list(hidden)  # a pass empties the list it reads; the caller's batches are the pruning pass's input
    ratios = []
    for i in tqdm(range(args.num_layers), desc="OWL outlier scan", unit="layer"):
        layer = load_layer(args, read_layer(args, reader, i), i, device)
        scores: list[torch.Tensor] = []

        def record(_name: str, linear: nn.Linear, stats: LinearStats) -> None:
            norm = stats.sq_norm.sqrt().to(device=linear.weight.device, dtype=torch.float32)
            scores.append((linear.weight.abs() * norm[None, :]).flatten())  # fp32 products of the fp16 weight

        hidden = run(layer, Activations(hidden), record, last=i == args.num_layers - 1).pruned
        flat = torch.cat(scores)
        ratios.append(float((flat > threshold * flat.mean()).float().mean()))
    return ratios
