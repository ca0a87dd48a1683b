// Block-sparse flash-attention forward on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async):
// the portable sm80-class kernel, and the correctness baseline of the Hopper path.
//
// One CTA = one (sequence, 64-row query tile, q head) work item from the plan kernel's list. The
// tile walks only the 32-key tiles its rows can see (KeyTileCursor), through a ring of K/V stages in
// shared memory filled by cp.async. Four warps split the 64 query rows (16 each), so the online softmax needs
// no cross-warp reduction; P stays in registers and feeds the P.V product directly (the m16n8
// accumulator layout of two adjacent n-tiles is the A-fragment layout of m16n8k16).
// Torch-free: compiled by bare nvcc in CI.
//
// Measured (H100, 8k x 4, Phi-3-small), each step: 5.9 ms first version (64-key tiles, 2 stages);
// 4.6 ms with one base offset per K/V tile copy and the O rescale skipped while the row maxima hold
// (the kernel was issue/latency bound, not memory bound); 3.9 ms with 32-key tiles and a 3-stage ring
// (three CTAs per SM instead of two). Tried and dropped: 128-row tiles with two m-tiles per warp
// (FA2's shape) need > 255 registers with 64-key S tiles and spill (6.8 ms on an H200); computing the
// key-tile enumeration once in thread 0 and publishing it through shared memory (6.5 ms, H200).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "cuda/kernels/prefill_common.cuh"
#include "cuda/kernels/params.h"
#include "cuda/kernels/ptx.cuh"

namespace blocksparse_attn {

constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = kPrefillWarps * 32;

#ifndef BSA_PREFILL_STAGES
#define BSA_PREFILL_STAGES 3
#endif

// Head dims are padded in shared memory to a multiple of 64 elements (128-byte rows), so the XOR
// swizzle of 16-byte chunks by (row % 8) is always defined; padding columns are zero.

template <typename Element, int kHeadDimPad>
struct PrefillSmem {
  // K/V ring depth: head dims up to 128 take BSA_PREFILL_STAGES (3 with 32-key tiles: 64 KB, three
  // CTAs per SM); 256-wide tiles keep two stages.
  static constexpr int kStages = kHeadDimPad <= 128 ? BSA_PREFILL_STAGES : 2;
  static constexpr int kTileElems = kPrefillBlockM * kHeadDimPad;     // Q
  static constexpr int kKeyTileElems = kPrefillBlockN * kHeadDimPad;  // one K or V stage
  static constexpr int kBytes = (kTileElems + 2 * kStages * kKeyTileElems) * sizeof(Element);
};

// Element offset of (row, col) in a [rows][kHeadDimPad] tile whose 16-byte chunks are swizzled.
template <int kHeadDimPad>
__device__ __forceinline__ int swizzle(int row, int col) {
  const int chunk = (col >> 3) ^ (row & 7);
  return row * kHeadDimPad + (chunk << 3) + (col & 7);
}

// ---- which key tiles a query tile visits ------------------------------------------------------------

// Enumerates, identically in every thread of the CTA, the kPrefillBlockN-key tiles a 64-row query
// tile needs. B >= 64 (and >= the key tile): walks the visible key blocks of the tile's single query
// block (vertical columns, then the band; or the layout's row) and splits each into key tiles.
// Smaller B: a tile spans several blocks of both kinds, so every causal key tile is tested pair by
// pair (a correctness path; Phi-3-small uses B = 64). `masked` says the tile needs the per-element
// mask.
struct KeyTileCursor {
  const SparsePattern* p;
  int head;
  int q_tile;           // query tile index (positions q_tile * 64 ...)
  int qb_first, qb_last;  // query blocks of the tile's valid rows
  int last_key_tile;    // the key tile holding the tile's last query position
  int block;            // blockwise: current key block (or layout entry); pairwise: next key tile
  int block_end;        // layout: end entry
  int sub;              // blockwise: next key tile within the current block
  int band_start;

