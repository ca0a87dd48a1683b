"""`python -m blocksparse_attn demo`: one Phi-3-small-shaped attention layer through the vLLM-style backend.

A batch of prompts is prefilled (their k/v written to a paged cache), then every sequence decodes a
few tokens, one forward call per step, exactly as an engine drives the layer. Each output is checked
against `blocksparse_attn.reference` (float32, computed per sequence on its full k/v history). Runs on
the GPU when there is one, else on the CPU. Returns a non-zero exit code if an error is over tolerance.
"""
from __future__ import annotations

import random
import statistics
import time

import torch

from .backend import BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionImpl
from .layout import density
from .metadata import BlocksparseFlashAttentionMetadata
from .reference import attention_ref

# Phi-3-small: 32 query heads, 8 kv heads, head size 128, sparse blocks of 64, 16 local blocks, a
# vertical column every 8 blocks, heads sliding by one block; softmax scale 1 / head_size.
NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128
PHI3_SMALL_SPARSITY = dict(block_size=64, local_blocks=16, vert_stride=8, homo_head=False)
KV_BLOCK_SIZE = 16  # tokens per paged-cache block (vLLM's default)

# Relative error ||out - ref|| / ||ref|| allowed per dtype: a few times the rounding of the output
# itself (bf16 keeps 8 mantissa bits, fp16 11), and float32 accumulation for float32.
REL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
MAX_CHECKED_ROWS = 1024  # prefill rows checked per sequence; the reference is slow on long prompts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Layer:
    """The layer, its paged cache, and each sequence's history for the reference."""

    def __init__(self, device, dtype, max_seqlen: int, capacity: list[int], seed: int = 0):
        self.device, self.dtype = device, dtype
        self.impl = BlocksparseFlashAttentionImpl(
            num_heads=NUM_HEADS, head_size=HEAD_SIZE, scale=1.0 / HEAD_SIZE, num_kv_heads=NUM_KV_HEADS,
            alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto",
            blocksparse_params=dict(max_seqlen=max_seqlen, **PHI3_SMALL_SPARSITY))
        # Each sequence gets enough cache blocks for its final length, scattered over the cache as an
        # engine's block allocator would leave them (the kernels must follow the block tables).
        need = [-(-n // KV_BLOCK_SIZE) for n in capacity]
        physical = list(range(sum(need) + 3))  # a few spare blocks that nobody owns
        random.Random(seed).shuffle(physical)
        self.block_tables, start = [], 0
        for n in need:
            self.block_tables.append(physical[start: start + n])
            start += n
        shape = BlocksparseFlashAttentionBackend.get_kv_cache_shape(len(physical), KV_BLOCK_SIZE, NUM_KV_HEADS,
                                                                    HEAD_SIZE)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = [0] * len(capacity)
        self.k_hist = [[] for _ in capacity]  # per sequence: list of [n, Hkv, D] chunks (CPU)
        self.v_hist = [[] for _ in capacity]
        self.gen = torch.Generator().manual_seed(seed)

    def _random(self, rows: int, heads: int) -> torch.Tensor:
        return torch.randn(rows, heads * HEAD_SIZE, generator=self.gen).to(self.dtype)

    def step(self, query_lens: list[int]):
        """One forward call that appends query_lens[r] new tokens to every sequence r.
        Returns (seconds, per-sequence (q, out) pairs as CPU tensors [n, H, D])."""
        total = sum(query_lens)
        q, k, v = self._random(total, NUM_HEADS), self._random(total, NUM_KV_HEADS), self._random(total, NUM_KV_HEADS)
        meta = BlocksparseFlashAttentionMetadata.build(query_lens, self.lens, self.block_tables, KV_BLOCK_SIZE,
                                                       device=self.device)
        qd, kd, vd = q.to(self.device), k.to(self.device), v.to(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.impl.forward(qd, kd, vd, self.kv_cache, meta, 1.0, 1.0)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        out = out.cpu().view(total, NUM_HEADS, HEAD_SIZE)
        q = q.view(total, NUM_HEADS, HEAD_SIZE)
        results, start = [], 0
        for r, n in enumerate(query_lens):
            self.k_hist[r].append(k[start: start + n].view(n, NUM_KV_HEADS, HEAD_SIZE))
            self.v_hist[r].append(v[start: start + n].view(n, NUM_KV_HEADS, HEAD_SIZE))
            self.lens[r] += n
            results.append((q[start: start + n], out[start: start + n]))
            start += n
        return seconds, results

    def error(self, r: int, q: torch.Tensor, out: torch.Tensor, max_rows: int) -> tuple[float, float, int]:
        """(max abs error, relative error, rows checked) of sequence r's newest len(q) outputs."""
        k, v = torch.cat(self.k_hist[r]), torch.cat(self.v_hist[r])
        positions = torch.arange(self.lens[r] - q.shape[0], self.lens[r])
        rows = torch.arange(q.shape[0])
        if q.shape[0] > max_rows:  # the first and last rows, and a random sample in between
            middle = torch.randperm(q.shape[0] - 256, generator=self.gen)[: max_rows - 256] + 128
            rows = torch.cat([rows[:128], middle.sort().values, rows[-128:]])
        want, _ = attention_ref(q[rows], k, v, self.impl.scale, self.impl.pattern, q_positions=positions[rows])
        got = out[rows].float()
        diff = got - want
        return float(diff.abs().max()), float(diff.norm() / want.norm()), rows.numel()


def run_demo(device: str | None = None, seq_len: int | None = None, decode_steps: int = 8,
             dtype: str | None = None, num_seqs: int = 2) -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    cuda = dev.type == "cuda"
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if cuda else torch.float32)
    seq_len = seq_len or (8192 if cuda else 4096)
    if seq_len < 1 or num_seqs < 1 or decode_steps < 0:
        raise SystemExit("--seq-len and --num-seqs must be >= 1, --decode-steps >= 0")
    # Prompts of different, unaligned lengths: seq_len, then shorter ones.
    prompts = [max(1, seq_len - r * (seq_len // (2 * num_seqs) + 37)) for r in range(num_seqs)]
    capacity = [n + decode_steps for n in prompts]
    max_seqlen = max(capacity)
    tol = REL_TOLERANCE[dt]

    name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {dev} ({name}), torch {torch.__version__}, dtype {str(dt).removeprefix('torch.')}")
    print(f"layer: Phi-3-small attention, q heads {NUM_HEADS}, kv heads {NUM_KV_HEADS}, head size {HEAD_SIZE}, "
          f"sparse block {PHI3_SMALL_SPARSITY['block_size']}, local blocks {PHI3_SMALL_SPARSITY['local_blocks']}, "
          f"vertical stride {PHI3_SMALL_SPARSITY['vert_stride']}; paged KV cache, {KV_BLOCK_SIZE} tokens per block")

    # Warm-up on a throw-away layer, so one-time costs (CUDA context, thread pools) are not timed.
    warm = _Layer(dev, dt, 256, [256])
    warm.step([200])
    warm.step([1])

    layer = _Layer(dev, dt, max_seqlen, capacity)
    d = density(layer.impl.pattern, NUM_HEADS, seq_len, NUM_KV_HEADS)
    print(f"pattern at {seq_len} tokens: {d['block_density']:.1%} of causal blocks, "
          f"{d['pair_fraction']:.1%} of causal (q, k) pairs attended")
    print(f"kv cache: {tuple(layer.kv_cache.shape)} ({layer.kv_cache.numel() * layer.kv_cache.element_size() / 2**20:.0f} MiB)")

    ok = True

    def report(errors):
        nonlocal ok
        worst_abs = max(e[0] for e in errors)
        worst_rel = max(e[1] for e in errors)
        good = worst_rel <= tol
        ok &= good
        return f"max abs err {worst_abs:.2e}, rel err {worst_rel:.2e} (tol {tol:.0e}) {'OK' if good else 'FAIL'}"

    seconds, results = layer.step(prompts)
    tokens = sum(prompts)
    print(f"prefill: {num_seqs} sequences of {prompts} tokens (q {tokens} x {NUM_HEADS} x {HEAD_SIZE}), "
          f"{seconds * 1e3:.1f} ms ({tokens / seconds:,.0f} tokens/s)")
    errors = [layer.error(r, q, out, MAX_CHECKED_ROWS) for r, (q, out) in enumerate(results)]
    checked = sum(e[2] for e in errors)
    print(f"  vs reference ({checked} of {tokens} query rows): {report(errors)}")

    step_times, errors = [], []
    for _ in range(decode_steps):
        seconds, results = layer.step([1] * num_seqs)
        step_times.append(seconds)
        errors += [layer.error(r, q, out, 1) for r, (q, out) in enumerate(results)]
    if decode_steps:
        print(f"decode: {decode_steps} steps of {num_seqs} tokens (sequence lengths up to {max(layer.lens)}), "
              f"median {statistics.median(step_times) * 1e3:.2f} ms per step, "
              f"min {min(step_times) * 1e3:.2f} ms")
        print(f"  vs reference (every step): {report(errors)}")
    print("PASS" if ok else "FAIL: error over tolerance")
    return 0 if ok else 1
