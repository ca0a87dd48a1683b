"""Command line: `python -m blocksparse_attn {pattern,demo} ...` (see `--help` of each).

Kept thin: the pattern logic lives in layout.py, the demo in demo.py.
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


def _cmd_pattern(args) -> int:
    from .layout import density, draw

    if args.out:
        try:
            import matplotlib  # noqa: F401  (only the picture needs it: `--out ''` prints without)
        except ImportError:
            print("python -m blocksparse_attn pattern needs matplotlib: pip install 'blocksparse_attn[plot]' "
                  "(or pip install matplotlib; --out '' prints the densities without a picture)",
                  file=sys.stderr)
            return 1
    pattern = _pattern_from_args(args)
    heads = [int(h) for h in args.heads.split(",") if h.strip()]
    bad = [h for h in heads if not 0 <= h < args.num_heads]
    if bad:
        raise SystemExit(f"--heads {bad} out of range for --num-heads {args.num_heads}")
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


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, seq_len=args.seq_len, decode_steps=args.decode_steps,
                    dtype=args.dtype, num_seqs=args.num_seqs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blocksparse_attn",
                                     description="Block-sparse flash attention: pattern pictures and a demo.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pattern", help="draw the block mask of a few heads and print its density")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--out", default="pattern.png", help="PNG to write ('' to only print)")
    p.add_argument("--heads", default="0,1,2,3", help="comma-separated q heads to draw")
    p.add_argument("--num-heads", type=int, default=32, help="q heads on this rank")
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=16)
    p.add_argument("--vert-stride", type=int, default=8)
    p.add_argument("--homo-head", action="store_true", help="every head has the same pattern")
    p.add_argument("--homo-head-group", action="store_true", help="the pattern slides per kv head")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--tp-rank", type=int, default=0)
    p.set_defaults(func=_cmd_pattern)

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