  __device__ void init(const SparsePattern& pattern, int h, int tile, int first_valid_pos, int last_valid_pos) {
    p = &pattern;
    head = h;
    q_tile = tile;
    qb_first = first_valid_pos / pattern.block_size;
    qb_last = last_valid_pos / pattern.block_size;
    sub = 0;
    last_key_tile = (tile * kPrefillBlockM + kPrefillBlockM - 1) / kPrefillBlockN;
    if (pairwise()) {
      block = 0;
    } else if (pattern.has_layout()) {
      const int32_t* crow = pattern.layout_crow + static_cast<int64_t>(h) * (pattern.layout_rows + 1);
      const bool covered = qb_first < pattern.layout_rows;
      block = covered ? crow[qb_first] : 0;
      block_end = covered ? crow[qb_first + 1] : 0;
    } else {
      band_start = max(qb_first - pattern.local_blocks + 1, 0);
      const int rho = vertical_residue(pattern, h);
      block = rho < band_start ? rho : band_start;
    }
  }

  // Blocks smaller than a query or key tile: the tile spans several blocks of both kinds.
  __device__ bool pairwise() const { return p->block_size < kPrefillBlockM || p->block_size < kPrefillBlockN; }

  // Does key tile t hold a key after the tile's first query position (so it needs the causal mask)?
  __device__ bool crosses_diagonal(int t) const { return (t + 1) * kPrefillBlockN - 1 > q_tile * kPrefillBlockM; }

