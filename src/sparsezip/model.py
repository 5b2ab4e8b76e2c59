"""One decoder for the Llama / Qwen2 / Qwen3 / Mistral family, tensor-parallel aware.

Parameter names are the Hugging Face ones, except that q/k/v and gate/up are fused per rank
into `self_attn.qkv_proj` and `mlp.gate_up_proj`: exactly the names of the W16A16SC format,
so a rank's tensors load without renaming. `tp.py` turns Hugging Face tensors into these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs, rope_inv_freq
from .kernels.cpu import decode
from .kernels.cpu.gemv import GEMV_MAX_ROWS, mixed_linear
from .layouts.dense import DenseLinear  # the loader swaps the pruned linears for the chosen layout
from .tp import Dist, all_gather_last, all_reduce


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode.fits(x, self.weight, rows=x.numel() // x.shape[-1]):
            return decode.rms_norm(x, self.weight, self.eps)
        # normalise in fp32 like the reference implementation, then scale in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) of x's halves, written into one buffer
    (two activation-sized allocations instead of five; the same floats, as + commutes).
    x: [B, heads, T, head_dim]; cos, sin: [T, head_dim] or [B, 1, T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, sin.dtype), device=x.device)
    rotated[..., :half].copy_(x[..., half:]).neg_()
    rotated[..., half:] = x[..., :half]
    return rotated.mul_(sin).add_(x * cos)


def rope_cos_sin(args: ModelArgs, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions `pos`: [T] -> [T, head_dim]; per-row [B, T] -> [B, 1, T, head_dim]
    (left-padded batches start each row at its own position). Recomputed per call (cheap): no state kept."""
    inv_freq = rope_inv_freq(args).to(pos.device)
    freqs = pos.float()[..., None] * inv_freq  # [..., T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    if pos.dim() == 2:
        emb = emb.unsqueeze(1)  # broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_mask(args: ModelArgs, q_pos: torch.Tensor, k_len: int,
                   key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B or 1, 1, T, k_len] mask over cache slots: causal, windowed for Mistral, minus padded keys.

    A query may always see its own slot, so the rows of padding tokens (which see no real key) stay
    finite: an all-masked row would give NaN, and 0 * NaN in the next layer's attention is still NaN.
    """
    k_pos = torch.arange(k_len, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if args.sliding_window:
        mask &= k_pos[None, :] > q_pos[:, None] - args.sliding_window
    mask = mask[None, None]
    if key_padding is not None:  # [B, k_len], True where the key is a real token
        mask = (mask & key_padding[:, None, None, :]) | (k_pos[None, :] == q_pos[:, None])
    return mask


class KVCache(nn.Module):
    """Preallocated keys and values, written in place at the decoded positions."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               used: int) -> tuple[torch.Tensor, torch.Tensor]:
        # pos: [T]; k, v: [B, kv_heads, T, head_dim] -> the first `used` slots [B, kv_heads, used, head_dim]
        self.k[:, :, pos] = k
        self.v[:, :, pos] = v
        return self.k[:, :, :used], self.v[:, :, :used]


# Decode steps (a query or a few) take the plain-matmul path: torch's CPU flash-attention kernel with a
# mask costs several times the matmuls for one query, and a decode step has no long sequence to tile.
SMALL_QUERY = 4


