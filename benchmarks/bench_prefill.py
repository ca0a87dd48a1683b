"""Prefill benchmark: our block-sparse varlen_prefill (Phi-3-small pattern) against dense causal attention.

Device-agnostic. For every sequence length S it times, in this one process and on the same inputs:
  ours        blocksparse_attn varlen_prefill, q/k/v packed [B*S, H, D], Phi-3-small's pattern (on a
              Hopper GPU the wgmma kernel; `ours-sm80` is the same call forced onto the sm80 kernel)
  sdpa        torch.nn.functional.scaled_dot_product_attention, dense causal, enable_gqa, [B, H, S, D]
  sdpa-flash  / sdpa-cudnn: the same call pinned to one backend (CUDA only, when the backend accepts it)
  flex        torch.compile(flex_attention) with a BlockMask of the same pattern (CUDA only)
  flex-flash  the same through FlexAttention's FLASH backend (FlashAttention-4's kernels, 128-token
              blocks; CUDA, where the backend is installed: ../shared/peers/fa4.sh)
  fa4         FlashAttention-4 (flash_attn.cute.flash_attn_func), dense causal, [B, S, H, D] (CUDA,
              where installed)
  reference   blocksparse_attn.reference (pure PyTorch, float32), only while it is small enough

Effective TFLOP/s = 4 * D * (attended (q, k) pairs of the sparse pattern, summed over heads and
sequences) / time: the SAME work count for every method, so dense methods are charged only for the
useful work and the column compares directly with the times. Speed-up = baseline time / our time.

On CUDA it first times a dense bf16 matmul (8192^3) and reports every method's rate as a fraction
of it. `--dense-pattern` replaces the pattern by dense causal attention (every block visible) to
compare the kernels with cuDNN on the same work. On CUDA the methods' calls take turns (`--timing
turns`, the default: every method sees the same clock of the power-capped card);
`--timing blocks` times each method's calls as one block, as before 2026-12-06.

Example (CPU, the run recorded in benchmarks/RESULTS.md):
    python benchmarks/bench_prefill.py --device cpu --dtype float32
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from blocksparse_attn import ops, reference
from blocksparse_attn.layout import SparsePattern, attended_pairs

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Phi-3-small
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- timing ----------------------------------------------------------------------------------------

def time_cpu(fns, warmup: int, repeats: int) -> float:
    """Median wall time (ms) of calls that cycle through `fns` (one closure per input set)."""
    for w in range(warmup):
        fns[w % len(fns)]()
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fns[r % len(fns)]()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_cuda(fns, warmup: int, repeats: int) -> float:
    """Median time (ms) from CUDA events around each call; inputs rotate so no call sees warm L2 data
    left by the same inputs (two sets of a few hundred MB each exceed the L2 by far)."""
    for w in range(warmup):
        fns[w % len(fns)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for r in range(repeats):
        starts[r].record()
        fns[r % len(fns)]()
        ends[r].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_cuda_interleaved(methods: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Median times (ms) of several methods whose calls take turns: call r of every method runs before
    call r + 1 of any, each timed by its own CUDA events. The H100s and H200s we measure on run at
    their power cap (clock-limit reason: software power cap), where the SM clock of a block of calls
    moved 1330-1560 MHz (benchmarks/probe_clocks.py, 2026-12-06): timed one after the other, each
    method got its block's clock (dense 8k x 4: 3.3-3.9 ms by process for our build, FA4 3.44-3.79).
    Taking turns, every method sees the same clock, and the ratios are those of the cycles at that
    clock; if a kernel's own power draw sets its clock when it runs alone, turns do not show it. Each call
    reads the other input set than the call before it (a global count picks the set), so none finds
    its inputs left in L2. Methods whose first call raises are left out (their error is returned)."""
    errors, live = {}, {}
    for name, fns in methods.items():
        try:
            for w in range(warmup):
                fns[w % len(fns)]()
            live[name] = fns
        except Exception as e:  # a pinned SDPA backend may refuse these shapes: report, go on
            errors[name] = e
    torch.cuda.synchronize()
    events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(repeats)] for name in live}
    call = 0
    for r in range(repeats):
        for name, fns in live.items():
            start, end = events[name][r]
            start.record()
            fns[call % len(fns)]()
            end.record()
            call += 1
    torch.cuda.synchronize()
    times = {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}
    return times, errors