  __device__ bool next(int& key_tile, bool& masked) {
    const int b = p->block_size;
    if (pairwise()) {
      const int per_tile = kPrefillBlockN / b;
      for (; block <= last_key_tile; ++block) {
        bool any = false, all = true;
        for (int i = qb_first; i <= qb_last; ++i)
          for (int j = block * per_tile; j < (block + 1) * per_tile; ++j) {
            const bool v = block_visible(*p, head, i, j);
            any |= v;
            all &= v;
          }
        if (any) {
          key_tile = block;
          masked = !all || crosses_diagonal(block);
          ++block;
          return true;
        }
      }
      return false;
    }
    const int tiles_per_block = b / kPrefillBlockN;
    while (true) {
      int j;
      if (p->has_layout()) {
        if (block >= block_end) return false;
        const int32_t* col = p->layout_col + static_cast<int64_t>(head) * p->layout_col_stride;
        j = col[block];
      } else {
        if (block > qb_first) return false;
        j = block;
      }
      const int tile = j * tiles_per_block + sub;
      if (++sub == tiles_per_block) {  // advance to the next block
        sub = 0;
        if (p->has_layout()) {
          ++block;
        } else if (block < band_start) {
          block += p->vert_stride;
          if (block >= band_start) block = band_start;
        } else {
          ++block;
        }
      }
      if (tile > last_key_tile) continue;  // B = 128: the diagonal block's half after this query tile
      key_tile = tile;
      masked = crosses_diagonal(tile);
      return true;
    }
  }
};

// ---- the kernel ---------------------------------------------------------------------------------

// Three CTAs per SM where the shared memory allows it (head dims up to 128): up to 168 registers.
#ifndef BSA_PREFILL_MIN_CTAS
#define BSA_PREFILL_MIN_CTAS 3
#endif
template <typename Element, int kHeadDimPad>
__global__ void __launch_bounds__(kPrefillThreads, kHeadDimPad <= 128 ? BSA_PREFILL_MIN_CTAS : 1)
prefill_sm80_kernel(const PrefillParams params) {
  using Smem = PrefillSmem<Element, kHeadDimPad>;
  constexpr int kChunksPerRow = kHeadDimPad / 8;
  constexpr int kTileChunks = kPrefillBlockM * kChunksPerRow;
  constexpr int kDimTiles = kHeadDimPad / 8;  // n-tiles of the output
  constexpr int kKeyNTiles = kPrefillBlockN / 8;  // n-tiles of S
  constexpr int kKeyTileChunks = kPrefillBlockN * kChunksPerRow;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* s_q = reinterpret_cast<Element*>(smem_raw);
  Element* s_k = s_q + Smem::kTileElems;  // [kStages][kPrefillBlockN][kHeadDimPad]
  Element* s_v = s_k + Smem::kStages * Smem::kKeyTileElems;  // [kStages][kPrefillBlockN][kHeadDimPad]

  PrefillItem it;
  if (!load_prefill_item(params, kPrefillBlockM, blockIdx.x, it)) return;
  const int seq = it.seq, head = it.head, kv_head = it.kv_head, q_begin = it.q_begin, k_len = it.k_len;
  const int first_pos = it.first_pos, tile_pos = it.tile_pos, valid_begin = it.valid_begin, valid_end = it.valid_end;
  const int q_tile = tile_pos / kPrefillBlockM;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int head_size = params.head_size;
  const KeyValueSource& kv = params.kv;

  // Q tile: rows outside [first_pos, k_len) belong to no query of this sequence -> zeros.
  {
    const Element* q = static_cast<const Element*>(params.q);
    for (int c = tid; c < kTileChunks; c += kPrefillThreads) {
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const int pos = tile_pos + row;
      const bool valid = pos >= valid_begin && pos < valid_end && col < head_size;
      const Element* src = valid ? q + (q_begin + pos - first_pos) * params.q_row_stride + head * params.q_head_stride + col : q;
      ptx::cp_async_16(s_q + swizzle<kHeadDimPad>(row, col), src, valid);
    }
  }

  // K/V tile loader: key positions key_tile * 64 + row; rows past k_len are zero-filled, which keeps
  // unwritten cache slots (possibly NaN) out of P.V.
  auto load_kv = [&](int key_tile, int stage) {
    const Element* key = static_cast<const Element*>(kv.key);
    const Element* value = static_cast<const Element*>(kv.value);
    Element* dst_k = s_k + stage * Smem::kKeyTileElems;
    Element* dst_v = s_v + stage * Smem::kKeyTileElems;
    constexpr int kRowsPerCopy = kPrefillThreads / kChunksPerRow;
    const int thread_row = tid / kChunksPerRow, col = (tid % kChunksPerRow) * 8;
    const int tile_pos0 = key_tile * kPrefillBlockN;
    if (!kv.paged()) {
      // Contiguous keys: one base offset per tile, then fixed steps (a 64-bit product per copy
      // costs more issue slots than the copy itself).
      const int64_t base = static_cast<int64_t>(kv.cu_seqlens_k[seq] + tile_pos0 + thread_row) * kv.row_stride +
                           kv_head * kv.head_stride + col;
      const int64_t step = kRowsPerCopy * kv.row_stride;
#pragma unroll
      for (int u = 0; u < kKeyTileChunks / kPrefillThreads; ++u) {
        const int row = thread_row + u * kRowsPerCopy;
        const bool valid = tile_pos0 + row < k_len && col < head_size;
        const int64_t offset = base + u * step;
        const int dst = swizzle<kHeadDimPad>(row, col);
        ptx::cp_async_16(dst_k + dst, valid ? key + offset : key, valid);
        ptx::cp_async_16(dst_v + dst, valid ? value + offset : value, valid);
      }
      return;
    }
#pragma unroll
    for (int u = 0; u < kKeyTileChunks / kPrefillThreads; ++u) {
      const int row = thread_row + u * kRowsPerCopy;
      const int pos = tile_pos0 + row;
      bool valid = pos < k_len && col < head_size;
      int64_t offset = 0;
      if (valid) {
        const int page = kv.block_tables[seq * kv.block_table_stride + pos / kv.kv_block_size];
        valid = page >= 0 && page < kv.num_cache_blocks;  // a bad id reads zeros, never wild memory
        offset = page * kv.cache_block_stride + kv_head * kv.cache_head_stride +
                 static_cast<int64_t>(pos % kv.kv_block_size) * head_size + col;
      }
      const int dst = swizzle<kHeadDimPad>(row, col);
      ptx::cp_async_16(dst_k + dst, valid ? key + offset : key, valid);
      ptx::cp_async_16(dst_v + dst, valid ? value + offset : value, valid);
    }
  };

  // The ring: tiles 0 .. kStages - 2 in flight before the loop; iteration n waits for tile n, then
  // refills the stage tile n - 1 used. Tile ids and masks travel with their stage through shared
  // memory (written by thread 0 after the barrier that frees the stage, read after the next one).
  constexpr int kStages = Smem::kStages;
  __shared__ int s_stage_tile[kStages];
  __shared__ bool s_stage_masked[kStages];
  KeyTileCursor cursor;
  cursor.init(params.pattern, head, q_tile, valid_begin, valid_end - 1);
  int issued = 0;
  bool exhausted = false;
  auto issue_next = [&](int stage) {
    int key_tile;
    bool masked;
    if (exhausted || !cursor.next(key_tile, masked)) {
      exhausted = true;
      return;
    }
    load_kv(key_tile, stage);
    if (tid == 0) {
      s_stage_tile[stage] = key_tile;
      s_stage_masked[stage] = masked;
    }
    ++issued;
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    issue_next(st);
    ptx::cp_async_commit();  // the first group carries Q too
  }

  float acc_o[kDimTiles][4];
#pragma unroll
  for (int d = 0; d < kDimTiles; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[d][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  const int group = lane >> 2, tig = lane & 3;
  const int row_in_tile[2] = {warp * 16 + group, warp * 16 + group + 8};

  const bool pairwise = cursor.pairwise();
  for (int n = 0; n < issued; ++n) {
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();  // tile n has landed for everyone; everyone is done with tile n - 1's stage
    issue_next((n + kStages - 1) % kStages);
    ptx::cp_async_commit();
    const int stage = n % kStages;
    const int cur_tile = s_stage_tile[stage];
    const bool cur_masked = s_stage_masked[stage];

    const Element* k_tile = s_k + stage * Smem::kKeyTileElems;
    const Element* v_tile = s_v + stage * Smem::kKeyTileElems;

    // S = Q K^T for this warp's 16 rows x kPrefillBlockN keys.
    float acc_s[kKeyNTiles][4];
#pragma unroll
    for (int n = 0; n < kKeyNTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDimPad / 16; ++ks) {
      uint32_t a[4];
      ptx::ldmatrix_x4(a, s_q + swizzle<kHeadDimPad>(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                     ks * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int np = 0; np < kKeyNTiles / 2; ++np) {
        uint32_t b[4];
        ptx::ldmatrix_x4(b, k_tile + swizzle<kHeadDimPad>(np * 16 + (lane & 7) + (lane >> 4) * 8,
                                                          ks * 16 + ((lane >> 3) & 1) * 8));
        ptx::mma_16816<Element>(acc_s[2 * np], a, b[0], b[1]);
        ptx::mma_16816<Element>(acc_s[2 * np + 1], a, b[2], b[3]);
      }
    }

    // Scale into the log2 domain and mask (select, never add: garbage K rows may hold NaN).
    const int key_pos0 = cur_tile * kPrefillBlockN;
#pragma unroll
    for (int n = 0; n < kKeyNTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float s = acc_s[n][e] * params.scale_log2;
        if (cur_masked) {
          const int p = tile_pos + row_in_tile[e >> 1];
          const int t = key_pos0 + n * 8 + tig * 2 + (e & 1);
          bool visible = t <= p && t < k_len;
          if (pairwise && visible)
            visible = block_visible(params.pattern, head, p / params.pattern.block_size, t / params.pattern.block_size);
          if (!visible) s = -INFINITY;
        }
        acc_s[n][e] = s;
      }

    // Online softmax: the 4 threads of a quad hold one row's 64 scores.
    float row_alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int n = 0; n < kKeyNTiles; ++n) mx = fmaxf(mx, fmaxf(acc_s[n][2 * r], acc_s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float ref = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet: avoid inf - inf
      const float alpha = ptx::exp2_approx(row_max[r] - ref);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kKeyNTiles; ++n) {
        acc_s[n][2 * r] = ptx::exp2_approx(acc_s[n][2 * r] - ref);
        acc_s[n][2 * r + 1] = ptx::exp2_approx(acc_s[n][2 * r + 1] - ref);
        sum += acc_s[n][2 * r] + acc_s[n][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
      row_alpha[r] = alpha;
    }
    // Once the running maxima settle, most tiles leave them unchanged: skip the O rescale then.
    if (__any_sync(0xffffffffu, row_alpha[0] != 1.f || row_alpha[1] != 1.f)) {
#pragma unroll
      for (int d = 0; d < kDimTiles; ++d) {
        acc_o[d][0] *= row_alpha[0];
        acc_o[d][1] *= row_alpha[0];
        acc_o[d][2] *= row_alpha[1];
        acc_o[d][3] *= row_alpha[1];
      }
    }

    // O += P V: P from registers (two n-tiles of S = one k-step), V via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kKeyNTiles / 2; ++kk) {
      uint32_t a[4];
      a[0] = ptx::pack2<Element>(acc_s[2 * kk][0], acc_s[2 * kk][1]);
      a[1] = ptx::pack2<Element>(acc_s[2 * kk][2], acc_s[2 * kk][3]);
      a[2] = ptx::pack2<Element>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
      a[3] = ptx::pack2<Element>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < kDimTiles / 2; ++nd) {
        uint32_t b[4];
        ptx::ldmatrix_x4_trans(b, v_tile + swizzle<kHeadDimPad>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                                nd * 16 + (lane >> 4) * 8));
        ptx::mma_16816<Element>(acc_o[2 * nd], a, b[0], b[1]);
        ptx::mma_16816<Element>(acc_o[2 * nd + 1], a, b[2], b[3]);
      }
    }
  }
  ptx::cp_async_wait<0>();

  // Epilogue: normalise, write lse, stage O through shared memory (over Q) for 16-byte stores.
  float inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) inv_sum[r] = finish_prefill_row(params, it, row_sum[r], row_max[r], tile_pos + row_in_tile[r], tig);
  __syncthreads();  // every warp is done reading s_q
#pragma unroll
  for (int d = 0; d < kDimTiles; ++d)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t packed = ptx::pack2<Element>(acc_o[d][2 * r] * inv_sum[r], acc_o[d][2 * r + 1] * inv_sum[r]);
      *reinterpret_cast<uint32_t*>(s_q + swizzle<kHeadDimPad>(row_in_tile[r], d * 8 + tig * 2)) = packed;
    }
  __syncthreads();
  Element* out = static_cast<Element*>(params.out);
  for (int c = tid; c < kTileChunks; c += kPrefillThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int pos = tile_pos + row;
    if (pos < valid_begin || pos >= valid_end || col >= head_size) continue;
    *reinterpret_cast<uint4*>(out + (q_begin + pos - first_pos) * params.out_row_stride + head * params.out_head_stride + col) =
        *reinterpret_cast<const uint4*>(s_q + swizzle<kHeadDimPad>(row, col));
  }
}

template <typename Element, int kHeadDimPad>
void launch_prefill_sm80(const PrefillParams& params, int max_tiles, cudaStream_t stream) {
  constexpr int kSmemBytes = PrefillSmem<Element, kHeadDimPad>::kBytes;
  auto kernel = prefill_sm80_kernel<Element, kHeadDimPad>;
  // Always: the 48 KB default counts the kernel's static shared memory too, so a dynamic size just
  // under it can still fail to launch (seen with 32-key tiles and 2 stages: exactly 48 KB dynamic).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  kernel<<<max_tiles * params.num_q_heads, kPrefillThreads, kSmemBytes, stream>>>(params);
}

}  // namespace blocksparse_attn
