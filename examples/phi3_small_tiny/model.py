"""A decoder shaped like Phi-3-small, served through blocksparse_attn, plus a dense-mask reference.

Phi-3-small's attention: grouped-query heads (32 q / 8 kv, D = 128), one fused head-major QKV
projection (per kv head: its q_per_kv query heads, then its key, then its value), rotary embeddings,
muP attention scale 1 / head_dim, and block-sparse attention in every layer except every second one,
which is dense (`Config.dense_every` changes that: 1 all dense, 0 all sparse; `Config.homo_head` gives
every head of the sparse layers the same vertical columns). `Config.tiny()` keeps all of that at a size
the CPU tests run in seconds (8 q / 2 kv heads, D = 64, 4 layers, hidden 512, vocab 512, sparse blocks
of 16 tokens, local band 2 blocks, vertical stride 8).

Weights are random from a seed (`init_weights`) in the checkpoint layout; two models read them:
  Phi3SmallTiny       the served model: our backend (paged KV cache), tensor-parallel over heads
  ReferencePhi3Small  plain PyTorch, float32, no cache, dense token mask; for --check and the tests
Their shared pieces (layer norm, rotary, MLP) are ordinary model maths, not the code under test.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from blocksparse_attn import BlocksparseFlashAttentionImpl, BlocksparseFlashAttentionMetadata
from blocksparse_attn import reference
from blocksparse_attn.kv_cache import fp8_dtype_of
from blocksparse_attn.layout import SparsePattern


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int          # q heads in the whole model (all tensor-parallel ranks)
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    max_seqlen: int
    sparse_block_size: int
    local_blocks: int
    vert_stride: int
    dense_every: int = 2    # layer l is dense iff (l + 1) % dense_every == 0, as Phi-3-small; 1: all dense, 0: none
    # The sparse layers' heads all read the same vertical columns (vLLM's homo_head) instead of sliding them by
    # head: a kv group's heads then keep ~1/vert_stride of the old pages instead of ~q_per_kv/vert_stride.
    homo_head: bool = False
    rope_base: float = 10000.0
    embedding_multiplier: float = 10.0  # muP: embeddings scaled up, logits scaled down
    width_multiplier: float = 8.0
    norm_eps: float = 1e-5
    init_scale: float = 4.0  # q/k weights' std in units of 1/sqrt(hidden): peaky, pattern-sensitive attention
    # LongRoPE ("su" scaling, Phi-3-small-128k): 0 = plain rotary. Otherwise positions below
    # rope_original_max rotate with inv_freq / rope_short_factor, the others with inv_freq /
    # rope_long_factor (one factor per frequency, head_dim / 2 of them), and cos / sin are scaled by
    # sqrt(1 + ln(max_seqlen / rope_original_max) / ln(rope_original_max)).
    rope_original_max: int = 0
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()

    @classmethod
    def tiny(cls) -> Config:
        return cls(vocab_size=512, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                   ffn_size=1024, max_seqlen=1024, sparse_block_size=16, local_blocks=2, vert_stride=8)

    @classmethod
    def phi3_small(cls) -> Config:
        """Phi-3-small's sizes (7B parameters: far too big for the CPU; for a GPU run)."""
        return cls(vocab_size=100352, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                   ffn_size=14336, max_seqlen=8192, sparse_block_size=64, local_blocks=16, vert_stride=8,
                   rope_base=1e6, init_scale=1.0)

    @classmethod
    def phi3_small_128k(cls, factors: dict | None = None) -> Config:
        """Phi-3-small-128k: Phi-3-small's layers with 131072 positions through LongRoPE from 8192.
        factors: {"short_factor": [...], "long_factor": [...]} (64 each), e.g. from a checkpoint's
        rope_scaling; default longrope_factors()'s fixed set (the weights are random anyway)."""
        return cls.phi3_small().with_longrope(131072, 8192, factors)

    def with_longrope(self, max_seqlen: int, original_max: int, factors: dict | None = None) -> Config:
        """This config with LongRoPE from original_max up to max_seqlen positions."""
        short, long = longrope_factors(self.head_dim, max_seqlen / original_max) if factors is None else \
            (factors["short_factor"], factors["long_factor"])
        if len(short) != self.head_dim // 2 or len(long) != self.head_dim // 2:
            raise ValueError(f"LongRoPE factors: {self.head_dim // 2} short and long factors expected, got "
                             f"{len(short)} and {len(long)}")
        return dataclasses.replace(self, max_seqlen=max_seqlen, rope_original_max=original_max,
                                   rope_short_factor=tuple(map(float, short)), rope_long_factor=tuple(map(float, long)))

    @property
    def rope_mscale(self) -> float:
        if not self.rope_original_max or self.max_seqlen <= self.rope_original_max:
            return 1.0
        return math.sqrt(1 + math.log(self.max_seqlen / self.rope_original_max) / math.log(self.rope_original_max))

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return 1.0 / self.head_dim  # muP (Phi-3-small's mup_use_scaling), not 1 / sqrt(head_dim)

    def is_dense(self, layer: int) -> bool:
        return self.dense_every > 0 and (layer + 1) % self.dense_every == 0

    def blocksparse_params(self, layer: int, tp_size: int = 1, tp_rank: int = 0) -> dict:
        """The backend's blocksparse_params of one layer on one rank; a dense layer is the same backend with
        vert_stride = 1 (every key block is a vertical column, so the pattern is plain causal)."""
        return dict(max_seqlen=self.max_seqlen, num_heads=self.num_heads // tp_size,
                    num_kv_heads=self.num_kv_heads // tp_size, block_size=self.sparse_block_size,
                    local_blocks=self.local_blocks, vert_stride=1 if self.is_dense(layer) else self.vert_stride,
                    homo_head=self.homo_head and not self.is_dense(layer), tp_size=tp_size, tp_rank=tp_rank)


