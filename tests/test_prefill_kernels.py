"""The two CUDA prefill kernels, each forced by BSA_PREFILL_KERNEL, against the float32 reference.

`auto` picks the Hopper kernel (wgmma, 128-row tiles) on compute capability 9.x for head sizes up to
128 and sparse blocks that are multiples of 64, the sm80 kernel elsewhere; the Hopper kernel has two
K/V ring shapes, 64-key stages (short sequences) and 128-key stages (2k keys or more),
forced by BSA_SM90_STAGE_KEYS. The rest of the suite runs whatever `auto` picks; this file runs the
sm80 kernel and both Hopper shapes over the Hopper kernel's domain (sparse blocks of 64 and 128
tokens: two query blocks per 128-row tile, or one), with the lengths around tile and block edges,
both dtypes, GQA ratios, every pattern mode, explicit layouts and chunked prefill from a shuffled
paged cache. CUDA only: the CPU has one kernel.
"""
from __future__ import annotations

import pytest
import torch

from _helpers import assert_close_to_ref, build_paged_cache, cu_seqlens, make_pattern, random_block_mask
from blocksparse_attn import reference
from blocksparse_attn.layout import BlockLayout, SparsePattern
from test_attention_ops import MODES, run_paged_prefill, run_varlen
from test_fp8_cache import run_prefill_fp8

KERNELS = ("sm80", "sm90", "sm90-k128")  # sm90: 64-key stages; sm90-k128: 128-key stages
LOCAL, VERT = 2, 3


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Forces one prefill kernel, and the Hopper kernel's stage shape, for the test (the host code
    reads the variables per call)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if request.param.startswith("sm90") and not _is_hopper():
        pytest.skip("the Hopper prefill kernel needs a compute capability 9.x GPU")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", request.param.split("-")[0])
    monkeypatch.setenv("BSA_SM90_STAGE_KEYS", "128" if request.param.endswith("k128") else "64")
    return request.param


@pytest.fixture(params=("direct", "gather"))
def paged_path(request, monkeypatch):
    """How a paged prefill reads the cache (BSA_PAGED_PREFILL): its pages, or K/V gathered into
    contiguous tensors in the model's dtype first (fp8 pages widened, their scales folded in by the
    contiguous path)."""
    monkeypatch.setenv("BSA_PAGED_PREFILL", request.param)
    return request.param


def tile_edge_lengths(block_size: int) -> list[tuple[int, int]]:
    """(q_len, k_len) pairs around the 64- and 128-row tile edges and the sparse block edges."""
    b = block_size
    return [(1, 1), (63, 63), (64, 64), (65, 65), (127, 127), (128, 128), (129, 129), (b - 1, b - 1),
            (b + 1, b + 1), (1000, 1000), (5, 4097), (200, 700)]


DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=("fp16", "bf16"))
@pytest.mark.parametrize("block_size", (64, 128), ids=lambda b: f"B{b}")
def test_varlen_lengths(kernel, block_size, dtype, gen):
    pattern = make_pattern("qslide", block_size, LOCAL, VERT, 8, 2)
    run_varlen("cuda", dtype, 8, 2, 128, tile_edge_lengths(block_size), pattern, gen)


@pytest.mark.parametrize("head_dim", (64, 80, 96, 112, 128))
def test_varlen_head_dims(kernel, head_dim, gen):
    pattern = make_pattern("kvslide", 64, LOCAL, VERT, 4, 1)
    run_varlen("cuda", torch.bfloat16, 4, 1, head_dim, [(300, 300), (65, 129), (1, 64)], pattern, gen)


