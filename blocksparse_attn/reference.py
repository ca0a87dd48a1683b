"""Pure-PyTorch float32 reference of every op, built from the dense token mask of spec §2.

This is the single source of truth for the tests. It never calls the code under test: not the
compiled ops and not `layout.py` (the mask below is written again from the spec's formula), so a bug
shared by the kernels and the layout helpers cannot pass unnoticed. It is slow by design.

Conventions as in csrc/ops.cpp: the paged cache is [NB, Hkv, kvbs, D] per half, slot = block * kvbs +
offset, query rows of a sequence are its last positions.
"""
from __future__ import annotations

import torch


def block_visible(pattern, num_heads: int, num_kv_heads: int, q_blocks: torch.Tensor,
                  k_blocks: torch.Tensor) -> torch.Tensor:
    """Bool [H, len(q_blocks), len(k_blocks)]: is key block j visible to query block i of head h.

    `pattern` is a SparsePattern (parameters read as plain attributes) or a BlockLayout (crow/col).
    """
    i = q_blocks.view(1, -1, 1).long()
    j = k_blocks.view(1, 1, -1).long()
    if hasattr(pattern, "crow"):  # explicit layout
        crow, col = pattern.crow.cpu().long(), pattern.col.cpu().long()
        n = int(max(int(q_blocks.max()), int(k_blocks.max())) + 1) if q_blocks.numel() and k_blocks.numel() else 0
        if n > crow.shape[1] - 1:
            raise ValueError(f"layout has {crow.shape[1] - 1} query blocks, {n} needed")
        dense = torch.zeros(crow.shape[0], n, n, dtype=torch.bool)
        for h in range(crow.shape[0]):
            for row in range(n):
                dense[h, row, col[h, crow[h, row]: crow[h, row + 1]]] = True
        return dense[:, q_blocks.long()][:, :, k_blocks.long()] & (j <= i)
    heads = torch.arange(num_heads) + pattern.head_offset
    if pattern.slide_by_kv_head:
        heads = heads // (num_heads // num_kv_heads)
    off = (heads * pattern.head_sliding_step + 1).view(-1, 1, 1)
    return (j <= i) & ((i - j < pattern.local_blocks) | ((j + off) % pattern.vert_stride == 0))


def token_mask(pattern, num_heads: int, num_kv_heads: int, q_positions: torch.Tensor, k_len: int,
               head: int | None = None) -> torch.Tensor:
    """Bool [H, Lq, k_len] (or [Lq, k_len] for one `head`): query at absolute position p sees key t
    iff its block pair is visible and t <= p (keys at positions >= k_len do not exist)."""
    b = pattern.block_size
    t = torch.arange(k_len)
    q_blocks, k_blocks = q_positions // b, t // b
    visible = block_visible(pattern, num_heads, num_kv_heads, q_blocks.unique(), k_blocks.unique())
    # visible is indexed by the unique blocks; map each token to its block's row / column
    rows = torch.searchsorted(q_blocks.unique(), q_blocks)
    cols = torch.searchsorted(k_blocks.unique(), k_blocks)
    causal = t.view(1, -1) <= q_positions.view(-1, 1)
    if head is not None:
        return visible[head][rows][:, cols] & causal
    return visible[:, rows][:, :, cols] & causal


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pattern,
                  q_positions: torch.Tensor | None = None):
    """One sequence: q [Lq, Hq, D], k/v [Lk, Hkv, D]; queries at q_positions (default: the last Lq
    positions). Returns (out float32 [Lq, Hq, D], lse float32 [Hq, Lq]). A query row that sees no key
    (possible only with an explicit layout missing its diagonal) gets out 0 and lse -inf."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    if q_positions is None:
        q_positions = torch.arange(lk - lq, lk)
    out = torch.zeros(lq, hq, d, dtype=torch.float32)
    lse = torch.full((hq, lq), float("-inf"), dtype=torch.float32)
    if lq == 0:
        return out, lse
    group = hq // hkv
    q32, k32, v32 = q.float().cpu(), k.float().cpu(), v.float().cpu()
    for h in range(hq):  # one head at a time keeps the [Lq, Lk] score matrix small
        mask = token_mask(pattern, hq, hkv, q_positions.cpu(), lk, head=h)
        scores = (q32[:, h] @ k32[:, h // group].T) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        seen = mask.any(-1)
        probs = torch.where(seen[:, None], torch.exp(scores - row_lse[:, None]), torch.zeros_like(scores))
        out[:, h] = probs @ v32[:, h // group]
        lse[h] = torch.where(seen, row_lse, torch.full_like(row_lse, float("-inf")))
    return out, lse


def varlen_prefill_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, pattern):
    """Packed sequences with contiguous k/v: (out [T, Hq, D], lse [Hq, T]) in float32."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"))
    for r in range(len(cu_q) - 1):
        o, l = attention_ref(q[cu_q[r]: cu_q[r + 1]], k[cu_k[r]: cu_k[r + 1]], v[cu_k[r]: cu_k[r + 1]],
                             scale, pattern)
        out[cu_q[r]: cu_q[r + 1]] = o
        lse[:, cu_q[r]: cu_q[r + 1]] = l
    return out, lse


