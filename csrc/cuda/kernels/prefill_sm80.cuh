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

#include "common/pattern.h"
#include "cuda/kernels/kv_tile.cuh"
#include "cuda/kernels/params.h"
#include "cuda/kernels/prefill_common.cuh"
#include "cuda/kernels/ptx.cuh"
#include "cuda/kernels/smem_layout.cuh"
#include "cuda/kernels/softmax.cuh"

namespace blocksparse_attn {

constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = kPrefillWarps * 32;

#ifndef BSA_PREFILL_STAGES
#define BSA_PREFILL_STAGES 3
#endif

// Q, then the K/V ring as the source stores it (Cache), then, for an fp8 cache, the current tile's K
// and V converted to Element (what ldmatrix and mma read).
template <typename Element, int kHeadDimPad, typename Cache>
struct PrefillSmem {
  static constexpr bool kFp8 = CacheFormat<Cache>::kFp8;
  // K/V ring depth: head dims up to 128 take BSA_PREFILL_STAGES (3 with 32-key tiles: 64 KB, three
  // CTAs per SM); 256-wide tiles keep two stages.
  static constexpr int kStages = kHeadDimPad <= 128 ? BSA_PREFILL_STAGES : 2;
  static constexpr int kTileElems = kPrefillBlockM * kHeadDimPad;     // Q
  static constexpr int kKeyTileElems = kPrefillBlockN * kHeadDimPad;  // one K or V tile
  static constexpr int kKeyTileBytes = kKeyTileElems * sizeof(Cache);  // ... as stored
  static constexpr int kRingOffset = kTileElems * sizeof(Element);
  static constexpr int kConvertedOffset = kRingOffset + 2 * kStages * kKeyTileBytes;
  static constexpr int kBytes = kConvertedOffset + (kFp8 ? 2 * kKeyTileElems * sizeof(Element) : 0);
};

// ---- which key tiles a query tile visits ------------------------------------------------------------

// The kPrefillBlockN-key tiles a 64-row query tile visits, identically in every thread of the CTA, from
// the pattern's walk (common/pattern.h). B >= 64: the tile's rows lie in one query block, whose
// visible blocks are split into key tiles. B < 64: the tile spans several query blocks (4 at B = 16),
// whose union the walk gives with the rows that see each block; consecutive blocks of one key tile
// are merged. `masked`: the tile needs the per-element mask (it crosses the tile's first query
// position, or, spanning several query blocks, some of its (row, key) pairs are not visible).
struct KeyTileCursor {
  static constexpr int kMaxQueryBlocks = kPrefillBlockM / 16;  // B = 16
  int block_size;
  int q_tile;         // query tile index (positions q_tile * 64 ...)
  bool multi;         // B < 64: several query blocks per tile
  BlockKeyTiles<kPrefillBlockN, 1> tiles;  // B >= 64
  // B < 64
  VisibleBlocks<kMaxQueryBlocks> multi_walk;
  unsigned all_rows;  // bits of the tile's query blocks
  int peek;           // the walk's next block (-2: not read yet)
  unsigned peek_rows;

  __device__ void init(const SparsePattern& pattern, int h, int tile, int first_valid_pos, int last_valid_pos) {
    block_size = pattern.block_size;
    q_tile = tile;
    const int qb_first = first_valid_pos >> pattern.block_shift, qb_last = last_valid_pos >> pattern.block_shift;
    multi = pattern.block_size < kPrefillBlockM;
    if (multi) {
      multi_walk.init(pattern, h, qb_first, qb_last);
      all_rows = (1u << (qb_last - qb_first + 1)) - 1;
      peek = -2;
    } else {
      tiles.init(pattern, h, qb_first, qb_first, tile * kPrefillBlockM + kPrefillBlockM - 1);
    }
  }

  // Does key tile t hold a key after the tile's first query position (so it needs the causal mask)?
  __device__ bool crosses_diagonal(int t) const { return (t + 1) * kPrefillBlockN - 1 > q_tile * kPrefillBlockM; }

  __device__ bool next(int& key_tile, bool& masked) {
    if (multi) {  // B <= kPrefillBlockN: kPrefillBlockN / B blocks per key tile
      if (peek == -2) peek = multi_walk.next(peek_rows);
      if (peek < 0) return false;
      const int tile = peek * block_size / kPrefillBlockN;
      bool all = true;
      int seen = 0;
      for (; peek >= 0 && peek * block_size / kPrefillBlockN == tile; peek = multi_walk.next(peek_rows), ++seen)
        all &= peek_rows == all_rows;
      key_tile = tile;
      masked = !all || seen * block_size < kPrefillBlockN || crosses_diagonal(tile);
      return true;
    }
    if (!tiles.next(key_tile)) return false;
    masked = crosses_diagonal(key_tile);
    return true;
  }