@pytest.mark.parametrize("head_dim", (64, 128), ids=lambda d: f"D{d}")
@pytest.mark.parametrize("kv_layout", ("head_major", "fused"))
def test_varlen_strided_kv(kernel, kv_layout, head_dim, gen):
    """K/V as views of other storage (kv head by kv head; a fused row of k, v and NaN), sequences
    starting at odd tokens: the Hopper kernel reads whole 64-key tiles as 8-row
    groups of whole rows through 5-D maps whose row and group dimensions both step through the tokens
    (head dim 128), so a tile may start anywhere; a row read from the wrong place brings NaN or
    another head's keys."""
    pattern = make_pattern("qslide", 64, LOCAL, VERT, 8, 2)
    run_varlen("cuda", torch.bfloat16, 8, 2, head_dim, [(129, 129), (1000, 1000), (5, 4097), (200, 701)], pattern,
               gen, kv_layout=kv_layout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", ((4, 4), (8, 2), (6, 1)), ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_varlen_modes(kernel, heads, mode, gen):
    hq, hkv = heads
    pattern = make_pattern(mode, 64, LOCAL, VERT, hq, hkv)
    run_varlen("cuda", torch.bfloat16, hq, hkv, 64, [(700, 700), (130, 260)], pattern, gen)


def test_varlen_phi3_small(kernel, gen):
    """Phi-3-small's own pattern (B 64, L 16, V 8) at lengths where the far vertical columns matter."""
    pattern = SparsePattern.phi3_small(num_heads=8, tp_size=4, tp_rank=1)
    run_varlen("cuda", torch.bfloat16, 8, 2, 128, [(2500, 2500), (129, 1200), (1, 1500)], pattern, gen,
               scale=1 / 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=("fp16", "bf16"))
def test_varlen_scores_outgrow_the_running_maximum(kernel, dtype, gen):
    """Keys scaled up by 128-key runs (x1, x1, x6, x1, x50, x0.5, x400, x1), so that a row's scores
    outgrow its running maximum mid-row: by a few units of log2 (the conditional rescale), by more
    than 2^14 (past what a row sum taken against a stale maximum could hold), and by more than 2^128,
    where an exponential against the old reference is infinite. Dense causal rows, every one seeing the jumps
    from its own position on."""
    factors = torch.tensor([1.0, 1.0, 6.0, 1.0, 50.0, 0.5, 400.0, 1.0])

    def key_scale(pos: torch.Tensor) -> torch.Tensor:
        return factors[(pos.long() // 128).clamp(max=len(factors) - 1)]

    pattern = make_pattern("qslide", 64, 40, 1, 8, 2)  # vertical stride 1: every causal block
    run_varlen("cuda", dtype, 8, 2, 128, [(1000, 1000), (130, 1020), (1, 900)], pattern, gen, key_scale=key_scale)


@pytest.mark.parametrize("local_blocks, vert_stride", ((1, 3), (2, 1), (3, 2), (5, 4), (40, 8)),
                         ids=lambda x: str(x))
def test_varlen_band_widths(kernel, local_blocks, vert_stride, gen):
    """Band widths and strides around the Hopper kernel's tile walk: a 128-row tile of two query
    blocks visits the union of their tiles, where each consumer group masks the tiles only the other
    block sees (local_blocks 1: the two bands do not overlap; vert_stride 1: every block is
    vertical; 40: the band covers the sequence)."""
    pattern = make_pattern("qslide", 64, local_blocks, vert_stride, 4, 2)
    run_varlen("cuda", torch.bfloat16, 4, 2, 128, [(1500, 1500), (129, 700), (64, 1000), (1, 1)], pattern, gen)


@pytest.mark.parametrize("diagonal", (True, False), ids=("diag", "nodiag"))
@pytest.mark.parametrize("block_size", (64, 128), ids=lambda b: f"B{b}")
def test_varlen_explicit_layout(kernel, block_size, diagonal, gen):
    """Random per-head layouts: the 128-row tile merges two CSR rows (B 64); rows without keys give
    out 0 and lse -inf."""
    hq, hkv, blocks = 4, 2, 9
    lay = BlockLayout.from_block_mask(random_block_mask(hq, blocks, gen, diagonal), block_size)
    n = blocks * block_size
    _, _, ref_lse = run_varlen("cuda", torch.float16, hq, hkv, 128, [(n, n), (n - 70, n - 3), (1, 65)], lay, gen)
    if not diagonal:
        assert (ref_lse == float("-inf")).any(), "test setup: no query row without keys"


@pytest.mark.parametrize("head_dim", (64, 128), ids=lambda d: f"D{d}")
@pytest.mark.parametrize("kv_block_size", (8, 16, 32, 64, 128), ids=lambda x: f"kvbs{x}")
@pytest.mark.parametrize("dtype", DTYPES, ids=("fp16", "bf16"))
def test_paged_chunked(kernel, paged_path, dtype, kv_block_size, head_dim, gen):
    """Chunked prefill: new tokens at positions context_len.. read the context from a shuffled paged
    cache whose unowned slots are NaN (the Hopper kernel's whole 64-key tiles through the TMA, one box
    per page, for pages of 16 rows or more, issued by the producer's warp pairs with 128-key fills;
    the rest through cp.async). Both head dims: each has its own producer (its box and copy shapes)."""
    pattern = make_pattern("qslide", 64, LOCAL, VERT, 8, 2)
    seqs = [(0, 129), (1, 1), (63, 2), (64, 64), (65, 127), (1000, 300), (4000, 97), (130, 0)]
    run_paged_prefill("cuda", dtype, 8, 2, head_dim, kv_block_size, seqs, pattern, gen)


@pytest.mark.parametrize("fp8", (torch.float8_e4m3fn, torch.float8_e5m2), ids=("e4m3", "e5m2"))
@pytest.mark.parametrize("head_dim", (64, 128), ids=lambda d: f"D{d}")
@pytest.mark.parametrize("kv_block_size", (8, 16, 32, 64, 128), ids=lambda x: f"kvbs{x}")
def test_paged_chunked_fp8(kernel, paged_path, kv_block_size, head_dim, fp8, gen):
    """Chunked prefill over an fp8 cache written by write_kv_cache (unowned slots NaN, scales not 1),
    against the reference over the dequantized cache: pages of every size, the last partial tile, both
    formats (direct: the Hopper kernel's producer loads fp8 rows into registers and widens them;
    gather: the pages widened into contiguous K/V, the scales folded in by the contiguous path)."""
    if kernel.endswith("k128") and paged_path == "direct":
        pytest.skip("the Hopper kernel reads fp8 pages with 64-key fills only")
    out, ref, _, seqs = run_prefill_fp8("cuda", torch.bfloat16, fp8, 8, 2, head_dim, kv_block_size, "phi3", gen)
    assert_close_to_ref(out, ref, torch.bfloat16, f"{kernel} {paged_path} paged_prefill fp8 {fp8} D={head_dim} "
                                                  f"kvbs={kv_block_size} (context, new)={seqs}")


@pytest.mark.parametrize("fp8", (torch.float8_e4m3fn, torch.float8_e5m2), ids=("e4m3", "e5m2"))
def test_paged_gather_fp16_model_over_fp8(kernel, monkeypatch, fp8, gen):
    """The gather widening fp8 pages to fp16 (the other tests' models are bf16), scales not 1, against
    the reference over the dequantized cache."""
    monkeypatch.setenv("BSA_PAGED_PREFILL", "gather")
    out, ref, _, seqs = run_prefill_fp8("cuda", torch.float16, fp8, 8, 2, 128, 16, "phi3", gen)
    assert_close_to_ref(out, ref, torch.float16, f"{kernel} gather fp16 over {fp8} (context, new)={seqs}")


@pytest.mark.parametrize("head_dim", (80, 96, 256), ids=lambda d: f"D{d}")
def test_paged_head_sizes(kernel, paged_path, head_dim, gen):
    """Head sizes below their family's padded width, from the pages (the Hopper kernel's paged TMA boxes
    by 64-column block: eight a 64-key tile at kv block 16, where head dim 128 takes row groups) and
    gathered (its maps read the columns past the row as zeros), and head dim 256 (the portable kernel
    only)."""
    if head_dim > 128 and kernel != "sm80":
        pytest.skip("head dim 256 runs on the portable kernel only")
    pattern = make_pattern("qslide", 64, LOCAL, VERT, 8, 2)
    run_paged_prefill("cuda", torch.bfloat16, 8, 2, head_dim, 16, [(0, 129), (1000, 300), (63, 2)], pattern, gen)


@pytest.mark.parametrize("cache_dtype", (torch.bfloat16, torch.float8_e4m3fn), ids=("bf16", "e4m3"))
@pytest.mark.parametrize("kv_block_size", (16, 64), ids=lambda x: f"kvbs{x}")
def test_paged_bad_page_ids_read_zeros(kernel, paged_path, kv_block_size, cache_dtype, gen):
    """Without BSA_CHECK_INPUTS the GPU does not validate block ids; one outside [0, NB) must read as
    zero keys and values (never memory out of bounds), in whole tiles (the TMA's boxes) and in the last
    partial one (cp.async or registers) alike, from a bf16 cache and an fp8 one (scale 1)."""
    if kernel.endswith("k128") and cache_dtype != torch.bfloat16 and paged_path == "direct":
        pytest.skip("the Hopper kernel reads fp8 pages with 64-key fills only")
    hq, hkv, d, n = 4, 2, 128, 300
    pattern = SparsePattern(64, 16, 8, 1)  # every causal block visible at this length
    # keys and values as the cache holds them (fp8 values are exact in bf16)
    keys = [torch.randn(n, hkv, d, generator=gen).to(cache_dtype).to(torch.bfloat16)]
    values = [torch.randn(n, hkv, d, generator=gen).to(cache_dtype).to(torch.bfloat16)]
    q = torch.randn(n, hq, d, generator=gen).to(torch.bfloat16)
    key_cache, value_cache, tables = build_paged_cache(keys, values, kv_block_size, gen, "cuda")
    key_cache, value_cache = key_cache.to(cache_dtype), value_cache.to(cache_dtype)
    num_blocks = key_cache.shape[0]
    bad = {1: num_blocks + 5, n // kv_block_size: -3}  # a page of a whole tile, the page of the tail
    for logical, page in bad.items():
        tables[0, logical] = page
        rows = slice(logical * kv_block_size, (logical + 1) * kv_block_size)
        keys[0][rows], values[0][rows] = 0, 0
    ref, _ = reference.varlen_prefill_ref(q, keys[0], values[0], cu_seqlens([n], "cpu"), cu_seqlens([n], "cpu"),
                                          d ** -0.5, pattern)
    out = torch.full_like(q, float("nan"), device="cuda")
    torch.ops.blocksparse_attn.paged_prefill(out, q.cuda(), key_cache, value_cache, tables, cu_seqlens([n], "cuda"),
                                             torch.tensor([n], dtype=torch.int32, device="cuda"), d ** -0.5,
                                             *pattern.op_args(), None, None, None)
    assert_close_to_ref(out, ref, torch.bfloat16,
                        f"{kernel} {paged_path} {cache_dtype} kvbs={kv_block_size} bad pages {bad}")


# (context, new) a sequence, and whether the queries cover half of the gathered rows, a quarter
GATHER_CASES = {"prompts": ([(0, 1000), (0, 700), (0, 1000)], True, True),
                "quarter": ([(1500, 700), (1000, 500)], False, True),
                "chunks": ([(4000, 97), (3000, 300)], False, False)}


@pytest.mark.parametrize("cache_dtype", (torch.bfloat16, torch.float8_e4m3fn), ids=("bf16", "e4m3"))
@pytest.mark.parametrize("path", ("auto", "direct", "gather"))
@pytest.mark.parametrize("case", GATHER_CASES)
def test_paged_path_gathers_as_its_setting_says(kernel, monkeypatch, path, case, cache_dtype, gen):
    """BSA_PAGED_PREFILL=auto never gathers where the Hopper kernel reads bf16 pages with 128-key
    fills (through the TMA, at kv block 16 here); elsewhere it gathers where the queries cover at least
    half of the rows the gather would copy, a quarter from an fp8 cache or on the portable kernel
    (whole prompts, chunks that are most of their context: the gathered K/V show in the call's peak
    memory) and reads the pages otherwise (chunks over longer contexts: no such transient); direct
    never gathers, gather always (direct once fell through to auto, so that whole prompts tested as
    direct ran the gather). All against the reference."""
    seqs, covered_half, covered_quarter = GATHER_CASES[case]
    fp8 = cache_dtype != torch.bfloat16
    if kernel == "sm90-k128" and not fp8:
        auto_gathers = False
    else:
        auto_gathers = covered_quarter if fp8 or kernel == "sm80" else covered_half
    gathers = {"auto": auto_gathers, "direct": False, "gather": True}[path]
    if kernel.endswith("k128") and fp8 and not gathers:
        pytest.skip("the Hopper kernel reads fp8 pages with 64-key fills only")
    monkeypatch.setenv("BSA_PAGED_PREFILL", path)
    hq, hkv, d, kvbs = 8, 2, 128, 16
    pattern = make_pattern("qslide", 64, LOCAL, VERT, hq, hkv)
    seq_lens, q_lens = [c + n for c, n in seqs], [n for _, n in seqs]
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(torch.bfloat16)
    # keys and values as the cache holds them (fp8 values are exact in bf16; scales 1)
    keys = [torch.randn(n, hkv, d, generator=gen).to(cache_dtype).to(torch.bfloat16) for n in seq_lens]
    values = [torch.randn(n, hkv, d, generator=gen).to(cache_dtype).to(torch.bfloat16) for n in seq_lens]
    key_cache, value_cache, tables = build_paged_cache(keys, values, kvbs, gen, "cuda")
    key_cache, value_cache = key_cache.to(cache_dtype), value_cache.to(cache_dtype)
    rows = tables.shape[0] * tables.shape[1] * kvbs
    gathered_bytes = 2 * rows * hkv * d * q.element_size()  # fp8 pages gather widened to the model's dtype
    for share, covered in ((2, covered_half), (4, covered_quarter)):
        assert (share * sum(q_lens) >= rows) == covered, f"test setup: the rule's sides, 1/{share} of the rows"
    ref, _ = reference.varlen_prefill_ref(q, torch.cat(keys), torch.cat(values), cu_seqlens(q_lens, "cpu"),
                                          cu_seqlens(seq_lens, "cpu"), d ** -0.5, pattern)
    args = (q.cuda(), key_cache, value_cache, tables, cu_seqlens(q_lens, "cuda"),
            torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), d ** -0.5, *pattern.op_args(), None, None, None)
    out = torch.full_like(args[0], float("nan"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.ops.blocksparse_attn.paged_prefill(out, *args)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - before
    assert (transient >= gathered_bytes if gathers else transient < gathered_bytes // 2), \
        f"{kernel} {path} {cache_dtype} {seqs}: peak {transient} bytes over the inputs, the gather takes {gathered_bytes}"
    assert_close_to_ref(out, ref, torch.bfloat16, f"{kernel} paged {path} {cache_dtype} (context, new)={seqs}")


def test_sm80_mask_with_a_sliding_step_near_int_max(kernel, gen):
    """The portable kernel's element mask (sparse blocks of 16) tells a vertical block by its residue,
    never forming j + off(h): the last head's offset here is 2^31 - 1, so the sum would overflow."""
    if kernel != "sm80":
        pytest.skip("sparse blocks of 16 run on the portable kernel only")
    pattern = SparsePattern(16, 2, 3, 715827882)  # offsets 1, s + 1, 2s + 1, 3s + 1 = 2^31 - 1
    run_varlen("cuda", torch.bfloat16, 4, 4, 128, [(300, 300), (77, 77)], pattern, gen)


@pytest.mark.parametrize("order, tail", (("tile", "auto"), ("kv_head", "256"), ("kv_head", "off")),
                         ids=("tile", "kv_head", "kv_head-no-tail"))
@pytest.mark.parametrize("hq, hkv", ((8, 2), (6, 3), (4, 4)), ids=("gqa4", "gqa2", "mha"))
def test_unit_orders(kernel, monkeypatch, order, tail, hq, hkv, gen):
    """Both numberings of a sequence's work units, forced (BSA_PREFILL_UNIT_ORDER; `auto`: the next
    test), kv head by kv head with and without the tail of the first tiles tile by tile
    (BSA_PREFILL_KV_TAIL; 256 keys: one or two of the tiles here, none of a chunk past them): every
    (tile, head) exactly once, for sequences of one tile, many tiles, and queries that start mid-tile
    (chunked prefill)."""
    monkeypatch.setenv("BSA_PREFILL_UNIT_ORDER", order)
    monkeypatch.setenv("BSA_PREFILL_KV_TAIL", tail)
    pattern = make_pattern("qslide", 64, LOCAL, VERT, hq, hkv)
    run_varlen("cuda", torch.bfloat16, hq, hkv, 128, [(700, 700), (1, 1), (130, 260), (64, 64), (385, 385)],
               pattern, gen)
    run_paged_prefill("cuda", torch.float16, hq, hkv, 128, 16, [(1000, 300), (0, 129), (63, 2)], pattern, gen)


@pytest.mark.parametrize("kv_group", ("2", "3", "8", "l2"))
@pytest.mark.parametrize("hq, hkv", ((8, 4), (12, 6)), ids=("gqa2", "gqa2-kv6"))
def test_kv_head_groups(kernel, monkeypatch, kv_group, hq, hkv, gen):
    """Numbered kv head by kv head, a sequence's units go through its kv heads in groups of
    BSA_PREFILL_KV_GROUP (cut to a divisor of the kv heads: 3 of 4 is 2, 8 is all of them; `l2`: per
    sequence, here the largest power of two dividing the kv heads, 4 and 2): every (tile, head) still
    exactly once, contiguous and paged, with a tail of tiles below 256 keys tile by tile."""
    monkeypatch.setenv("BSA_PREFILL_UNIT_ORDER", "kv_head")
    monkeypatch.setenv("BSA_PREFILL_KV_GROUP", kv_group)
    monkeypatch.setenv("BSA_PREFILL_KV_TAIL", "256")
    pattern = make_pattern("qslide", 64, LOCAL, VERT, hq, hkv)
    run_varlen("cuda", torch.bfloat16, hq, hkv, 128, [(700, 700), (1, 1), (130, 260), (385, 385)], pattern, gen)
    run_paged_prefill("cuda", torch.float16, hq, hkv, 128, 16, [(1000, 300), (63, 2)], pattern, gen)


def test_unit_order_chosen_per_sequence(kernel, monkeypatch, gen):
    """`auto` numbers the units of a sequence whose K/V outgrow the L2 kv head by kv head and those of
    the batch's other sequences tile by tile (each decides by its own length): every (tile, head)
    still exactly once, with both numberings in one batch."""
    monkeypatch.delenv("BSA_PREFILL_UNIT_ORDER", raising=False)
    hq = hkv = 32  # 16 KB of K/V a key: past the L2 at a few thousand keys
    long_keys = torch.cuda.get_device_properties(0).L2_cache_size // (2 * hkv * 128 * 2) + 100
    pattern = make_pattern("qslide", 64, LOCAL, VERT, hq, hkv)
    run_varlen("cuda", torch.bfloat16, hq, hkv, 128, [(130, 260), (64, long_keys), (1, 1), (200, 200)], pattern, gen)


@pytest.mark.parametrize("stage_keys", ("64", "128"))
@pytest.mark.parametrize("ctas", (1, 3))
def test_sm90_few_persistent_ctas(monkeypatch, ctas, stage_keys, gen):
    """The Hopper kernel's CTAs are persistent: with 1 or 3 of them (BSA_SM90_GRID) each CTA runs
    dozens of units of uneven length, reusing its Q buffers and ring across units and sequences
    (the default grid gives the small shapes above about one unit per CTA)."""
    if not _is_hopper():
        pytest.skip("the Hopper prefill kernel needs a compute capability 9.x GPU")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", "sm90")
    monkeypatch.setenv("BSA_SM90_GRID", str(ctas))
    monkeypatch.setenv("BSA_SM90_STAGE_KEYS", stage_keys)
    pattern = make_pattern("qslide", 64, LOCAL, VERT, 4, 2)
    run_varlen("cuda", torch.bfloat16, 4, 2, 128, [(700, 700), (1, 1), (130, 260), (64, 64), (1000, 1000)],
               pattern, gen)
    run_paged_prefill("cuda", torch.float16, 4, 2, 128, 16, [(1000, 300), (0, 129), (63, 2)], pattern, gen)


@pytest.mark.parametrize("stage_keys", ("64", "128"))
def test_sm90_without_tma(monkeypatch, stage_keys, gen):
    """Q and contiguous K/V reach the Hopper kernel through the TMA (K/V whole tiles; a sequence's
    last partial tile through zero-filling cp.async copies); BSA_SM90_TMA=0 sends everything the
    second way (as for tensors whose strides the TMA cannot express)."""
    if not _is_hopper():
        pytest.skip("the Hopper prefill kernel needs a compute capability 9.x GPU")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", "sm90")
    monkeypatch.setenv("BSA_SM90_TMA", "0")
    monkeypatch.setenv("BSA_SM90_STAGE_KEYS", stage_keys)
    pattern = make_pattern("kvslide", 64, LOCAL, VERT, 8, 2)
    run_varlen("cuda", torch.float16, 8, 2, 96, [(700, 700), (65, 129), (1, 64)], pattern, gen)


@pytest.mark.parametrize("stage_keys", ("64", "128"))
def test_sm90_units_without_keys_through_cp_async(monkeypatch, stage_keys, gen):
    """A CTA that runs several units without key tiles in a row, with Q through cp.async: each such
    unit is one fill (its end record) that carries copies, so the producer must publish it before
    it waits for that unit's Q buffer to come back (one CTA, the TMA off, a layout whose first four
    query blocks see nothing: the last eight units the CTA claims)."""
    if not _is_hopper():
        pytest.skip("the Hopper prefill kernel needs a compute capability 9.x GPU")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", "sm90")
    monkeypatch.setenv("BSA_SM90_TMA", "0")
    monkeypatch.setenv("BSA_SM90_GRID", "1")
    monkeypatch.setenv("BSA_SM90_STAGE_KEYS", stage_keys)
    hq, hkv, blocks = 4, 2, 8
    mask = random_block_mask(hq, blocks, gen, diagonal=True)
    mask[:, :4, :] = False
    lay = BlockLayout.from_block_mask(mask, 64)
    n = blocks * 64
    _, _, ref_lse = run_varlen("cuda", torch.float16, hq, hkv, 128, [(n, n), (n - 70, n - 3)], lay, gen)
    assert (ref_lse == float("-inf")).any(), "test setup: no query row without keys"


def test_forced_sm90_outside_its_domain_is_an_error(monkeypatch, gen):
    """Forcing the Hopper kernel where it cannot run fails loudly instead of falling back."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", "sm90")
    pattern = make_pattern("qslide", 32, LOCAL, VERT, 4, 2)  # blocks of 32: not a multiple of 64
    with pytest.raises(RuntimeError, match="sm90"):
        run_varlen("cuda", torch.float16, 4, 2, 64, [(100, 100)], pattern, gen)


@pytest.fixture(params=("tma", "no-tma"))
def packed_heads(request, monkeypatch):
    """The Hopper kernel with a kv group's q heads packed into one work unit (BSA_PREFILL_PACK_GQA=1;
    64-key fills, the only shape that packs), with Q and K/V through the TMA or through cp.async."""
    if not _is_hopper():
        pytest.skip("the Hopper prefill kernel needs a compute capability 9.x GPU")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", "sm90")
    monkeypatch.setenv("BSA_PREFILL_PACK_GQA", "1")
    monkeypatch.setenv("BSA_SM90_STAGE_KEYS", "auto")
    monkeypatch.setenv("BSA_SM90_TMA", "0" if request.param == "no-tma" else "1")
    return request.param


# (q_len, k_len): short query runs around the packed tiles' edges (128 / G tokens), runs that start
# mid-sequence (a context before them), and one long run of many tiles.
PACKED_SEQS = [(1, 1), (31, 31), (32, 32), (33, 33), (5, 70), (64, 64), (100, 100), (17, 300), (129, 129),
               (3, 1000), (700, 700)]


@pytest.mark.parametrize("hq, hkv", ((8, 2), (8, 4), (16, 2), (32, 2), (64, 1)), ids=("gqa4", "gqa2", "gqa8", "gqa16", "gqa64"))
@pytest.mark.parametrize("head_dim", (64, 80, 128))
def test_sm90_packed_heads_varlen(packed_heads, hq, hkv, head_dim, gen):
    """Packed heads against the reference (out, lse, rows without keys): every row is (token, head)
    of the unit's tile, so a wrong token or head in the Q load, the mask, the lse or the store fails."""
    pattern = make_pattern("qslide", 64, 1, 1, hq, hkv)  # every causal block visible
    run_varlen("cuda", torch.bfloat16, hq, hkv, head_dim, PACKED_SEQS, pattern, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=("fp16", "bf16"))
def test_sm90_packed_heads_phi3_short(packed_heads, dtype, gen):
    """Phi-3-small's pattern on a batch whose keys fit in its local band (every block visible, though
    the heads' vertical columns differ): packing is allowed and right."""
    pattern = make_pattern("qslide", 64, 16, 8, 32, 8)
    run_varlen("cuda", dtype, 32, 8, 128, [(32, 32)] * 8 + [(100, 100), (1, 500), (63, 63)], pattern, gen)


@pytest.mark.parametrize("kv_block_size", (8, 16, 64), ids=lambda x: f"kvbs{x}")
def test_sm90_packed_heads_paged(packed_heads, kv_block_size, gen):
    """Chunked prefill from a shuffled paged cache with packed heads: short new runs after contexts."""
    pattern = make_pattern("qslide", 64, 1, 1, 8, 2)
    seqs = [(1000, 3), (0, 33), (63, 2), (130, 64), (1, 1), (0, 200)]
    run_paged_prefill("cuda", torch.float16, 8, 2, 128, kv_block_size, seqs, pattern, gen)


@pytest.mark.parametrize("fp8", (torch.float8_e4m3fn, torch.float8_e5m2), ids=("e4m3", "e5m2"))
@pytest.mark.parametrize("kv_block_size", (16, 64), ids=lambda x: f"kvbs{x}")
def test_sm90_packed_heads_fp8(packed_heads, kv_block_size, fp8, gen):
    """Packed heads over an fp8 cache (the producer widens the pages; Q is packed as above)."""
    out, ref, _, seqs = run_prefill_fp8("cuda", torch.bfloat16, fp8, 8, 2, 128, kv_block_size, "dense", gen)
    assert_close_to_ref(out, ref, torch.bfloat16, f"packed heads fp8 {fp8} kvbs={kv_block_size} {seqs}")


@pytest.mark.parametrize("case", ("sparse", "mha", "kv-head-order", "sm80", "k128"))
def test_forced_packed_heads_outside_their_domain_is_an_error(monkeypatch, case, gen):
    """BSA_PREFILL_PACK_GQA=1 where heads cannot share units (their key blocks differ, one head per kv
    head, the kv-head-major numbering, the sm80 kernel, 128-key fills forced) fails loudly, naming the
    knob."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if case != "sm80" and not _is_hopper():
        pytest.skip("the Hopper prefill kernel needs a compute capability 9.x GPU")
    monkeypatch.setenv("BSA_PREFILL_PACK_GQA", "1")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", "sm80" if case == "sm80" else "sm90")
    if case == "kv-head-order":
        monkeypatch.setenv("BSA_PREFILL_UNIT_ORDER", "kv_head")
    if case == "k128":
        monkeypatch.setenv("BSA_SM90_STAGE_KEYS", "128")
    hq, hkv = (4, 4) if case == "mha" else (8, 2)
    local, vert = (LOCAL, VERT) if case == "sparse" else (1, 1)
    pattern = make_pattern("qslide", 64, local, vert, hq, hkv)
    with pytest.raises(RuntimeError, match="BSA_PREFILL_PACK_GQA"):
        run_varlen("cuda", torch.float16, hq, hkv, 64, [(300, 300)], pattern, gen)


# Every run-time knob (csrc/common/settings.h, docs/settings.md) rejects a value it does not know.
BAD_KNOB_VALUES = (("BSA_PREFILL_KERNEL", "fastest"), ("BSA_PREFILL_UNIT_ORDER", "head"),
                   ("BSA_PREFILL_KV_GROUP", "0"), ("BSA_PREFILL_KV_TAIL", "0"), ("BSA_PREFILL_KV_TAIL", "none"),
                   ("BSA_SM90_STAGE_KEYS", "96"), ("BSA_SM90_GRID", "-1"), ("BSA_SM90_GRID", "many"),
                   ("BSA_SM90_GRID", "9" * 25),
                   ("BSA_SM90_TMA", "yes"), ("BSA_CHECK_INPUTS", "true"), ("BSA_DECODE_SPLITS", "4x"),
                   ("BSA_DECODE_SPLITS", "0"), ("BSA_PREFILL_PACK_GQA", "yes"),
                   ("BSA_DECODE_MERGE", "dsmem"))


@pytest.mark.parametrize("knob, value", BAD_KNOB_VALUES, ids=lambda x: str(x))
def test_bad_knob_value_is_an_error(monkeypatch, knob, value, gen):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    monkeypatch.setenv(knob, value)
    pattern = make_pattern("qslide", 64, LOCAL, VERT, 4, 2)
    with pytest.raises(RuntimeError, match=knob):
        run_varlen("cuda", torch.float16, 4, 2, 64, [(100, 100)], pattern, gen)


@pytest.mark.parametrize("local_blocks, vert_stride", ((1, 1), (300, 8), (2, 3)), ids=("dense", "wide-band", "sparse"))
def test_sm90_auto_stage_keys(monkeypatch, local_blocks, vert_stride, gen):
    """`auto` takes 128-key stages where the sequences are not short (2k keys or more), dense or
    sparse, 64-key stages otherwise: short and long sequences under each pattern, every choice right."""
    if not _is_hopper():
        pytest.skip("the Hopper prefill kernel needs a compute capability 9.x GPU")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", "sm90")
    monkeypatch.setenv("BSA_SM90_STAGE_KEYS", "auto")
    pattern = make_pattern("qslide", 64, local_blocks, vert_stride, 4, 2)
    run_varlen("cuda", torch.bfloat16, 4, 2, 128, [(1500, 1500), (129, 700), (1, 1)], pattern, gen)
    run_varlen("cuda", torch.bfloat16, 4, 2, 128, [(300, 9000), (130, 8200)], pattern, gen)
    run_paged_prefill("cuda", torch.float16, 4, 2, 128, 16, [(1000, 300), (0, 129)], pattern, gen)
    run_paged_prefill("cuda", torch.float16, 4, 2, 128, 64, [(8100, 200), (0, 65)], pattern, gen)


def test_bad_stage_keys_is_an_error(monkeypatch, gen):
    if not _is_hopper():
        pytest.skip("the Hopper prefill kernel needs a compute capability 9.x GPU")
    monkeypatch.setenv("BSA_PREFILL_KERNEL", "sm90")
    monkeypatch.setenv("BSA_SM90_STAGE_KEYS", "96")
    pattern = make_pattern("qslide", 64, LOCAL, VERT, 4, 2)
    with pytest.raises(RuntimeError, match="BSA_SM90_STAGE_KEYS"):
        run_varlen("cuda", torch.float16, 4, 2, 64, [(100, 100)], pattern, gen)