def small_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention for few queries. q [B, H, T, d]; k, v [B, KV, S, d]; mask [B or 1, 1, T, S]."""
    B, H, T, d = q.shape
    kv = k.shape[1]
    q = q.reshape(B, kv, H // kv * T, d)  # query heads h = g * (H // kv) + r share kv head g
    scores = (q @ k.transpose(-1, -2)).mul_(d**-0.5).view(B, kv, H // kv, T, -1)  # [B, KV, rep, T, S]
    scores.masked_fill_(~mask[:, :, None], float("-inf"))
    return (scores.softmax(-1).view(B, kv, H // kv * T, -1) @ v).view(B, H, T, d)


def causal_attention_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               chunk: int) -> torch.Tensor:
    """Attention of a causal sequence without cache, chunk by chunk of queries, each chunk against the keys up to
    its own end: about (1 + chunk / T) / 2 of the work. torch's CPU flash kernel takes keys in blocks of up to
    512, so on calibration windows (512 tokens) it computes every masked score, with or without is_causal.
    q [B, H, T, d]; k, v [B, KV, T, d]; mask [B or 1, 1, T, T], masking every key after its query."""
    T = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k[:, :, :i + chunk], v[:, :, :i + chunk],
                                                     attn_mask=mask[..., i:i + chunk, :i + chunk], enable_gqa=gqa)
                      for i in range(0, T, chunk)], dim=2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, dist: Dist):
        super().__init__()
        self.n_heads = args.num_heads // dist.size
        self.n_kv_heads = args.num_kv_heads // dist.size
        self.head_dim = args.head_dim
        self.dist = dist
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * args.head_dim
        self.qkv_proj = DenseLinear(args.hidden_size, qkv_out, bias=args.qkv_bias)
        self.o_proj = DenseLinear(self.n_heads * args.head_dim, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                pos: torch.Tensor | None) -> torch.Tensor:
        y = self.attend(self.qkv_proj(x), cos, sin, mask, pos)
        return all_reduce(self.o_proj(y), self.dist)  # row-parallel: sum the ranks' partial outputs

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               pos: torch.Tensor | None, query_chunk: int | None = None) -> torch.Tensor:
        """Fused q/k/v projections [B, T, qkv_out] -> attention output [B, T, heads * head_dim], before o_proj.

        `query_chunk` (calibration: a whole causal sequence, no cache) attends in query chunks of that many tokens,
        each against the keys up to its own end only (see causal_attention_in_chunks)."""
        B, T, _ = qkv.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cache = self.kv_cache
        if (cache is not None and pos is not None and T <= SMALL_QUERY
                and decode.fits(qkv, cos, cache.k, rows=B * T)):
            if hasattr(self, "q_norm"):
                qkv = torch.cat([q.flatten(2), k.flatten(2), v], dim=-1)
            return decode.attend(qkv, cos, sin, cache.k, cache.v, pos, mask, self.n_heads)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, heads, T, head_dim]
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None and pos is not None:
            k, v = self.kv_cache.update(pos, k, v, used=mask.shape[-1])
        if T <= SMALL_QUERY:
            y = small_query_attention(q, k, v, mask)
        elif query_chunk is not None:
            y = causal_attention_in_chunks(q, k, v, mask, query_chunk)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return y.transpose(1, 2).reshape(B, T, q_size)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, dist: Dist):
        super().__init__()
        self.width = args.intermediate_size // dist.size
        self.dist = dist
        self.gate_up_proj = DenseLinear(args.hidden_size, 2 * self.width, bias=False)
        self.down_proj = DenseLinear(self.width, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.down_proj(self.activate(self.gate_up_proj(x))), self.dist)

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Fused gate/up projections [..., 2 * width] -> down_proj's input [..., width]."""
        if decode.fits(gate_up, rows=gate_up.numel() // gate_up.shape[-1]):
            return decode.silu_mul(gate_up)
        gate, up = gate_up.split(self.width, dim=-1)
        return F.silu(gate).mul_(up)  # in place into silu's fresh output: one activation-sized buffer less


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, dist: Dist):
        super().__init__()
        self.self_attn = Attention(args, dist)
        self.mlp = MLP(args, dist)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, pos)
        return h + self.mlp(self.post_attention_layernorm(h))

    def native_step(self) -> tuple | None:
        """This layer for the one-call decode step (decode.layer_step), or None when that call cannot take it."""
        attn, mlp = self.self_attn, self.mlp
        if attn.kv_cache is None or attn.dist.size > 1:  # between ranks the partial sums need an all-reduce
            return None
        qk_norms = (attn.q_norm.weight, attn.k_norm.weight) if hasattr(attn, "q_norm") else None
        products = tuple(linear.native_product() for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                                  mlp.down_proj))
        return decode.layer_step((self.input_layernorm.weight, self.post_attention_layernorm.weight), qk_norms,
                                 products, attn.kv_cache.k, attn.kv_cache.v)