def gather_paged_kv(key_cache, value_cache, block_table_row, seq_len: int):
    """A sequence's first seq_len keys/values from the paged cache: two [seq_len, Hkv, D] tensors.

    Shared pages: caches [NB, Hkv, kvbs, D], block_table_row [max_blocks]. Per-kv-head pages: caches
    [NB, 1, kvbs, D], block_table_row [Hkv, max_blocks] (kv head g's pages in row g); an entry -1 is a
    released page, read as zeros (the ops refuse a call whose queries see one)."""
    kvbs = key_cache.shape[2]
    t = torch.arange(seq_len)
    rows = block_table_row.cpu().long()
    key_cache, value_cache = key_cache.cpu(), value_cache.cpu()
    if rows.dim() == 1:
        blocks, offsets = rows[t // kvbs], t % kvbs
        return key_cache[blocks, :, offsets], value_cache[blocks, :, offsets]
    blocks = rows[:, t // kvbs]                                       # [Hkv, seq_len]
    released = (blocks < 0).T.unsqueeze(-1)                           # [seq_len, Hkv, 1]
    offsets = (t % kvbs).expand_as(blocks)
    k = key_cache[blocks.clamp_min(0), 0, offsets].transpose(0, 1)   # [seq_len, Hkv, D]
    v = value_cache[blocks.clamp_min(0), 0, offsets].transpose(0, 1)
    if not released.any():
        return k, v
    return k.masked_fill(released, 0), v.masked_fill(released, 0)


def paged_prefill_ref(q, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, scale, pattern):
    cu_q, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"))
    for r in range(len(lens)):
        k, v = gather_paged_kv(key_cache, value_cache, block_tables[r], lens[r])
        o, l = attention_ref(q[cu_q[r]: cu_q[r + 1]], k, v, scale, pattern)
        out[cu_q[r]: cu_q[r + 1]] = o
        lse[:, cu_q[r]: cu_q[r + 1]] = l
    return out, lse


def paged_decode_ref(q, key_cache, value_cache, block_tables, seq_lens, scale, pattern):
    """One query per sequence; a sequence with seq_len 0 is padding (out 0, lse -inf)."""
    num_seqs = q.shape[0]
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full((q.shape[1], num_seqs), float("-inf"))
    for r, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k, v = gather_paged_kv(key_cache, value_cache, block_tables[r], seq_len)
        o, l = attention_ref(q[r: r + 1], k, v, scale, pattern)
        out[r], lse[:, r] = o[0], l[:, 0]
    return out, lse


# ---- KV cache ------------------------------------------------------------------------------------

def write_kv_cache_ref(key, value, key_cache, value_cache, slot_mapping):
    """Returns new (key_cache, value_cache) with token t written at slot_mapping[t] (< 0: skipped); with
    slot_mapping [T, Hkv] (per-kv-head pages, caches [NB, 1, kvbs, D]) kv head h of token t at
    slot_mapping[t, h]."""
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    kvbs = key_cache.shape[2]
    for t, slots in enumerate(slot_mapping.tolist()):
        if slot_mapping.dim() == 1:
            if slots >= 0:
                key_cache[slots // kvbs, :, slots % kvbs] = key[t]
                value_cache[slots // kvbs, :, slots % kvbs] = value[t]
            continue
        for h, slot in enumerate(slots):
            if slot >= 0:
                key_cache[slot // kvbs, 0, slot % kvbs] = key[t, h]
                value_cache[slot // kvbs, 0, slot % kvbs] = value[t, h]
    return key_cache, value_cache


def copy_blocks_ref(kv_caches, block_mapping):
    """Returns new caches [2, NB, ...] where every dst block holds what its src block held before."""
    result = []
    for cache in kv_caches:
        new = cache.clone()
        for src, dst in block_mapping.tolist():
            new[:, dst] = cache[:, src]
        result.append(new)
    return result


def swap_blocks_ref(src_kv_cache, dst_kv_cache, block_mapping):
    new = dst_kv_cache.clone()
    for src, dst in block_mapping.tolist():
        new[:, dst] = src_kv_cache[:, src].to(new.device)
    return new


# ---- fp8 caches ----------------------------------------------------------------------------------
# A quantized cache stores fp8(x / scale), rounded to nearest even and saturated to the format's
# largest finite value (NaN stays NaN, ±inf saturates); it is read as float(stored) * scale. The
# rounding below is written out as arithmetic on float32 (no fp8 conversion does the rounding), so
# it checks torch's casts as much as our kernels.

# format -> (mantissa bits, exponent of the smallest normal number, largest finite value)
FP8_FORMATS = {
    torch.float8_e4m3fn: (3, -6, 448.0),
    torch.float8_e5m2: (2, -14, 57344.0),
}


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 format (448 for e4m3fn, 57344 for e5m2)."""
    return FP8_FORMATS[dtype][2]


def _scale_value(scale) -> torch.Tensor:
    """A per-tensor scale (None = 1, a float, or a one-element tensor) as a float32 CPU scalar."""
    if scale is None:
        return torch.tensor(1.0, dtype=torch.float32)
    return torch.as_tensor(scale).detach().cpu().to(torch.float32).reshape(())


def quantize_fp8(x: torch.Tensor, dtype: torch.dtype, scale=None) -> torch.Tensor:
    """What an fp8 cache of `dtype` stores for x (any float dtype): fp8(x / scale) as a CPU tensor of
    `dtype`. x / scale is one float32 division; its result is rounded to the format's grid (spacing
    2^(e - mantissa bits) in the binade [2^e, 2^(e+1)), the subnormal spacing below the smallest
    normal) with ties to even, then clamped to ±max."""
    mantissa_bits, min_exp, largest = FP8_FORMATS[dtype]
    y = x.detach().cpu().to(torch.float32) / _scale_value(scale)
    finite = torch.isfinite(y)
    y_f = torch.where(finite, y, torch.zeros_like(y))
    _, exp = torch.frexp(y_f)  # y = m * 2^exp with 0.5 <= |m| < 1: y's binade starts at 2^(exp - 1)
    binade = torch.clamp(exp - 1, min=min_exp)  # below the smallest normal the spacing stays fixed
    quantum = torch.pow(2.0, (binade - mantissa_bits).to(torch.float32))
    rounded = torch.round(y_f / quantum) * quantum  # exact scaling by powers of two; round() ties to even
    rounded = torch.clamp(rounded, -largest, largest)
    rounded = torch.where(finite, rounded, torch.where(y.isnan(), y, y.sign() * largest))
    return rounded.to(dtype)  # every value is on the grid now: the cast is exact


def dequantize(stored: torch.Tensor, scale=None) -> torch.Tensor:
    """float(stored) * scale in float32 (CPU): what the attention ops read from an fp8 cache."""
    return stored.detach().cpu().to(torch.float32) * _scale_value(scale)


def write_kv_cache_fp8_ref(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None):
    """write_kv_cache_ref for fp8 caches: returns new CPU caches holding quantize_fp8(key, k_scale) /
    quantize_fp8(value, v_scale) at the written slots (the stored bytes are moved as uint8)."""
    as_bytes = lambda t: t.cpu().view(torch.uint8)  # noqa: E731
    k8 = as_bytes(quantize_fp8(key, key_cache.dtype, k_scale))
    v8 = as_bytes(quantize_fp8(value, value_cache.dtype, v_scale))
    new_k, new_v = write_kv_cache_ref(k8, v8, as_bytes(key_cache), as_bytes(value_cache), slot_mapping)
    return new_k.view(key_cache.dtype), new_v.view(value_cache.dtype)
