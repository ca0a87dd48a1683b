"""Command line: `python -m blocksparse_attn {pattern,retention,demo} ...` (see `--help` of each).

Kept thin: the pattern logic and its pictures live in layout.py, the demo in demo.py.
"""
from __future__ import annotations

import argparse
import sys


def _pattern_from_args(args):
    """The SparsePattern of a layer described by the flags, derived as the backend derives it (spec §2)."""
    from .metadata import BlocksparseParams

    try:
        params = BlocksparseParams(max_seqlen=args.seq_len, num_heads=args.num_heads,
                                   num_kv_heads=args.num_kv_heads, block_size=args.block_size,
                                   local_blocks=args.local_blocks, vert_stride=args.vert_stride,
                                   homo_head=args.homo_head, homo_head_group=args.homo_head_group,
                                   tp_size=args.tp_size, tp_rank=args.tp_rank)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return params.pattern


def _add_pattern_flags(p) -> None:
    """The flags that describe a layer's pattern, read back by _pattern_from_args."""
    p.add_argument("--num-heads", type=int, default=32, help="q heads on this rank")
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=16)
    p.add_argument("--vert-stride", type=int, default=8)
    p.add_argument("--homo-head", action="store_true", help="every head has the same pattern")
    p.add_argument("--homo-head-group", action="store_true", help="the pattern slides per kv head")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--tp-rank", type=int, default=0)