def init_weights(cfg: Config, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in the checkpoint layout. qkv is [Hkv * (q_per_kv + 2) * D, hidden], head-major:
    rows of kv head g are its q_per_kv query heads, then its key head, then its value head.
    Drawn by `device`'s generator (the values depend on the device; the CPU's are the reproducible
    default) in float32, stored as `dtype`: Phi-3-small's 7B weights are drawn on a GPU in well under a
    second, on the CPU in minutes, and in bfloat16 need no second copy when the model loads them."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    def norm_pair(prefix):
        return {f"{prefix}.weight": 1 + normal(h, std=0.1), f"{prefix}.bias": normal(h, std=0.1)}

    w = {"embed": normal(cfg.vocab_size, h, std=1.0 / cfg.embedding_multiplier)}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}"
        w.update(norm_pair(f"{p}.input_norm"))
        w[f"{p}.qkv"] = normal(cfg.num_kv_heads * (cfg.q_per_kv + 2) * d, h, std=cfg.init_scale / math.sqrt(h))
        w[f"{p}.o_proj"] = normal(h, cfg.num_heads * d, std=1.0 / math.sqrt(cfg.num_heads * d))
        w.update(norm_pair(f"{p}.post_attention_norm"))
        w[f"{p}.gate"] = normal(f, h, std=1.0 / math.sqrt(h))
        w[f"{p}.up"] = normal(f, h, std=1.0 / math.sqrt(h))
        w[f"{p}.down"] = normal(h, f, std=1.0 / math.sqrt(f))
    w.update(norm_pair("final_norm"))
    return w


# ---- shared model maths -------------------------------------------------------------------------------

def longrope_factors(head_dim: int, ratio: float) -> tuple[list[float], list[float]]:
    """A fixed, plausible LongRoPE factor set: short factors 1 (the original rotary below the original
    length), long factors rising geometrically from 1 (the fastest-turning frequency) to `ratio` (the
    slowest), so the slow frequencies stretch over the longer context as LongRoPE's searched ones do."""
    n = head_dim // 2
    return [1.0] * n, [ratio ** (i / (n - 1)) for i in range(n)]


