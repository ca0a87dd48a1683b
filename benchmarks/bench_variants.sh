#!/usr/bin/env bash
# Device-side comparison of the sm80 prefill kernel variants (one vs two m-tiles per CTA) at 8k x 4,
# for head dims 64 and 128: prints ms per call for each. Run from the repo root after building.
set -u
for d in 128 64; do
  for m in 1 2; do
    BSA_PREFILL_M_TILES=$m python3 - "$d" "$m" <<'PY'
import sys, torch, triton
from blocksparse_attn import ops
from blocksparse_attn.layout import SparsePattern
d, m = int(sys.argv[1]), int(sys.argv[2])
S, B = 8192, 4
q = torch.randn(S * B, 32, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(S * B, 8, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
cu = torch.arange(0, S * B + 1, S, device="cuda", dtype=torch.int32)
p = SparsePattern.phi3_small(32)
ms = triton.testing.do_bench(lambda: ops.varlen_prefill(q, k, v, cu, cu, 1 / d, p), warmup=50, rep=300,
                             return_mode="median")
print(f"variant D={d} m_tiles={m}: {ms:.3f} ms")
PY
  done
done