  __device__ bool pairwise() const { return multi; }
};

// ---- the kernel ---------------------------------------------------------------------------------

// Three CTAs per SM where the shared memory allows it (head dims up to 128): up to 168 registers.
#ifndef BSA_PREFILL_MIN_CTAS
#define BSA_PREFILL_MIN_CTAS 3
#endif
template <typename Element, int kHeadDimPad, typename Cache>
__global__ void __launch_bounds__(kPrefillThreads, kHeadDimPad <= 128 ? BSA_PREFILL_MIN_CTAS : 1)
prefill_sm80_kernel(const PrefillParams params) {
  using Smem = PrefillSmem<Element, kHeadDimPad, Cache>;
  constexpr int kChunksPerRow = kHeadDimPad / 8;
  constexpr int kTileChunks = kPrefillBlockM * kChunksPerRow;
  constexpr int kDimTiles = kHeadDimPad / 8;  // n-tiles of the output
  constexpr int kKeyNTiles = kPrefillBlockN / 8;  // n-tiles of S
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* s_q = reinterpret_cast<Element*>(smem_raw);
  unsigned char* s_k = smem_raw + Smem::kRingOffset;           // [kStages][kPrefillBlockN][kHeadDimPad] Cache
  unsigned char* s_v = s_k + Smem::kStages * Smem::kKeyTileBytes;  // the same for V
  Element* s_converted = reinterpret_cast<Element*>(smem_raw + Smem::kConvertedOffset);  // fp8: [K|V][N][pad]

  PrefillItem it;
  if (!load_prefill_item(params, kPrefillBlockM, 0, blockIdx.x, it)) return;
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

  // K and V of key tile key_tile (positions key_tile * kPrefillBlockN + row) into a ring stage: 16-byte
  // chunks of 8 Elements land swizzled, as ldmatrix reads them; chunks of 16 fp8 values land row-major
  // and are converted once the tile is there.
  auto swizzled = [](int row, int col) { return swizzle<kHeadDimPad>(row, col) * static_cast<int>(sizeof(Element)); };
  auto fp8_row_major = [](int row, int col) { return row * kHeadDimPad + col; };
  constexpr int kChunkElems = 16 / sizeof(Cache);
  constexpr int kCacheChunksPerRow = kHeadDimPad / kChunkElems;
  constexpr int kRowsPerCopy = kPrefillThreads / kCacheChunksPerRow;
  constexpr int kCopies = kPrefillBlockN * kCacheChunksPerRow / kPrefillThreads;
  const int copy_row0 = tid / kCacheChunksPerRow, copy_col = (tid % kCacheChunksPerRow) * kChunkElems;
  auto landed = [swizzled, fp8_row_major](int row, int col) { return Smem::kFp8 ? fp8_row_major(row, col) : swizzled(row, col); };
  // A paged tile's rows come from the pages `pages` holds (PagedRows::lookup, done here or ahead).
  auto load_paged_kv = [&](int key_tile, int stage, const PagedRows<kCopies, kRowsPerCopy>& pages) {
    copy_paged_kv_rows<Cache>(kv, pages, kv_head, key_tile * kPrefillBlockN, copy_row0, copy_col, head_size,
                              s_k + stage * Smem::kKeyTileBytes, s_v + stage * Smem::kKeyTileBytes, landed, landed);
  };
  // The table row and the rows' end are worked out per lookup, not held across the main loop: held,
  // they pushed the kernel past its 168 registers at sm_80 (24 bytes spilled, reloaded in the loop).
  auto look_up_pages = [&](PagedRows<kCopies, kRowsPerCopy>& pages, int key_tile) {
    pages.lookup(kv, kv.table_row(seq, kv_head), key_tile * kPrefillBlockN, copy_row0,
                 copy_col < head_size ? k_len : 0);
  };
  auto load_kv = [&](int key_tile, int stage) {
    if (kv.paged()) {
      PagedRows<kCopies, kRowsPerCopy> pages;
      look_up_pages(pages, key_tile);
      load_paged_kv(key_tile, stage, pages);
    } else {
      copy_contiguous_kv_rows<Cache, kCopies, kRowsPerCopy>(
          kv, seq, kv_head, key_tile * kPrefillBlockN, copy_row0, copy_col, k_len, copy_col < head_size,
          s_k + stage * Smem::kKeyTileBytes, s_v + stage * Smem::kKeyTileBytes, landed, landed);
    }
  };
  // An fp8 cache's scales: k_scale joins the softmax scale, v_scale multiplies the finished O.
  const float scale_log2 = params.scale_log2 * cache_scale(kv.k_scale);
  const float value_scale = cache_scale(kv.v_scale);

  // The ring: tiles 0 .. kStages - 2 in flight before the loop; iteration n waits for tile n, then
  // refills the stage tile n - 1 used. Tile ids and masks travel with their stage through shared
  // memory (written by thread 0 after the barrier that frees the stage, read after the next one).
  constexpr int kStages = Smem::kStages;
  __shared__ int s_stage_tile[kStages];
  __shared__ bool s_stage_masked[kStages];
  KeyTileCursor cursor;
  cursor.init(params.pattern, head, q_tile, valid_begin, valid_end - 1);
  int issued = 0;
  // The tile after the one being issued is walked, and over a paged cache its pages looked up, an
  // iteration ahead: the copy's addresses would wait for those table loads, whose latency now passes
  // under the current tile's products. H100, kv block 16, against walking at issue: paged 2k chunks
  // -5 to -8 %, contiguous varlen -2.5 to -4.5 % (the walk's own latency hidden too).
  PagedRows<kCopies, kRowsPerCopy> next_pages;
  int next_tile;
  bool next_masked;
  bool has_next = cursor.next(next_tile, next_masked);
  auto look_ahead = [&] {
    if (has_next && kv.paged()) look_up_pages(next_pages, next_tile);
  };
  look_ahead();
  auto issue_next = [&](int stage) {
    if (!has_next) return;
    if (kv.paged()) {
      load_paged_kv(next_tile, stage, next_pages);
    } else {
      load_kv(next_tile, stage);
    }
    if (tid == 0) {
      s_stage_tile[stage] = next_tile;
      s_stage_masked[stage] = next_masked;
    }
    ++issued;
    has_next = cursor.next(next_tile, next_masked);
    look_ahead();
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    issue_next(st);
    ptx::cp_async_commit();  // the first group carries Q too
  }

  float acc_o[kDimTiles][4];
  OnlineSoftmax softmax;
  softmax.init(flat(acc_o));
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

    const Element* k_tile = reinterpret_cast<const Element*>(s_k + stage * Smem::kKeyTileBytes);
    const Element* v_tile = reinterpret_cast<const Element*>(s_v + stage * Smem::kKeyTileBytes);
    if constexpr (Smem::kFp8) {  // fp8 -> Element in registers, into the converted tile
      convert_fp8_tile<Element, Cache, kPrefillBlockN, kHeadDimPad, kPrefillThreads>(
          s_k + stage * Smem::kKeyTileBytes, s_converted, tid, fp8_row_major, swizzled);
      convert_fp8_tile<Element, Cache, kPrefillBlockN, kHeadDimPad, kPrefillThreads>(
          s_v + stage * Smem::kKeyTileBytes, s_converted + Smem::kKeyTileElems, tid, fp8_row_major, swizzled);
      __syncthreads();  // the converted tile is complete (the previous one was released by the barrier above)
      k_tile = s_converted;
      v_tile = s_converted + Smem::kKeyTileElems;
    }

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

    // Tiles that need no mask keep S unscaled (the scale folds into the exponent's FFMA); masked
    // tiles are scaled and masked first.
    float multiplier = scale_log2;
    if (cur_masked || !(scale_log2 > 0.f)) {
      multiplier = 1.f;
      const int key_pos0 = cur_tile * kPrefillBlockN;
#pragma unroll
      for (int n = 0; n < kKeyNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          bool visible = true;
          if (cur_masked) {
            const int p = tile_pos + row_in_tile[e >> 1];
            const int t = key_pos0 + n * 8 + tig * 2 + (e & 1);
            visible = t <= p && t < k_len;
            if (pairwise && visible)
              visible = block_visible(params.pattern, head, p >> params.pattern.block_shift,
                                      t >> params.pattern.block_shift);
          }
          acc_s[n][e] = masked_score(acc_s[n][e], visible, scale_log2);
        }
    }
    float row_alpha[2];
    softmax.update(flat(acc_s), multiplier, 0.f, row_alpha);
    rescale_rows(flat(acc_o), row_alpha);

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
  for (int r = 0; r < 2; ++r)
    inv_sum[r] = finish_prefill_row(params, it, softmax, r, tile_pos + row_in_tile[r], it.head, tig) * value_scale;
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

template <typename Element, int kHeadDimPad, typename Cache>
void launch_prefill_sm80(const PrefillParams& params, int max_tiles, cudaStream_t stream) {
  constexpr int kSmemBytes = PrefillSmem<Element, kHeadDimPad, Cache>::kBytes;
  auto kernel = prefill_sm80_kernel<Element, kHeadDimPad, Cache>;
  // Always: the 48 KB default counts the kernel's static shared memory too, so a dynamic size just
  // under it can still fail to launch (seen with 32-key tiles and 2 stages: exactly 48 KB dynamic).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  kernel<<<max_tiles * params.num_q_heads, kPrefillThreads, kSmemBytes, stream>>>(params);
}

}  // namespace blocksparse_attn