def rope_frequencies(cfg: Config, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary's inverse frequencies [D/2] float32 below and from rope_original_max (equal without
    LongRoPE: the short / long factors divide them). Built once per model, on its device: a CUDA graph
    capture may not copy the factor lists from the host."""
    d = cfg.head_dim
    inv_freq = cfg.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    if not cfg.rope_original_max:
        return inv_freq.to(device), inv_freq.to(device)
    short = inv_freq / torch.tensor(cfg.rope_short_factor, dtype=torch.float32)
    long = inv_freq / torch.tensor(cfg.rope_long_factor, dtype=torch.float32)
    return short.to(device), long.to(device)


def rotary(x: torch.Tensor, positions: torch.Tensor, cfg: Config,
           freqs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, H, D] rotated by the angle of each token's absolute position (NeoX halves layout); with
    LongRoPE each position takes the short or the long factors by itself (>= rope_original_max: long),
    so the result does not depend on how a prompt is chunked or batched. freqs: rope_frequencies(cfg,
    x.device), computed here when not given."""
    d = x.shape[-1]
    short, long = freqs if freqs is not None else rope_frequencies(cfg, x.device)
    pos = positions.to(torch.float32)[:, None]
    if cfg.rope_original_max:
        is_long = positions[:, None] >= cfg.rope_original_max
        angle = pos * torch.where(is_long, long[None, :], short[None, :])     # [T, D/2]
    else:
        angle = pos * short[None, :]
    cos, sin = angle.cos() * cfg.rope_mscale, angle.sin() * cfg.rope_mscale
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def layer_norm(x: torch.Tensor, w: dict, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps)


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Gated GELU; on a tensor-parallel rank gate/up are its rows and down its columns (a partial sum)."""
    return F.linear(F.gelu(F.linear(x, gate), approximate="tanh") * F.linear(x, up), down)


def logits_of(h: torch.Tensor, w: dict, cfg: Config) -> torch.Tensor:
    """Tied LM head (Phi-3-small ties it to the embedding), scaled down by the muP width multiplier."""
    return F.linear(layer_norm(h, w, "final_norm", cfg.norm_eps), w["embed"]) / cfg.width_multiplier


# ---- the served model ---------------------------------------------------------------------------------

class Phi3SmallTiny:
    """The model on one tensor-parallel rank, its attention run by BlocksparseFlashAttentionImpl.

    Rank r holds kv heads [r * Hkv/tp, (r + 1) * Hkv/tp) and their q heads (global q heads
    r * Hq/tp ...): the rows of the fused QKV weight that belong to them (column parallel), the matching
    columns of o_proj (row parallel), 1/tp of the MLP. The partial sums after o_proj and after the MLP's
    down projection are all-reduced over `group`. Embedding, norms and LM head are replicated.
    At load time the rank's QKV rows are regrouped from head-major to [all q | all k | all v], so q, k
    and v are column slices of one GEMM output, with unit last stride as the backend wants, no copy.
    """

    def __init__(self, cfg: Config, weights: dict[str, torch.Tensor], tp_size: int = 1, tp_rank: int = 0,
                 group=None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 kv_cache_dtype: str = "auto", kv_scale: float = 1.0):
        """kv_cache_dtype "auto" keeps K/V in `dtype`; "fp8" / "fp8_e4m3" / "fp8_e5m2" quantize them with one
        scale for K and V of every layer (stored = fp8(x / kv_scale)), kept as a device tensor so captured
        decode graphs read it at replay."""
        if cfg.num_kv_heads % tp_size or cfg.ffn_size % tp_size:
            raise ValueError(f"tp_size={tp_size} must divide num_kv_heads={cfg.num_kv_heads} and "
                             f"ffn_size={cfg.ffn_size}")
        self.cfg, self.tp_size, self.tp_rank, self.group = cfg, tp_size, tp_rank, group
        self.device, self.dtype = torch.device(device), dtype
        self.kv_cache_dtype = kv_cache_dtype
        fp8 = fp8_dtype_of(kv_cache_dtype)
        self.cache_dtype = fp8 or dtype  # what the engine allocates the caches in
        self.kv_scale = None if fp8 is None else torch.full((1,), kv_scale, dtype=torch.float32, device=self.device)
        self.hq, self.hkv = cfg.num_heads // tp_size, cfg.num_kv_heads // tp_size
        self.rope_freqs = rope_frequencies(cfg, self.device)
        d, qpk, f = cfg.head_dim, cfg.q_per_kv, cfg.ffn_size // tp_size

        def put(t):
            return t.to(device=self.device, dtype=dtype).contiguous()

        w = {name: put(t) for name, t in weights.items() if not name.startswith("layers.")}
        self.impls = []
        for layer in range(cfg.num_layers):
            p = f"layers.{layer}"
            for name in ("input_norm", "post_attention_norm"):
                for part in ("weight", "bias"):
                    w[f"{p}.{name}.{part}"] = put(weights[f"{p}.{name}.{part}"])
            rows = weights[f"{p}.qkv"].view(cfg.num_kv_heads, qpk + 2, d, cfg.hidden_size)
            rows = rows[tp_rank * self.hkv: (tp_rank + 1) * self.hkv]                # this rank's kv groups
            w[f"{p}.qkv"] = put(torch.cat([rows[:, :qpk].flatten(0, 2), rows[:, qpk].flatten(0, 1),
                                           rows[:, qpk + 1].flatten(0, 1)]))
            w[f"{p}.o_proj"] = put(weights[f"{p}.o_proj"][:, tp_rank * self.hq * d: (tp_rank + 1) * self.hq * d])
            w[f"{p}.gate"] = put(weights[f"{p}.gate"][tp_rank * f: (tp_rank + 1) * f])
            w[f"{p}.up"] = put(weights[f"{p}.up"][tp_rank * f: (tp_rank + 1) * f])
            w[f"{p}.down"] = put(weights[f"{p}.down"][:, tp_rank * f: (tp_rank + 1) * f])
            self.impls.append(BlocksparseFlashAttentionImpl(
                num_heads=self.hq, head_size=d, scale=cfg.scale, num_kv_heads=self.hkv, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype=kv_cache_dtype,
                blocksparse_params=cfg.blocksparse_params(layer, tp_size, tp_rank)))
        self.w = w

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    @torch.no_grad()  # (torch.inference_mode works for the ops too: tests/test_inference_mode.py)
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: BlocksparseFlashAttentionMetadata | list[BlocksparseFlashAttentionMetadata],
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/positions [T] int64 packed as the metadata says; kv_caches one per layer, [2, NB, kvbs*Hkv*D]
        (shared pages) or [2, NB, kvbs*D] (per-kv-head pages); attn_metadata one for every layer, or a list
        with one per layer (per-kv-head pages: each group of layers has its own pool, so its own slots and
        tables; the batch is the same). Returns logits float32 [len(logits_rows), vocab] (every row when
        logits_rows is None)."""
        cfg, w, d = self.cfg, self.w, self.cfg.head_dim
        per_layer = attn_metadata if isinstance(attn_metadata, (list, tuple)) else [attn_metadata] * cfg.num_layers
        x = F.embedding(input_ids, w["embed"]) * cfg.embedding_multiplier
        for layer, impl in enumerate(self.impls):
            p = f"layers.{layer}"
            qkv = F.linear(layer_norm(x, w, f"{p}.input_norm", cfg.norm_eps), w[f"{p}.qkv"])
            q, k, v = qkv.split([self.hq * d, self.hkv * d, self.hkv * d], dim=1)
            # rotary writes back into the fused buffer: q and k stay column slices of it
            q.copy_(rotary(q.view(-1, self.hq, d), positions, cfg, self.rope_freqs).flatten(1))
            k.copy_(rotary(k.view(-1, self.hkv, d), positions, cfg, self.rope_freqs).flatten(1))
            scale = 1.0 if self.kv_scale is None else self.kv_scale
            attn = impl.forward(q, k, v, kv_caches[layer], per_layer[layer], scale, scale)
            x = x + self._all_reduce(F.linear(attn, w[f"{p}.o_proj"]))
            h = layer_norm(x, w, f"{p}.post_attention_norm", cfg.norm_eps)
            x = x + self._all_reduce(mlp(h, w[f"{p}.gate"], w[f"{p}.up"], w[f"{p}.down"]))
        if logits_rows is not None:
            x = x[logits_rows]
        return logits_of(x, w, cfg).float()