class Backbone(nn.Module):
    """Holds the `model.*` parameters so their names match Hugging Face checkpoints."""

    def __init__(self, args: ModelArgs, dist: Dist):
        super().__init__()
        rows = args.vocab_size // dist.size
        # given a table, nn.Embedding skips its random init, which the loaded weights replace anyway; on the meta
        # device that init alone would import torch's compiler stack (dynamo, inductor, triton: ~150 MiB resident)
        self.embed_tokens = nn.Embedding(rows, args.hidden_size, _weight=torch.empty(rows, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, dist) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    # Decode steps go through every layer in one native call where it can take them (native/layer.c: the same
    # kernels, bit-identical); tests switch it off to compare with the layer-by-layer path.
    fuse_decode_steps = True

    def __init__(self, args: ModelArgs, dist: Dist = Dist()):
        super().__init__()
        self.args = args
        self.dist = dist
        self.decode_plan: list[tuple] | None = None  # the layers for the one-call decode step, with their caches
        self.model = Backbone(args, dist)
        if not args.tie_word_embeddings:
            self.lm_head = DenseLinear(args.hidden_size, args.vocab_size // dist.size, bias=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: each rank embeds the ids in its row range, the sum completes it."""
        table, dtype = self.model.embed_tokens, self.model.norm.weight.dtype  # the table may be fp16 under fp32
        if self.dist.size == 1:
            return table(tokens).to(dtype)
        start = self.dist.rank * table.num_embeddings
        local = tokens - start
        inside = (local >= 0) & (local < table.num_embeddings)
        x = table(local.clamp(0, table.num_embeddings - 1)).to(dtype) * inside.unsqueeze(-1).to(dtype)
        return all_reduce(x, self.dist)

    def setup_cache(self, batch: int, max_len: int) -> None:
        w = self.model.norm.weight
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch, attn.n_kv_heads, max_len, attn.head_dim, w.dtype, w.device)
        steps = [layer.native_step() for layer in self.model.layers]
        self.decode_plan = None if None in steps else steps

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.decode_plan = None

    def fused_step(self, x: torch.Tensor, cached: bool) -> bool:
        """Whether this step goes through the one-call path: a few cached tokens (the per-layer path would take the
        native GEMV for every product and the native attention) of fp32 CPU activations."""
        B, T, _ = x.shape
        return (self.fuse_decode_steps and cached and self.decode_plan is not None and T <= SMALL_QUERY
                and B * T <= GEMV_MAX_ROWS and decode.fits(x, rows=B * T))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor | None = None,
                key_padding: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] ([B, 1, vocab] with `last_only`).

        With a cache set up, `pos` [T] says which cache slots the tokens fill. `positions` [B, T] are the
        RoPE positions when rows differ (left padding); by default they equal the slots. `key_padding`
        [B, slots] marks the real tokens.
        """
        T = tokens.shape[1]
        cached = pos is not None and self.model.layers[0].self_attn.kv_cache is not None
        q_pos = pos if pos is not None else torch.arange(T, device=tokens.device)
        # attend only over the slots filled so far (one host sync per step; the cache is filled in order)
        k_len = int(q_pos[-1]) + 1 if cached else T
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(self.args, q_pos if positions is None else positions, x.dtype)
        mask = attention_mask(self.args, q_pos, k_len, None if key_padding is None else key_padding[:, :k_len])
        if self.fused_step(x, cached):
            first = self.model.layers[0]
            x = decode.decoder_layers(x, self.decode_plan, cos, sin, q_pos, mask, first.self_attn.n_heads,
                                      first.mlp.width, self.args.rms_norm_eps)
        else:
            for layer in self.model.layers:
                x = layer(x, cos, sin, mask, q_pos if cached else None)
        if last_only:  # generation needs only the next token's logits, not [T, vocab] of them
            x = x[:, -1:]
        return self.logits(self.model.norm(x))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return all_gather_last(mixed_linear(h, self.head_weight), self.dist)
