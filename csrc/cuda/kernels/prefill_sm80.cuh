// Block-sparse flash-attention forward on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async):
// the portable sm80-class kernel, and the correctness baseline of the Hopper path.
//
// One CTA = one (sequence, 64-row query tile, q head) work item from the plan kernel's list. The
// tile walks only the key tiles its rows can see (KeyTileCursor), double-buffering K/V in shared
// memory with cp.async. Four warps split the 64 query rows (16 each), so the online softmax needs
// no cross-warp reduction; P stays in registers and feeds the P.V product directly (the m16n8
// accumulator layout of two adjacent n-tiles is the A-fragment layout of m16n8k16).
// Torch-free: compiled by bare nvcc in CI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "cuda/kernels/params.h"
#include "cuda/kernels/ptx.cuh"

namespace blocksparse_attn {

constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = kPrefillWarps * 32;

// Head dims are padded in shared memory to a multiple of 64 elements (128-byte rows), so the XOR
// swizzle of 16-byte chunks by (row % 8) is always defined; padding columns are zero.
// Element offset of (row, col) in a [rows][kHeadDimPad] tile whose 16-byte chunks are swizzled.
template <int kHeadDimPad>
__device__ __forceinline__ int swizzle(int row, int col) {
  const int chunk = (col >> 3) ^ (row & 7);
  return row * kHeadDimPad + (chunk << 3) + (col & 7);
}

// ---- which key tiles a query tile visits ------------------------------------------------------------

// Query blocks past the layout's rows see nothing (the CPU path rejects such calls; the GPU path
// cannot without a device->host sync).
__device__ __forceinline__ bool layout_block_visible(const SparsePattern& p, int h, int i, int j) {
  if (i >= p.layout_rows) return false;
  const int32_t* crow = p.layout_crow + static_cast<int64_t>(h) * (p.layout_rows + 1);
  const int32_t* col = p.layout_col + static_cast<int64_t>(h) * p.layout_col_stride;
  int lo = crow[i], hi = crow[i + 1];
  while (lo < hi) {  // binary search: rows are ascending
    const int mid = (lo + hi) >> 1;
    const int c = col[mid];
    if (c == j) return true;
    if (c < j) lo = mid + 1; else hi = mid;
  }
  return false;
}

__device__ __forceinline__ bool block_visible(const SparsePattern& p, int h, int i, int j) {
  if (j > i) return false;
  return p.has_layout() ? layout_block_visible(p, h, i, j) : pattern_block_visible(p, h, i, j);
}

// Enumerates, identically in every thread of the CTA, the 64-key tiles that the valid query rows
// [valid_begin, valid_end) of a tile need, and whether each needs the per-element mask (causal
// overlap with the query rows, or a key block that some query block of the tile cannot see).
//  - Parametric pattern with B >= 64 (Phi-3-small): the vertical columns below the union band
//    (visible to every query block of the tile, so never masked), then the union band
//    [i_lo - L + 1, i_hi] of the tile's query blocks, each block split into B/64 tiles.
//  - Explicit layouts and B < 64: every causal key tile is tested against every query block of the
//    tile (a tile then spans several blocks of both kinds); a correctness path.
struct KeyTileCursor {
  int head;
  int i_lo, i_hi;         // query blocks of the valid rows
  int last_tile;          // last key tile any valid row can see
  int first_masked_tile;  // key tiles from here on hold keys after the first valid query
  bool scan;              // test every key tile (layouts, B < 64)
  int next_tile;          // scan: next candidate tile; pattern: next sub-tile of `block`
  int block, band_lo;     // pattern: current key block; start of the union band

  __device__ void init(const SparsePattern& p, int h, int valid_begin, int valid_end) {
    head = h;
    const int b = p.block_size;
    i_lo = valid_begin / b;
    i_hi = (valid_end - 1) / b;
    last_tile = (valid_end - 1) / kPrefillBlockN;
    first_masked_tile = valid_begin / kPrefillBlockN;
    scan = p.has_layout() || b < kPrefillBlockN;
    next_tile = 0;
    if (!scan) {
      band_lo = max(i_lo - p.local_blocks + 1, 0);
      const int rho = vertical_residue(p, h);
      block = rho < band_lo ? rho : band_lo;
    }
  }

  // Visibility of key blocks [j_lo, j_hi] to the query blocks [i_lo, i_hi]: any pair / every pair.
  __device__ void test(const SparsePattern& p, int j_lo, int j_hi, bool& any, bool& all) const {
    any = false;
    all = true;
    for (int i = i_lo; i <= i_hi; ++i)
      for (int j = j_lo; j <= j_hi; ++j) {
        const bool v = block_visible(p, head, i, j);
        any |= v;
        all &= v;
      }
  }