# ---- the reference ------------------------------------------------------------------------------------

def reference_pattern(cfg: Config, layer: int) -> SparsePattern:
    """Spec §2 over the model's global heads (head_offset 0), written from the config, not from
    BlocksparseParams: step = max(1, V // Hq), or 0 with homo_head (every head the same columns)."""
    return SparsePattern(cfg.sparse_block_size, cfg.local_blocks, cfg.vert_stride,
                         0 if cfg.homo_head else max(1, cfg.vert_stride // cfg.num_heads), False, 0)


class ReferencePhi3Small:
    """Plain float32 PyTorch on the CPU: no cache, no tensor parallelism, the checkpoint's head-major QKV
    split by reshaping, and attention as softmax over a dense mask: blocksparse_attn.reference.token_mask
    for the sparse layers, torch.tril for the dense ones. `sparse=False` makes every layer dense (used by
    the tests to show that the pattern matters for the chosen lengths)."""

    def __init__(self, cfg: Config, weights: dict[str, torch.Tensor], sparse: bool = True,
                 kv_cache_dtype: str = "auto", kv_scale: float = 1.0):
        """kv_cache_dtype fp8*: K and V pass through the cache's quantization (reference.quantize_fp8 /
        dequantize with kv_scale) before attention, as the served model reads them."""
        self.cfg, self.sparse = cfg, sparse
        self.kv_fp8, self.kv_scale = fp8_dtype_of(kv_cache_dtype), kv_scale
        self.w = {name: t.float().cpu() for name, t in weights.items()}

    def _mask(self, layer: int, n: int) -> torch.Tensor:
        """Bool [Hq, n, n]."""
        cfg = self.cfg
        if self.sparse and not cfg.is_dense(layer):
            return reference.token_mask(reference_pattern(cfg, layer), cfg.num_heads, cfg.num_kv_heads,
                                        torch.arange(n), n)
        return torch.ones(n, n, dtype=torch.bool).tril().expand(cfg.num_heads, n, n)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n] -> logits float32 [n, vocab] (row p predicts token p + 1)."""
        cfg, w, d = self.cfg, self.w, self.cfg.head_dim
        n = tokens.shape[0]
        positions = torch.arange(n)
        x = F.embedding(tokens.cpu(), w["embed"]) * cfg.embedding_multiplier
        for layer in range(cfg.num_layers):
            p = f"layers.{layer}"
            qkv = F.linear(layer_norm(x, w, f"{p}.input_norm", cfg.norm_eps), w[f"{p}.qkv"])
            qkv = qkv.view(n, cfg.num_kv_heads, cfg.q_per_kv + 2, d)
            q = rotary(qkv[:, :, : cfg.q_per_kv].reshape(n, cfg.num_heads, d), positions, cfg)
            k = rotary(qkv[:, :, cfg.q_per_kv], positions, cfg)
            v = qkv[:, :, cfg.q_per_kv + 1]
            if self.kv_fp8 is not None:
                k, v = (reference.dequantize(reference.quantize_fp8(t, self.kv_fp8, self.kv_scale), self.kv_scale)
                        for t in (k, v))
            k = k.repeat_interleave(cfg.q_per_kv, dim=1)  # q head h reads kv head h // q_per_kv
            v = v.repeat_interleave(cfg.q_per_kv, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * cfg.scale
            probs = scores.masked_fill(~self._mask(layer, n), float("-inf")).softmax(-1)
            attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, cfg.num_heads * d)
            x = x + F.linear(attn, w[f"{p}.o_proj"])
            h = layer_norm(x, w, f"{p}.post_attention_norm", cfg.norm_eps)
            x = x + mlp(h, w[f"{p}.gate"], w[f"{p}.up"], w[f"{p}.down"])
        return logits_of(x, w, cfg)