def _matplotlib_missing(command: str, prints: str) -> bool:
    """True (after saying what to install) when the picture was asked for and matplotlib is absent;
    only the picture needs it, so `--out ''` still prints."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"python -m blocksparse_attn {command} needs matplotlib: pip install 'blocksparse_attn[plot]' "
              f"(or pip install matplotlib; --out '' prints {prints} without a picture)", file=sys.stderr)
        return True
    return False


def _parse_ints(flag: str, text: str, upper: int, upper_name: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    bad = [v for v in values if not 0 <= v < upper]
    if bad:
        raise SystemExit(f"{flag} {bad} out of range for {upper_name} {upper}")
    return values


def _cmd_pattern(args) -> int:
    from .layout import density, draw

    if args.out and _matplotlib_missing("pattern", "the densities"):
        return 1
    pattern = _pattern_from_args(args)
    heads = _parse_ints("--heads", args.heads, args.num_heads, "--num-heads")
    d = density(pattern, args.num_heads, args.seq_len, args.num_kv_heads)
    print(f"pattern: {pattern}")
    print(f"seq_len {args.seq_len}, {args.num_heads} q heads / {args.num_kv_heads} kv heads, "
          f"{-(-args.seq_len // pattern.block_size)} query blocks of {pattern.block_size}")
    print(f"{'head':>6} {'block density':>14} {'causal pairs attended':>22}")
    for h in heads:
        print(f"{h:>6} {float(d['block_density_per_head'][h]):>14.2%} "
              f"{float(d['pair_fraction_per_head'][h]):>22.2%}")
    print(f"{'all':>6} {d['block_density']:>14.2%} {d['pair_fraction']:>22.2%}   "
          f"({d['attended_pairs']:,} attended (q, k) pairs over all heads)")
    if args.out:
        draw(pattern, args.num_heads, args.seq_len, args.out, heads=heads, num_kv_heads=args.num_kv_heads)
        print(f"wrote {args.out}")
    return 0


def _retention_patterns(args) -> dict:
    """Label -> SparsePattern: the flags' layer and, unless the flags already ask for a homo_head
    variant, the same layer with homo_head beside it (what giving up the heads' sliding would save)."""
    pattern = _pattern_from_args(args)
    if args.homo_head:
        return {"homo_head": pattern}
    if args.homo_head_group:
        return {"homo_head_group": pattern}
    step = pattern.head_sliding_step
    homo = _pattern_from_args(argparse.Namespace(**{**vars(args), "homo_head": True}))
    return {f"heads sliding by {step} block{'s' if step != 1 else ''}": pattern, "homo_head": homo}


def _table_lengths(band: int, seq_len: int, max_len: int) -> list[int]:
    """Powers of two from the first one that reaches past the local band up to max_len, and seq_len."""
    lengths, n = {seq_len}, 1
    while n < band:
        n *= 2
    while n <= max_len:
        lengths.add(n)
        n *= 2
    return sorted(lengths)


def _cmd_retention(args) -> int:
    from .layout import draw_retention

    if args.out and _matplotlib_missing("retention", "the kept fractions"):
        return 1
    if args.seq_len < 1 or args.max_len < 1 or args.kv_block_size < 1:
        raise SystemExit(f"--seq-len, --max-len and --kv-block-size must be >= 1, got {args.seq_len}, "
                         f"{args.max_len}, {args.kv_block_size}")
    patterns = _retention_patterns(args)
    kv_heads = _parse_ints("--kv-heads", args.kv_heads, args.num_kv_heads, "--num-kv-heads")
    for label, pattern in patterns.items():
        print(f"{label}: {pattern}")
    first = next(iter(patterns.values()))
    print(f"fraction of the written pages kept (SparsePattern.pages_read_later, all {args.num_kv_heads} kv heads, "
          f"{args.num_heads} q heads), kv block {args.kv_block_size}:")
    print(f"{'length':>8}" + "".join(f"{label:>28}" for label in patterns))
    for n in _table_lengths(first.block_size * first.local_blocks, args.seq_len, args.max_len):
        kept = [float(p.pages_read_later(args.num_heads, args.num_kv_heads, n, args.kv_block_size).float().mean())
                for p in patterns.values()]
        print(f"{n:>8}" + "".join(f"{f:>28.2%}" for f in kept))
    if args.out:
        draw_retention(patterns, args.num_heads, args.num_kv_heads, args.seq_len, args.kv_block_size, args.out,
                       kv_heads=kv_heads, curve_max_len=args.max_len)
        print(f"wrote {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, seq_len=args.seq_len, decode_steps=args.decode_steps,
                    dtype=args.dtype, num_seqs=args.num_seqs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blocksparse_attn",
                                     description="Block-sparse flash attention: pattern pictures, the kept-page rule, "
                                                 "and a demo.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pattern", help="draw the block mask of a few heads and print its density")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--out", default="pattern.png", help="PNG to write ('' to only print)")
    p.add_argument("--heads", default="0,1,2,3", help="comma-separated q heads to draw")
    _add_pattern_flags(p)
    p.set_defaults(func=_cmd_pattern)

    r = sub.add_parser("retention", help="draw which pages of each kv head stay as a sequence grows "
                                         "(SparsePattern.pages_read_later) and print the fraction kept",
                       epilog="Without --homo-head / --homo-head-group the same layer with homo_head is "
                              "shown beside the flags' pattern.")
    r.add_argument("--seq-len", type=int, default=8192, help="length the per-page images grow to")
    r.add_argument("--max-len", type=int, default=131072, help="longest length of the kept-fraction curve "
                                                               "and table")
    r.add_argument("--kv-block-size", type=int, default=16, help="tokens per page of the paged cache")
    r.add_argument("--kv-heads", default="0,1,2", help="comma-separated kv heads to draw")
    r.add_argument("--out", default="retention.png", help="PNG to write ('' to only print)")
    _add_pattern_flags(r)
    r.set_defaults(func=_cmd_retention)

    d = sub.add_parser("demo", help="a Phi-3-small-shaped layer: prefill, then decode, checked against "
                                    "the reference")
    d.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    d.add_argument("--seq-len", type=int, default=None, help="longest prompt (default: 4096 CPU, 8192 GPU)")
    d.add_argument("--decode-steps", type=int, default=8)
    d.add_argument("--num-seqs", type=int, default=2, help="sequences in the batch")
    d.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: bfloat16 (GPU), float32 (CPU)")
    d.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
