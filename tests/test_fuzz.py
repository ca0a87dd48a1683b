"""Property-based fuzzing (hypothesis) of the attention ops and the backend against the reference.

Every example draws a whole configuration: heads (Hq / Hkv ratios 1 to 8, MQA included), head size,
sparse block size B, local blocks L, vertical stride V, sliding step, homo / q-head / kv-head sliding,
head_offset, cache block size (dividing B or a multiple of it), sequence lengths (1, block boundaries,
random), context lengths (chunked prefill), explicit layouts, the cache (the model dtype mostly, fp8 e4m3 / e5m2
with per-tensor scales, floats or tensors) and the dtype (float32 mostly; float16 and
bfloat16 with the tolerance table of tests/_helpers.py). Inputs are seeded torch tensors, outputs are
NaN-poisoned, and paged caches hold every sequence in shuffled blocks with every unowned slot NaN, as in
test_attention_ops.py. The tests take `device` (conftest.DEVICES; CUDA skipped without a GPU); on CUDA a
float32 draw runs in float16 or bfloat16, the dtypes the GPU kernels support.

Profiles (environment variable BSA_FUZZ_PROFILE):
  ci    (default) a fixed, derandomized set of 300 examples per test; the whole file runs in about 15 s on
        2 CPU cores. Reproducible: the same examples every run.
  long  thousands of random examples per test (BSA_FUZZ_EXAMPLES overrides the count), e.g.
        BSA_FUZZ_PROFILE=long pytest -q tests/test_fuzz.py -s
The number of examples run per test is printed at the end of the module with `-s`.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from _helpers import (
    DTYPE_IDS, NAN, assert_close_to_ref, assert_lse_close, assert_unseen_rows_zero, build_paged_cache, cu_seqlens,
    one_thread, poison, randn,
)
from blocksparse_attn import (BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionImpl,
                              BlocksparseFlashAttentionMetadata, reference)
from blocksparse_attn.layout import BlockLayout, SparsePattern

_ops = torch.ops.blocksparse_attn

# ---- profiles ----------------------------------------------------------------------------------------
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=int(os.environ.get("BSA_FUZZ_EXAMPLES", 300)), deadline=None,
                          derandomize=True, database=None, suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("long", max_examples=int(os.environ.get("BSA_FUZZ_EXAMPLES", 2500)), deadline=None,
                          derandomize=False, database=None, suppress_health_check=_SUPPRESS, print_blob=True)
PROFILE = os.environ.get("BSA_FUZZ_PROFILE", "ci")
FUZZ = settings.get_profile(PROFILE)

EXAMPLES = Counter()  # test name -> examples run (printed at the end of the module)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(EXAMPLES.values())
    print(f"\n[fuzz profile {PROFILE}] examples run: {dict(EXAMPLES)}; total {total}")


# ---- the axes ----------------------------------------------------------------------------------------
DTYPES = [torch.float32] * 6 + [torch.float16, torch.bfloat16]  # fp32 mostly
HEAD_DIMS = [64] * 6 + [80, 96, 112, 128, 256]                 # the big ones rare
BLOCK_SIZES = (16, 32, 64, 128)
KV_BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
HEADS = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (8, 2), (3, 3), (6, 3), (4, 4), (8, 4)]  # (Hq, Hkv)
FP8_CACHES = [None] * 4 + [torch.float8_e4m3fn, torch.float8_e5m2]  # paged caches in the model dtype mostly
CACHE_SCALES = (1.0, 0.05, 0.3, 2.0)  # x / scale of N(0, 1) values: inside both fp8 ranges, or subnormal-heavy


def devices():
    from conftest import DEVICES, device_param
    return [device_param(d) for d in DEVICES]


def use_supported_dtype(device, cfg):
    """float32 attention is CPU-only: on CUDA a float32 draw runs in float16 or bfloat16 instead (rejecting
    those draws with assume() would throw away two thirds of the examples)."""
    if device.startswith("cuda") and cfg.dtype == torch.float32:
        cfg.dtype = (torch.float16, torch.bfloat16)[cfg.seed % 2]


@st.composite
def configs(draw, paged: bool):
    """The shape and pattern of one example (no tensors)."""
    dtype = draw(st.sampled_from(DTYPES))
    hq, hkv = draw(st.sampled_from(HEADS))
    d = draw(st.sampled_from(HEAD_DIMS))
    b = draw(st.sampled_from(BLOCK_SIZES))
    kvbs = draw(st.sampled_from([k for k in KV_BLOCK_SIZES if k % b == 0 or b % k == 0])) if paged else None
    fp8 = draw(st.sampled_from(FP8_CACHES)) if paged else None
    k_scale, v_scale = (draw(st.sampled_from(CACHE_SCALES)) for _ in "kv")
    explicit = draw(st.integers(0, 5)) == 0
    if explicit:
        pattern = None  # made once the lengths are known (it must cover the longest sequence)
    else:
        mode = draw(st.sampled_from(("homo", "qslide", "kvslide")))
        local = draw(st.integers(1, 4))
        vert = draw(st.integers(1, 6))
        step = 0 if mode == "homo" else draw(st.integers(1, 3))
        offset = draw(st.sampled_from((0, 0, 1, 2, 3, 5, hq, 3 * hq, 7 * hq)))
        pattern = SparsePattern(b, local, vert, step, mode == "kvslide", offset)
    scale = draw(st.sampled_from((d ** -0.5, 1.0 / d)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    # token budget for the reference: a few blocks of B, less for the big head sizes
    budget = (8 if d <= 128 else 3) * max(b, 32)
    return SimpleNamespace(dtype=dtype, hq=hq, hkv=hkv, d=d, b=b, kvbs=kvbs, explicit=explicit, pattern=pattern,
                           scale=scale, seed=seed, budget=budget, fp8=fp8, k_scale=k_scale, v_scale=v_scale)


def paged_inputs(cfg, keys, values, gen, device):
    """The paged cache of the sequences' keys/values, and what the reference reads from it: the values
    themselves, or for an fp8 cache the values as stored (quantized with the example's scales, read back
    in float32). Returns (key_cache, value_cache, block_tables, ref_keys, ref_values, scale kwargs)."""
    if cfg.fp8 is None:
        return (*build_paged_cache(keys, values, cfg.kvbs, gen, device), keys, values, {})
    stored_k = [reference.quantize_fp8(k, cfg.fp8, cfg.k_scale) for k in keys]
    stored_v = [reference.quantize_fp8(v, cfg.fp8, cfg.v_scale) for v in values]
    key_cache, value_cache, tables = build_paged_cache([k.float() for k in stored_k], [v.float() for v in stored_v],
                                                       cfg.kvbs, gen, "cpu")  # stored values are exact in float32
    scales = {name: torch.tensor([value], dtype=torch.float32, device=device)
              for name, value in (("k_scale", cfg.k_scale), ("v_scale", cfg.v_scale))}
    return (key_cache.to(cfg.fp8).to(device), value_cache.to(cfg.fp8).to(device), tables.to(device),
            [reference.dequantize(k, cfg.k_scale) for k in stored_k],
            [reference.dequantize(v, cfg.v_scale) for v in stored_v], scales)


def cache_id(cfg) -> str:
    return "" if cfg.fp8 is None else f" cache={str(cfg.fp8).removeprefix('torch.')} k/v scale={cfg.k_scale}/{cfg.v_scale}"


def a_length(draw, b: int, budget: int, minimum: int = 0) -> int:
    """A length: near a block boundary (k*B - 1, k*B, k*B + 1), tiny, or uniform in the budget.
    sampled_from draws uniformly, where st.integers would favour small values."""
    kind = draw(st.sampled_from(("boundary", "boundary", "uniform", "uniform", "tiny")))
    if kind == "boundary":
        n = draw(st.sampled_from(range(max(budget // b, 1) + 1))) * b + draw(st.sampled_from((-1, 0, 1)))
    elif kind == "tiny":
        n = draw(st.sampled_from((0, 1, 2, 3)))
    else:
        n = draw(st.sampled_from(range(budget + 1)))
    return min(max(n, minimum), budget)


def finish_pattern(cfg, max_len: int, gen: torch.Generator):
    """The explicit layout of an example: random per-head causal block masks, sometimes without the
    diagonal (rows that see nothing), covering at least max_len tokens."""
    if not cfg.explicit:
        return cfg.pattern
    n = max(-(-max_len // cfg.b), 1) + int(torch.randint(0, 2, (1,), generator=gen))
    density = float(torch.rand(1, generator=gen)) * 0.8 + 0.1
    mask = torch.rand(cfg.hq, n, n, generator=gen) < density
    mask &= torch.ones(n, n, dtype=torch.bool).tril()
    if bool(torch.rand(1, generator=gen) < 0.7):
        mask |= torch.eye(n, dtype=torch.bool)
    return BlockLayout.from_block_mask(mask, cfg.b)


def op_args(pattern, device):
    return (pattern.to(device) if isinstance(pattern, BlockLayout) else pattern).op_args()


def note_coverage(cfg, max_len: int) -> None:
    """Shown by --hypothesis-show-statistics: what the examples covered."""
    event(f"dtype {DTYPE_IDS[cfg.dtype]}")
    event(f"D {cfg.d}")
    event(f"B {cfg.b}")
    event(f"Hq/Hkv {cfg.hq}/{cfg.hkv}")
    if getattr(cfg, "kvbs", None):
        event(f"kvbs {cfg.kvbs}")
    event("explicit layout" if getattr(cfg, "explicit", False) else "parametric pattern")
    event(f"longest sequence {'<= B' if max_len <= cfg.b else '<= 4B' if max_len <= 4 * cfg.b else '> 4B'}")
    pattern = getattr(cfg, "pattern", None)
    local = pattern.local_blocks if pattern is not None else cfg.params["local_blocks"] if hasattr(cfg, "params") \
        else None
    if local is not None:
        event(f"past the local band: {max_len > (local + 1) * cfg.b}")


def check(out, lse, ref_out, ref_lse, dtype, config):
    assert_close_to_ref(out, ref_out, dtype, config)
    assert_lse_close(lse, ref_lse, dtype, config)
    assert_unseen_rows_zero(out, ref_lse, config)


# ---- the ops ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@FUZZ
@given(cfg=configs(paged=False), data=st.data())
def test_fuzz_varlen_prefill(device, cfg, data):
    use_supported_dtype(device, cfg)
    num_seqs = data.draw(st.sampled_from((1, 1, 2, 3, 4)), label="num_seqs")
    seqs = []
    for _ in range(num_seqs):
        k_len = a_length(data.draw, cfg.b, cfg.budget // num_seqs + 1)
        q_len = k_len if data.draw(st.booleans()) else data.draw(st.integers(0, k_len))  # chunked prefill
        seqs.append((q_len, k_len))
    gen = torch.Generator().manual_seed(cfg.seed)
    pattern = finish_pattern(cfg, max(k for _, k in seqs), gen)
    note_coverage(cfg, max(k for _, k in seqs))
    q_lens, k_lens = [s[0] for s in seqs], [s[1] for s in seqs]
    q = randn((sum(q_lens), cfg.hq, cfg.d), cfg.dtype, gen)
    k, v = randn((sum(k_lens), cfg.hkv, cfg.d), cfg.dtype, gen), randn((sum(k_lens), cfg.hkv, cfg.d), cfg.dtype, gen)
    cu_q, cu_k = cu_seqlens(q_lens, "cpu"), cu_seqlens(k_lens, "cpu")
    config = (f"fuzz varlen_prefill {device} {DTYPE_IDS[cfg.dtype]} D={cfg.d} Hq={cfg.hq} Hkv={cfg.hkv} "
              f"(q_len, k_len)={seqs} scale={cfg.scale:.4g} {pattern!r}")
    with one_thread():
        ref_out, ref_lse = reference.varlen_prefill_ref(q, k, v, cu_q, cu_k, cfg.scale, pattern)
    out = poison(torch.empty(q.shape, dtype=cfg.dtype, device=device))
    lse = poison(torch.empty(cfg.hq, q.shape[0], dtype=torch.float32, device=device))
    _ops.varlen_prefill(out, q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device), cfg.scale,
                        *op_args(pattern, device), lse)
    check(out, lse, ref_out, ref_lse, cfg.dtype, config)
    EXAMPLES["varlen_prefill"] += 1


@pytest.mark.parametrize("device", devices())
@FUZZ
@given(cfg=configs(paged=True), data=st.data())
def test_fuzz_paged_prefill(device, cfg, data):
    use_supported_dtype(device, cfg)
    num_seqs = data.draw(st.sampled_from((1, 1, 2, 3, 4)), label="num_seqs")
    seqs = []  # (context_len, query_len)
    for _ in range(num_seqs):
        n = a_length(data.draw, cfg.b, cfg.budget // num_seqs + 1)
        ctx = data.draw(st.sampled_from((0, n, data.draw(st.integers(0, n)))))
        seqs.append((ctx, n - ctx))
    gen = torch.Generator().manual_seed(cfg.seed)
    seq_lens = [c + n for c, n in seqs]
    q_lens = [n for _, n in seqs]
    pattern = finish_pattern(cfg, max(seq_lens), gen)
    note_coverage(cfg, max(seq_lens))
    q = randn((sum(q_lens), cfg.hq, cfg.d), cfg.dtype, gen)
    keys = [randn((n, cfg.hkv, cfg.d), cfg.dtype, gen) for n in seq_lens]
    values = [randn((n, cfg.hkv, cfg.d), cfg.dtype, gen) for n in seq_lens]
    key_cache, value_cache, tables, keys, values, scales = paged_inputs(cfg, keys, values, gen, device)
    config = (f"fuzz paged_prefill {device} {DTYPE_IDS[cfg.dtype]} D={cfg.d} Hq={cfg.hq} Hkv={cfg.hkv} "
              f"kvbs={cfg.kvbs}{cache_id(cfg)} (context, new)={seqs} scale={cfg.scale:.4g} {pattern!r}")
    with one_thread():
        ref_out, ref_lse = reference.varlen_prefill_ref(q, torch.cat(keys), torch.cat(values), cu_seqlens(q_lens, "cpu"),
                                                        cu_seqlens(seq_lens, "cpu"), cfg.scale, pattern)
    out = poison(torch.empty(q.shape, dtype=cfg.dtype, device=device))
    lse = poison(torch.empty(cfg.hq, q.shape[0], dtype=torch.float32, device=device))
    _ops.paged_prefill(out, q.to(device), key_cache, value_cache, tables, cu_seqlens(q_lens, device),
                       torch.tensor(seq_lens, dtype=torch.int32, device=device), cfg.scale,
                       *op_args(pattern, device), lse, scales.get("k_scale"), scales.get("v_scale"))
    check(out, lse, ref_out, ref_lse, cfg.dtype, config)
    EXAMPLES["paged_prefill"] += 1


@pytest.mark.parametrize("device", devices())
@FUZZ
@given(cfg=configs(paged=True), data=st.data())
def test_fuzz_paged_decode(device, cfg, data):
    use_supported_dtype(device, cfg)
    num_seqs = data.draw(st.integers(1, 6), label="num_seqs")
    # decode is one row per sequence: the reference is cheap, so sequences may be longer
    seq_lens = [a_length(data.draw, cfg.b, 2 * cfg.budget) if data.draw(st.integers(0, 7)) else 0
                for _ in range(num_seqs)]  # 0 = padding row
    gen = torch.Generator().manual_seed(cfg.seed)
    pattern = finish_pattern(cfg, max(max(seq_lens), 1), gen)
    note_coverage(cfg, max(seq_lens))
    q = randn((num_seqs, cfg.hq, cfg.d), cfg.dtype, gen)
    keys = [randn((n, cfg.hkv, cfg.d), cfg.dtype, gen) for n in seq_lens]
    values = [randn((n, cfg.hkv, cfg.d), cfg.dtype, gen) for n in seq_lens]
    key_cache, value_cache, tables, keys, values, scales = paged_inputs(cfg, keys, values, gen, device)
    config = (f"fuzz paged_decode {device} {DTYPE_IDS[cfg.dtype]} D={cfg.d} Hq={cfg.hq} Hkv={cfg.hkv} "
              f"kvbs={cfg.kvbs}{cache_id(cfg)} seq_lens={seq_lens} scale={cfg.scale:.4g} {pattern!r}")
    ref_out = torch.zeros(q.shape)
    ref_lse = torch.full((cfg.hq, num_seqs), -math.inf)
    with one_thread():
        for r, n in enumerate(seq_lens):
            if n:
                o, l = reference.attention_ref(q[r: r + 1], keys[r], values[r], cfg.scale, pattern)
                ref_out[r], ref_lse[:, r] = o[0], l[:, 0]
    out = poison(torch.empty(q.shape, dtype=cfg.dtype, device=device))
    lse = poison(torch.empty(cfg.hq, num_seqs, dtype=torch.float32, device=device))
    _ops.paged_decode(out, q.to(device), key_cache, value_cache, tables,
                      torch.tensor(seq_lens, dtype=torch.int32, device=device), cfg.scale,
                      *op_args(pattern, device), lse, scales.get("k_scale"), scales.get("v_scale"))
    check(out, lse, ref_out, ref_lse, cfg.dtype, config)
    EXAMPLES["paged_decode"] += 1


# ---- the backend: a prefill step, then a mixed step (chunked prefills, decodes, padding) ------------------

@st.composite
def backend_configs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    hq, hkv = draw(st.sampled_from(HEADS))
    d = draw(st.sampled_from(HEAD_DIMS))
    b = draw(st.sampled_from(BLOCK_SIZES))
    kvbs = draw(st.sampled_from([k for k in (8, 16, 32, 64, 128) if k % b == 0 or b % k == 0]))
    mode = draw(st.sampled_from(("homo", "qslide", "kvslide")))
    tp_size = draw(st.sampled_from((1, 1, 2, 4)))
    params = dict(max_seqlen=draw(st.sampled_from((4096, 131072))), block_size=b, local_blocks=draw(st.integers(1, 4)),
                  vert_stride=draw(st.integers(1, 9)), homo_head=mode == "homo", homo_head_group=mode == "kvslide",
                  tp_size=tp_size, tp_rank=draw(st.integers(0, tp_size - 1)))
    kv_cache_dtype = draw(st.sampled_from(("auto",) * 4 + ("fp8", "fp8_e5m2")))
    # scales as floats or as device tensors (vLLM's layers hold tensors)
    scale_kind = draw(st.sampled_from(("float", "tensor")))
    return SimpleNamespace(dtype=dtype, hq=hq, hkv=hkv, d=d, b=b, kvbs=kvbs, params=params,
                           seed=draw(st.integers(0, 2 ** 31 - 1)), budget=(6 if d <= 128 else 2) * max(b, 32),
                           kv_cache_dtype=kv_cache_dtype, scale_kind=scale_kind,
                           k_scale=draw(st.sampled_from(CACHE_SCALES)), v_scale=draw(st.sampled_from(CACHE_SCALES)))


def spec_pattern(p: dict, hq: int, hkv: int) -> SimpleNamespace:
    """Spec §2 for this rank's heads, written from BlocksparseParams' fields (not from its .pattern)."""
    total = p["tp_size"] * (hkv if p["homo_head_group"] else hq)
    step = 0 if p["homo_head"] else max(1, int(p["vert_stride"] / total))
    return SimpleNamespace(block_size=p["block_size"], local_blocks=p["local_blocks"], vert_stride=p["vert_stride"],
                           head_sliding_step=step, slide_by_kv_head=p["homo_head_group"],
                           head_offset=p["tp_rank"] * hq)


@pytest.mark.parametrize("device", devices())
@FUZZ
@given(cfg=backend_configs(), data=st.data())
def test_fuzz_backend(device, cfg, data):
    use_supported_dtype(device, cfg)
    hq, hkv, d, kvbs = cfg.hq, cfg.hkv, cfg.d, cfg.kvbs
    num_seqs = data.draw(st.sampled_from((1, 1, 2, 3, 4)), label="num_seqs")
    prompts = [a_length(data.draw, cfg.b, cfg.budget // num_seqs + 1, minimum=1) for _ in range(num_seqs)]
    # step 2: each sequence either decodes one token or takes a chunk of new tokens (chunked prefill);
    # decodes last, as engines pack them
    second = [1 if data.draw(st.booleans()) else data.draw(st.integers(1, cfg.b + 3)) for _ in range(num_seqs)]
    order = sorted(range(num_seqs), key=lambda r: second[r] == 1)
    padding = data.draw(st.integers(0, 3), label="padding rows")
    note_coverage(cfg, max(p + s for p, s in zip(prompts, second)))
    gen = torch.Generator().manual_seed(cfg.seed)
    impl = BlocksparseFlashAttentionImpl(hq, d, d ** -0.5, hkv, kv_cache_dtype=cfg.kv_cache_dtype,
                                         blocksparse_params=cfg.params)
    pattern = spec_pattern(cfg.params, hq, hkv)
    blocks_needed = sum(-(-(p + s) // kvbs) for p, s in zip(prompts, second))
    num_blocks = blocks_needed + 2
    kv_cache = torch.full(BlocksparseFlashAttentionBackend.get_kv_cache_shape(num_blocks, kvbs, hkv, d), NAN,
                          dtype=cfg.dtype).to(impl.fp8_dtype or cfg.dtype).to(device)
    fp8 = impl.fp8_dtype
    scales = {name: torch.tensor([value], dtype=torch.float32, device=device) if cfg.scale_kind == "tensor" else value
              for name, value in (("k_scale", cfg.k_scale), ("v_scale", cfg.v_scale))}

    def as_stored(x, scale):  # what attention reads back from the cache
        return x if fp8 is None else reference.dequantize(reference.quantize_fp8(x, fp8, scale), scale)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-(p + s) // kvbs))] for p, s in zip(prompts, second)]
    hist_k, hist_v = [None] * num_seqs, [None] * num_seqs
    config = (f"fuzz backend {device} {DTYPE_IDS[cfg.dtype]} D={d} Hq={hq} Hkv={hkv} kvbs={kvbs} {cfg.params} "
              f"cache={cfg.kv_cache_dtype} {cfg.scale_kind} k/v scale={cfg.k_scale}/{cfg.v_scale} "
              f"prompts={prompts} step2={second} padding={padding}")

    def step(seqs, query_lens, context_lens, what):
        md = BlocksparseFlashAttentionMetadata.build(query_lens, context_lens, [tables[r] for r in seqs], kvbs,
                                                     device=device)
        total = sum(query_lens) + padding
        q, k, v = (randn((total, h, d), cfg.dtype, gen) for h in (hq, hkv, hkv))
        start = 0
        for r, n in zip(seqs, query_lens):
            nk, nv = as_stored(k[start: start + n], cfg.k_scale), as_stored(v[start: start + n], cfg.v_scale)
            hist_k[r] = nk if hist_k[r] is None else torch.cat([hist_k[r], nk])
            hist_v[r] = nv if hist_v[r] is None else torch.cat([hist_v[r], nv])
            start += n
        output = poison(torch.empty(total, hq * d, dtype=cfg.dtype, device=device))
        impl.forward(q.flatten(1).to(device), k.flatten(1).to(device), v.flatten(1).to(device), kv_cache, md,
                     output=output, **scales)
        out = output.view(total, hq, d)
        start = 0
        with one_thread():
            for r, n in zip(seqs, query_lens):
                ref, _ = reference.attention_ref(q[start: start + n], hist_k[r], hist_v[r], d ** -0.5, pattern)
                assert_close_to_ref(out[start: start + n], ref, cfg.dtype, f"{config} {what}: seq {r}")
                start += n
        pad = out[start:].float().cpu()
        assert torch.equal(pad, torch.zeros_like(pad)), f"[{config} {what}] padding rows are not zero"

    step(list(range(num_seqs)), prompts, [0] * num_seqs, "prefill")
    step(order, [second[r] for r in order], [prompts[r] for r in order], "mixed step")
    EXAMPLES["backend"] += 1