# ---- inputs and methods ----------------------------------------------------------------------------

def make_inputs(batch: int, seq_len: int, dtype, device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = batch * seq_len
    q = torch.randn(t, NUM_HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(t, NUM_KV_HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(t, NUM_KV_HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    cu = torch.arange(0, t + 1, seq_len, dtype=torch.int32, device=device)

    def bhsd(x):  # [B*S, H, D] -> contiguous [B, H, S, D], SDPA's native layout
        return x.view(batch, seq_len, x.shape[1], HEAD_DIM).transpose(1, 2).contiguous()

    def bshd(x):  # [B*S, H, D] -> [B, S, H, D], FlashAttention's layout (a view)
        return x.view(batch, seq_len, x.shape[1], HEAD_DIM)

    return {"q": q, "k": k, "v": v, "cu": cu, "out": torch.empty_like(q),
            "q4": bhsd(q), "k4": bhsd(k), "v4": bhsd(v), "q_bshd": bshd(q), "k_bshd": bshd(k), "v_bshd": bshd(v)}


def layer_pattern(dense: bool = False) -> SparsePattern:
    """Phi-3-small's pattern, or (dense) one local block and a vertical column every block: every
    causal block visible, the dense causal work the dense peers compute."""
    pattern = SparsePattern.phi3_small(NUM_HEADS)
    return SparsePattern(pattern.block_size, 1, 1, 0, False, 0) if dense else pattern


def ours_fn(x, scale, pattern, kernel=None):
    """kernel: None (what the op picks) or "sm80"/"sm90", forced through BSA_PREFILL_KERNEL."""
    def call():
        return ops.varlen_prefill(x["q"], x["k"], x["v"], x["cu"], x["cu"], scale, pattern, out=x["out"])
    if kernel is None:
        return call

    def forced():
        old = os.environ.get("BSA_PREFILL_KERNEL")
        os.environ["BSA_PREFILL_KERNEL"] = kernel
        try:
            return call()
        finally:
            if old is None:
                del os.environ["BSA_PREFILL_KERNEL"]
            else:
                os.environ["BSA_PREFILL_KERNEL"] = old
    return forced


def matmul_tflops(dtype, device) -> float:
    """Dense matmul rate of this GPU (8192^3, median of CUDA-event timings): the ceiling we compare to."""
    n = 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    ms = time_cuda([lambda: a @ b], warmup=5, repeats=20)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def sdpa_fn(x, scale, backend=None):
    def call():
        return F.scaled_dot_product_attention(x["q4"], x["k4"], x["v4"], is_causal=True, scale=scale,
                                              enable_gqa=True)
    if backend is None:
        return call

    from torch.nn.attention import sdpa_kernel

    def pinned():
        with sdpa_kernel(backend):
            return call()
    return pinned


def flex_fns(inputs, scale, pattern, seq_len, device, backend=None):
    """torch.compile(flex_attention) closures with the pattern as a BlockMask; None when unavailable.
    backend "FLASH": FlexAttention's FlashAttention-4 backend, which takes blocks of 128 tokens."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    b, l, v = pattern.block_size, pattern.local_blocks, pattern.vert_stride
    offsets = pattern.vertical_offsets(NUM_HEADS, NUM_KV_HEADS).to(device)

    def mask_mod(batch_idx, h, q_idx, kv_idx):
        qb, kb = q_idx // b, kv_idx // b
        return (kv_idx <= q_idx) & ((qb - kb < l) | ((kb + offsets[h]) % v == 0))

    # _compile=True builds the BlockMask block by block; the eager path materialises the whole
    # [H, S, S] token mask (64 GiB at S = 32k).
    block_mask = create_block_mask(mask_mod, B=None, H=NUM_HEADS, Q_LEN=seq_len, KV_LEN=seq_len, device=device,
                                   _compile=True, **({"BLOCK_SIZE": 128} if backend == "FLASH" else {}))
    options = {"kernel_options": {"BACKEND": backend}} if backend else {}
    flex = torch.compile(flex_attention, dynamic=False)
    return [lambda x=x: flex(x["q4"], x["k4"], x["v4"], block_mask=block_mask, scale=scale, enable_gqa=True,
                             **options)
            for x in inputs]


def fa4_fns(inputs, scale):
    """FlashAttention-4 (dense causal, GQA native) closures; None where flash_attn.cute is not installed."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None

    def call(x):
        out = flash_attn_func(x["q_bshd"], x["k_bshd"], x["v_bshd"], softmax_scale=scale, causal=True)
        return out[0] if isinstance(out, tuple) else out  # (out, lse) in the versions that return both
    return [lambda x=x: call(x) for x in inputs]


def first_call_or_note(name, fns):
    """Runs a peer once (its compilation); on failure prints a one-line note and returns None."""
    if fns is None:
        print(f"  {name}: skipped (not installed; see ../shared/peers/fa4.sh)")
        return None
    try:
        fns[0]()
        return fns
    except Exception as e:  # a backend this torch or GPU lacks: report, go on
        print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")
        return None


def ref_fn(x, scale, pattern):
    return lambda: reference.varlen_prefill_ref(x["q"], x["k"], x["v"], x["cu"].cpu(), x["cu"].cpu(), scale,
                                                pattern)


def sanity_check(x, scale, pattern, seq_len, dtype, candidates) -> dict:
    """Max abs error of each candidate's output against SDPA given the same pattern as an explicit token
    mask (float32, first sequence only). candidates: name -> output [B, Hq, S, D] or [B*S, Hq, D]."""
    b = pattern.block_size
    n = -(-seq_len // b)
    dev = x["q"].device
    blocks = pattern.block_mask(NUM_HEADS, n, NUM_KV_HEADS).to(dev)
    tok = torch.arange(seq_len, device=dev) // b
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=dev).tril()
    group = NUM_HEADS // NUM_KV_HEADS
    # One query head at a time: all heads' float scores at once took 32 GiB at 16k (out of memory on
    # an 80 GB card at 16k x 2 and 32k x 1); one head's take 1 GiB at 16k, 4 GiB at 32k.
    want = torch.stack([
        F.scaled_dot_product_attention(x["q4"][0, h, None].float(), x["k4"][0, h // group, None].float(),
                                       x["v4"][0, h // group, None].float(),
                                       attn_mask=blocks[h][tok][:, tok] & causal, scale=scale)[0]
        for h in range(NUM_HEADS)])
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    errors = {}
    for name, out in candidates.items():
        got = out[0] if out.dim() == 4 else out[:seq_len].transpose(0, 1)
        errors[name] = (got.float() - want).abs().max().item()
        if not errors[name] <= tol:
            raise SystemExit(f"sanity check FAILED at S={seq_len}: max |{name} - sdpa(mask)| = "
                             f"{errors[name]:.3g} > {tol:g}")
    return errors


# ---- main ------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 (CUDA), float32 (CPU)")
    ap.add_argument("--seq-lens", default="1024,2048,4096,8192")
    ap.add_argument("--tokens-per-batch", type=int, default=None,
                    help="batch = tokens / S (default: 32768 on CUDA; on CPU one sequence per S)")
    ap.add_argument("--warmup", type=int, default=None, help="default: 1 (CPU), 5 (CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 3 (CPU), 20 (CUDA)")
    ap.add_argument("--ref-max-tokens", type=int, default=1024,
                    help="time the pure-PyTorch reference up to this many tokens per batch (0: never)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of ours,ours-sm80,sdpa,sdpa-flash,sdpa-cudnn,flex,flex-flash,fa4,"
                         "reference (default: all "
                         "that apply to the device)")
    ap.add_argument("--out-dir", default="out", help="where the CSV and the PNG go")
    ap.add_argument("--dense-pattern", action="store_true",
                    help="dense causal attention through our kernels (every block visible) instead of Phi-3-small's")
    ap.add_argument("--timing", choices=["turns", "blocks"], default="turns",
                    help="CUDA: the methods' calls take turns (default; every method sees the same clock, "
                         "see time_cuda_interleaved), or each method's calls run as one block")
    ap.add_argument("--no-sanity-check", action="store_true",
                    help="time outputs that do not match the reference (ablation builds that change the numerics)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (20 if cuda else 3)
    timer = time_cuda if cuda else time_cpu
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    chosen = None if args.methods is None else {m.strip() for m in args.methods.split(",") if m.strip()}

    known = {"ours", "ours-sm80", "sdpa", "sdpa-flash", "sdpa-cudnn", "flex", "flex-flash", "fa4", "reference"}
    if chosen is not None and chosen - known:
        raise SystemExit(f"--methods: unknown {sorted(chosen - known)}, expected a subset of {sorted(known)}")

    def wanted(method: str) -> bool:
        return chosen is None or method in chosen
    pattern = layer_pattern(args.dense_pattern)
    scale = 1.0 / HEAD_DIM  # Phi-3-small's softmax scale

    dev_name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    print(f"device {device} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {str(dtype).removeprefix('torch.')}")
    print(f"Phi-3-small layer: Hq={NUM_HEADS}, Hkv={NUM_KV_HEADS}, D={HEAD_DIM}; pattern {pattern}")
    peak = matmul_tflops(dtype, device) if cuda and dtype != torch.float32 else None
    if peak:
        print(f"dense {str(dtype).removeprefix('torch.')} matmul 8192^3: {peak:.0f} TFLOP/s (the '% mm' column)")

    rows = []
    for s_idx, seq_len in enumerate(seq_lens):
        tokens = args.tokens_per_batch or (32768 if cuda else seq_len)
        batch = max(1, tokens // seq_len)
        n_sets = 2  # rotate two input sets so consecutive calls do not reuse cached data
        inputs = [make_inputs(batch, seq_len, dtype, device, seed=1000 * seq_len + i) for i in range(n_sets)]
        mask = pattern.block_mask(NUM_HEADS, -(-seq_len // pattern.block_size), NUM_KV_HEADS)
        pairs = batch * int(attended_pairs(mask, seq_len, pattern.block_size).sum())
        causal_pairs = batch * NUM_HEADS * seq_len * (seq_len + 1) // 2
        flops = 4 * HEAD_DIM * pairs

        methods = {"ours": [ours_fn(x, scale, pattern) for x in inputs],
                   "sdpa": [sdpa_fn(x, scale) for x in inputs]}
        if cuda:
            from torch.nn.attention import SDPBackend

            if torch.cuda.get_device_capability(device)[0] == 9:
                methods["ours-sm80"] = [ours_fn(x, scale, pattern, "sm80") for x in inputs]

            for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                methods[name] = [sdpa_fn(x, scale, backend) for x in inputs]
            if wanted("flex"):
                fns = flex_fns(inputs, scale, pattern, seq_len, device)
                if fns is not None:
                    methods["flex"] = fns
            if wanted("flex-flash"):
                fns = first_call_or_note("flex-flash", flex_fns(inputs, scale, pattern, seq_len, device, "FLASH"))
                if fns is not None:
                    methods["flex-flash"] = fns
            if wanted("fa4"):
                fns = first_call_or_note("fa4", fa4_fns(inputs, scale))
                if fns is not None:
                    methods["fa4"] = fns
        if batch * seq_len <= args.ref_max_tokens:
            methods["reference"] = [ref_fn(x, scale, pattern) for x in inputs]

        if s_idx == 0 and not args.no_sanity_check:  # the sparse methods must compute the pattern they are timed on
            outs = {m: methods[m][0]() for m in ("ours", "ours-sm80", "flex", "flex-flash")
                    if m in methods and wanted(m)}
            if args.dense_pattern and "fa4" in methods:  # dense causal: fa4 computes this pattern too
                outs["fa4"] = methods["fa4"][0]().transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D]
            errors = sanity_check(inputs[0], scale, pattern, seq_len, dtype, outs)
            print("sanity: vs SDPA with the same mask at S=%d, max abs error: %s" % (
                seq_len, ", ".join(f"{m} {e:.2e}" for m, e in errors.items()) or "nothing to check"))

        times, failures = {}, {}
        if cuda and args.timing == "turns":
            times, failures = time_cuda_interleaved(
                {name: fns for name, fns in methods.items() if wanted(name) and name != "reference"}, warmup, repeats)
        for name, fns in methods.items():
            if not wanted(name) or name in times or name in failures:
                continue
            slow = name == "reference"
            try:
                times[name] = timer(fns, warmup=0 if slow else warmup, repeats=1 if slow else repeats)
            except Exception as e:  # a pinned SDPA backend may refuse these shapes; report, go on
                failures[name] = e
        for name, e in failures.items():
            print(f"  S={seq_len}: {name} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:90]})")
        for name, ms in times.items():
            rows.append({"S": seq_len, "batch": batch, "method": name, "ms": ms,
                         "eff_tflops": flops / (ms * 1e-3) / 1e12, "attended_pairs": pairs,
                         "matmul_tflops": peak or float("nan"),
                         "causal_pairs": causal_pairs})
        del inputs
        print(f"  S={seq_len} done: " + ", ".join(f"{n} {t:.1f} ms" for n, t in times.items()), flush=True)

    _print_table(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"bench_prefill_{device.type}_{str(dtype).removeprefix('torch.')}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, stem + ".png", f"{dev_name}, {str(dtype).removeprefix('torch.')}")
    print(f"wrote {stem}.csv and {stem}.png")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} cpus" if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def _print_table(rows):
    methods = list(dict.fromkeys(r["method"] for r in rows))
    baselines = [m for m in methods if m != "ours"]
    by = {(r["S"], r["method"]): r for r in rows}
    head = f"{'S':>6} {'batch':>5} {'density':>7} " + " ".join(f"{m + ' ms':>14}" for m in methods)
    head += " " + " ".join(f"{m + ' TF/s':>14}" for m in methods)
    head += " " + " ".join(f"{'x vs ' + m:>14}" for m in baselines)
    print()
    print(head)
    for s in dict.fromkeys(r["S"] for r in rows):
        some = next(r for r in rows if r["S"] == s)
        line = f"{s:>6} {some['batch']:>5} {some['attended_pairs'] / some['causal_pairs']:>7.1%} "
        cells = [by.get((s, m)) for m in methods]
        line += " ".join(f"{c['ms']:>14.2f}" if c else f"{'-':>14}" for c in cells)
        line += " " + " ".join(f"{c['eff_tflops']:>14.3f}" if c else f"{'-':>14}" for c in cells)
        ours = by.get((s, "ours"))
        for m in baselines:
            c = by.get((s, m))
            line += f" {c['ms'] / ours['ms']:>13.2f}x" if c and ours else f" {'-':>14}"
        if ours and ours["matmul_tflops"] == ours["matmul_tflops"]:
            line += f" {ours['eff_tflops'] / ours['matmul_tflops']:>6.0%} mm"
        print(line)
    print("(density: attended (q, k) pairs / causal pairs; TF/s: 4*D*attended pairs / time for every method; "
          "x vs M: time of M / our time; % mm: our TF/s / the dense matmul rate)")


def _plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in methods:
        pts = [(r["S"], r["ms"], r["eff_tflops"]) for r in rows if r["method"] == m]
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=m)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per call")
    ax2.set_ylabel("effective TFLOP/s (sparse work)")
    fig.suptitle(f"prefill, Phi-3-small layer (32 q / 8 kv heads, D=128): {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