  // The next key tile as (tile << 1 | masked), or -1 when there is none.
  __device__ int next(const SparsePattern& p) {
    const int b = p.block_size;
    if (scan) {
      for (; next_tile <= last_tile; ++next_tile) {
        const int t = next_tile;
        bool any, all;
        test(p, t * kPrefillBlockN / b, ((t + 1) * kPrefillBlockN - 1) / b, any, all);
        if (!any) continue;
        ++next_tile;
        return t << 1 | (!all || t >= first_masked_tile);
      }
      return -1;
    }
    const int tiles_per_block = b / kPrefillBlockN;
    while (block <= i_hi) {
      const int j = block;
      const int t = j * tiles_per_block + next_tile;
      bool any = true, all = true;
      if (j >= band_lo) test(p, j, j, any, all);
      if (++next_tile == tiles_per_block) {
        next_tile = 0;
        if (block < band_lo) {
          block += p.vert_stride;
          if (block >= band_lo) block = band_lo;
        } else {
          ++block;
        }
      }
      if (!any || t > last_tile) continue;
      return t << 1 | (!all || t >= first_masked_tile);
    }
    return -1;
  }
};

// ---- the kernel ---------------------------------------------------------------------------------

// kMTiles 64-row m-tiles per CTA (each warp owns 16 rows of every m-tile). Two m-tiles (FA2's
// 128-row tiles) would let every K/V fragment feed two independent mma chains, but with 64-key S
// tiles the head-dim-128 kernel then needs more than 255 registers and spills: measured 6.8 ms vs
// 6.5 ms at 8k x 4 on an H200, so only kMTiles = 1 is instantiated (32-key S sub-tiles would be
// the way to make two fit).
template <typename Element, int kHeadDimPad, int kMTiles>
struct PrefillTraits {
  static constexpr int kBlockM = kPrefillRowsPerMTile * kMTiles;
  static constexpr int kQElems = kBlockM * kHeadDimPad;
  static constexpr int kKVElems = kPrefillBlockN * kHeadDimPad;
  static constexpr int kSmemBytes = (kQElems + 2 * 2 * kKVElems) * sizeof(Element);  // Q + 2 stages of K, V
};

template <typename Element, int kHeadDimPad, int kMTiles>
__global__ void __launch_bounds__(kPrefillThreads)
prefill_sm80_kernel(const PrefillParams params) {
  using Traits = PrefillTraits<Element, kHeadDimPad, kMTiles>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kChunksPerRow = kHeadDimPad / 8;
  constexpr int kDimTiles = kHeadDimPad / 8;  // n-tiles of the output
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* s_q = reinterpret_cast<Element*>(smem_raw);  // [kBlockM][kHeadDimPad]
  Element* s_k = s_q + Traits::kQElems;                  // [2][64][kHeadDimPad]
  Element* s_v = s_k + 2 * Traits::kKVElems;             // [2][64][kHeadDimPad]

  const int item = blockIdx.x / params.num_q_heads;
  const int head = blockIdx.x % params.num_q_heads;
  if (item >= *params.num_tiles) return;
  const int seq = params.tile_seq[item];
  const int q_tile = params.tile_index[item];
  const int kv_head = head / params.pattern.q_heads_per_kv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int head_size = params.head_size;

  const KeyValueSource& kv = params.kv;
  const int q_begin = params.cu_seqlens_q[seq];
  const int q_len = params.cu_seqlens_q[seq + 1] - q_begin;
  const int k_len = kv.paged() ? kv.seq_lens[seq] : kv.cu_seqlens_k[seq + 1] - kv.cu_seqlens_k[seq];
  const int first_pos = k_len - q_len;  // absolute position of the sequence's first query
  const int tile_pos = q_tile * kBlockM;
  const int valid_begin = max(tile_pos, first_pos);
  const int valid_end = min(tile_pos + kBlockM, k_len);

  // Q tile: rows outside [first_pos, k_len) belong to no query of this sequence -> zeros.
  {
    const Element* q = static_cast<const Element*>(params.q);
    for (int c = tid; c < kBlockM * kChunksPerRow; c += kPrefillThreads) {
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const int pos = tile_pos + row;
      const bool valid = pos >= valid_begin && pos < valid_end && col < head_size;
      const Element* src =
          valid ? q + (q_begin + pos - first_pos) * params.q_row_stride + head * params.q_head_stride + col : q;
      ptx::cp_async_16(s_q + swizzle<kHeadDimPad>(row, col), src, valid);
    }
  }

  // K/V tile loader: key positions key_tile * 64 + row; rows past k_len (and bad block ids) are
  // zero-filled, which keeps unwritten cache slots (possibly NaN) out of P.V.
  auto load_kv = [&](int key_tile, int stage) {
    const Element* key = static_cast<const Element*>(kv.key);
    const Element* value = static_cast<const Element*>(kv.value);
    Element* dst_k = s_k + stage * Traits::kKVElems;
    Element* dst_v = s_v + stage * Traits::kKVElems;
    for (int c = tid; c < kPrefillBlockN * kChunksPerRow; c += kPrefillThreads) {
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const int pos = key_tile * kPrefillBlockN + row;
      bool valid = pos < k_len && col < head_size;
      int64_t offset = 0;
      if (valid) {
        if (kv.paged()) {
          const int page = kv.block_tables[seq * kv.block_table_stride + pos / kv.kv_block_size];
          valid = page >= 0 && page < kv.num_cache_blocks;  // a bad id reads zeros, never wild memory
          offset = page * kv.cache_block_stride + kv_head * kv.cache_head_stride +
                   static_cast<int64_t>(pos % kv.kv_block_size) * head_size + col;
        } else {
          offset = static_cast<int64_t>(kv.cu_seqlens_k[seq] + pos) * kv.row_stride + kv_head * kv.head_stride + col;
        }
      }
      const int dst = swizzle<kHeadDimPad>(row, col);
      ptx::cp_async_16(dst_k + dst, valid ? key + offset : key, valid);
      ptx::cp_async_16(dst_v + dst, valid ? value + offset : value, valid);
    }
  };

  // Every thread runs the same (uniform) key-tile enumeration: cheaper than publishing one thread's
  // result through shared memory, which put the cursor on the critical path (measured ~8% slower).
  KeyTileCursor cursor;
  cursor.init(params.pattern, head, valid_begin, valid_end);
  int next = cursor.next(params.pattern);
  if (next >= 0) load_kv(next >> 1, 0);
  ptx::cp_async_commit();  // group: Q (+ first K/V tile)

  // Warp w owns rows w*16 + m*64 (+ 0..15) of the tile, m < kMTiles; a thread holds rows
  // `group` and `group + 8` of each m-tile (r = 0, 1 below).
  float acc_o[kMTiles][kDimTiles][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int d = 0; d < kDimTiles; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[m][d][e] = 0.f;
    row_max[m][0] = row_max[m][1] = -INFINITY;
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }
  const int group = lane >> 2, tig = lane & 3;
  auto tile_row = [&](int m, int r) { return m * 64 + warp * 16 + group + r * 8; };

  int stage = 0;
  while (next >= 0) {
    const int cur_tile = next >> 1;
    const bool cur_masked = next & 1;
    next = cursor.next(params.pattern);
    ptx::cp_async_wait<0>();
    __syncthreads();  // the current stage has landed; everyone is done with the other stage
    if (next >= 0) load_kv(next >> 1, stage ^ 1);
    ptx::cp_async_commit();

    const Element* k_tile = s_k + stage * Traits::kKVElems;
    const Element* v_tile = s_v + stage * Traits::kKVElems;

    // S = Q K^T for this warp's kMTiles x 16 rows x 64 keys.
    float acc_s[kMTiles][8][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m)
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[m][n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDimPad / 16; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m)
        ptx::ldmatrix_x4(a[m], s_q + swizzle<kHeadDimPad>(m * 64 + warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                          ks * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        ptx::ldmatrix_x4(b, k_tile + swizzle<kHeadDimPad>(np * 16 + (lane & 7) + (lane >> 4) * 8,
                                                          ks * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          ptx::mma_16816<Element>(acc_s[m][2 * np], a[m], b[0], b[1]);
          ptx::mma_16816<Element>(acc_s[m][2 * np + 1], a[m], b[2], b[3]);
        }
      }
    }

    // Scale into the log2 domain and mask (select, never add: garbage K rows may hold NaN). With
    // B >= 64 the key tile lies in one key block, so block visibility is one test per row.
    const int key_pos0 = cur_tile * kPrefillBlockN;
    const int b = params.pattern.block_size;
    bool row_sees_tile[kMTiles][2];
    if (cur_masked) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          row_sees_tile[m][r] =
              b < kPrefillBlockN || block_visible(params.pattern, head, (tile_pos + tile_row(m, r)) / b, key_pos0 / b);
    }
#pragma unroll
    for (int m = 0; m < kMTiles; ++m)
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float s = acc_s[m][n][e] * params.scale_log2;
          if (cur_masked) {
            const int p = tile_pos + tile_row(m, e >> 1);
            const int t = key_pos0 + n * 8 + tig * 2 + (e & 1);
            bool visible = row_sees_tile[m][e >> 1] && t <= p && t < k_len;
            if (b < kPrefillBlockN && visible) visible = block_visible(params.pattern, head, p / b, t / b);
            if (!visible) s = -INFINITY;
          }
          acc_s[m][n][e] = s;
        }

    // Online softmax: the 4 threads of a quad hold one row's 64 scores.
#pragma unroll
    for (int m = 0; m < kMTiles; ++m)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[m][r];
#pragma unroll
        for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(acc_s[m][n][2 * r], acc_s[m][n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float ref = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet: avoid inf - inf
        const float alpha = ptx::exp2_approx(row_max[m][r] - ref);
        row_max[m][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          acc_s[m][n][2 * r] = ptx::exp2_approx(acc_s[m][n][2 * r] - ref);
          acc_s[m][n][2 * r + 1] = ptx::exp2_approx(acc_s[m][n][2 * r + 1] - ref);
          sum += acc_s[m][n][2 * r] + acc_s[m][n][2 * r + 1];
        }
        row_sum[m][r] = row_sum[m][r] * alpha + sum;
#pragma unroll
        for (int d = 0; d < kDimTiles; ++d) {
          acc_o[m][d][2 * r] *= alpha;
          acc_o[m][d][2 * r + 1] *= alpha;
        }
      }

    // O += P V: P from registers (two n-tiles of S = one k-step), V via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        a[m][0] = ptx::pack2<Element>(acc_s[m][2 * kk][0], acc_s[m][2 * kk][1]);
        a[m][1] = ptx::pack2<Element>(acc_s[m][2 * kk][2], acc_s[m][2 * kk][3]);
        a[m][2] = ptx::pack2<Element>(acc_s[m][2 * kk + 1][0], acc_s[m][2 * kk + 1][1]);
        a[m][3] = ptx::pack2<Element>(acc_s[m][2 * kk + 1][2], acc_s[m][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd = 0; nd < kDimTiles / 2; ++nd) {
        uint32_t bv[4];
        ptx::ldmatrix_x4_trans(bv, v_tile + swizzle<kHeadDimPad>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                                 nd * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          ptx::mma_16816<Element>(acc_o[m][2 * nd], a[m], bv[0], bv[1]);
          ptx::mma_16816<Element>(acc_o[m][2 * nd + 1], a[m], bv[2], bv[3]);
        }
      }
    }
    stage ^= 1;
  }
  ptx::cp_async_wait<0>();

  // Epilogue: normalise, write lse, stage O through shared memory (over Q) for 16-byte stores.
  float inv_sum[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[m][r];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      inv_sum[m][r] = l > 0.f ? 1.f / l : 0.f;  // l = 0 only for a row that sees no key (explicit layouts)
      const int p = tile_pos + tile_row(m, r);
      if (params.lse != nullptr && tig == 0 && p >= valid_begin && p < valid_end) {
        const float lse = l > 0.f ? (row_max[m][r] + __log2f(l)) * 0.69314718055994531f : -INFINITY;
        params.lse[static_cast<int64_t>(head) * params.num_q_tokens + q_begin + p - first_pos] = lse;
      }
    }
  __syncthreads();  // every warp is done reading s_q
#pragma unroll
  for (int m = 0; m < kMTiles; ++m)
#pragma unroll
    for (int d = 0; d < kDimTiles; ++d)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t packed =
            ptx::pack2<Element>(acc_o[m][d][2 * r] * inv_sum[m][r], acc_o[m][d][2 * r + 1] * inv_sum[m][r]);
        *reinterpret_cast<uint32_t*>(s_q + swizzle<kHeadDimPad>(tile_row(m, r), d * 8 + tig * 2)) = packed;
      }
  __syncthreads();
  Element* out = static_cast<Element*>(params.out);
  for (int c = tid; c < kBlockM * kChunksPerRow; c += kPrefillThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int pos = tile_pos + row;
    if (pos < valid_begin || pos >= valid_end || col >= head_size) continue;
    *reinterpret_cast<uint4*>(out + (q_begin + pos - first_pos) * params.out_row_stride +
                              head * params.out_head_stride + col) =
        *reinterpret_cast<const uint4*>(s_q + swizzle<kHeadDimPad>(row, col));
  }
}

template <typename Element, int kHeadDimPad, int kMTiles>
void launch_prefill_sm80(const PrefillParams& params, int max_tiles, cudaStream_t stream) {
  constexpr int kSmemBytes = PrefillTraits<Element, kHeadDimPad, kMTiles>::kSmemBytes;
  auto kernel = prefill_sm80_kernel<Element, kHeadDimPad, kMTiles>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  kernel<<<max_tiles * params.num_q_heads, kPrefillThreads, kSmemBytes, stream>>>(params);
}

}  // namespace blocksparse_attn
