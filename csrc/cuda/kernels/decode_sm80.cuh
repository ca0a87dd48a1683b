// Block-sparse decode over the paged KV cache on tensor cores: one query token per sequence.
//
// One CTA = one (split, kv head, chunk of up to 16 q heads of its group, sequence). The q heads are
// the rows of the m16n8k16 A fragment, so every key block the group needs is read from HBM once and
// serves all its heads (Phi-3-small: 4 heads, each seeing its own vertical columns plus the shared
// local band). The CTA walks only the union of the group's visible key blocks, in 16-token slices:
// warp w takes slices w, w + 4, ... of the split's range with its own cp.async ring and its own
// online softmax, so warps never wait on each other until the final merge through shared memory.
// Splits (flash-decoding) divide the union's slices evenly; a merge kernel combines their outputs by
// log-sum-exp. Torch-free: compiled by bare nvcc in CI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "common/pattern.h"
#include "cuda/kernels/kv_tile.cuh"
#include "cuda/kernels/params.h"
#include "cuda/kernels/ptx.cuh"
#include "cuda/kernels/smem_layout.cuh"
#include "cuda/kernels/softmax.cuh"

namespace blocksparse_attn {

constexpr int kDecodeWarps = kDecodeWarpsPerCta;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeSliceRows = kDecodeSliceTokens;
// Shared memory of one CTA: Q, each warp's cp.async ring of K/V slices as the cache stores them,
// and, for an fp8 cache, each warp's V slice converted to Element (what ldmatrix.trans reads; K's
// fragments are converted straight from the landed slice into registers). An fp8 CTA takes 68 KB at
// head dim 128, so three fit on an SM (two with a 16-bit cache).
template <typename Element, int kHeadDimPad, typename Cache>
struct DecodeSmem {
  static constexpr bool kFp8 = CacheFormat<Cache>::kFp8;
  static constexpr int kStages = 3;  // ring depth per warp
  static constexpr int kSliceBytes = kDecodeSliceRows * kHeadDimPad * sizeof(Cache);  // K or V, as stored
  static constexpr int kSliceElems = kDecodeSliceRows * kHeadDimPad;
  static constexpr int kPipelineBytes = kDecodeWarps * kStages * 2 * kSliceBytes;
  static constexpr int kConvertedBytes = kFp8 ? kDecodeWarps * kSliceElems * sizeof(Element) : 0;
  // The merge of the 4 warps' states reuses the ring: unnormalised O in float32 per warp.
  static constexpr int kMergeBytes = kDecodeWarps * kDecodeHeadsPerCta * kHeadDimPad * sizeof(float);
  static_assert(kMergeBytes <= kPipelineBytes, "the warp merge must fit in the K/V ring");
  static constexpr int kQueryBytes = kDecodeHeadsPerCta * kHeadDimPad * sizeof(Element);
  static constexpr int kBytes = kQueryBytes + kPipelineBytes + kConvertedBytes;
};

// The union of the key blocks that the CTA's q heads see from query block i, indexed k = 0 .. total-1
// in ascending block order; seek(k, rows) returns block k and sets bit r of rows when head row r
// sees it. Both forms come from common/pattern.h:
//  - parametric pattern: HeadSetBlocks, O(1) per index, so a split starts anywhere and lanes may
//    seek independently;
//  - explicit layout: a warp-wide merge of the heads' walks (lane r walks head r's row), forwards
//    only; seek() must be called by all lanes of a warp with non-decreasing k.
struct GroupKeyBlocks {
  bool layout;
  int total;
  HeadSetBlocks set;  // parametric
  // layout
  const SparsePattern* pattern;
  int lane_head, query_block;
  bool lane_has_head;
  const int32_t* col;  // this lane's head's column list
  LayoutRow row;       // its row
  int seek_index, seek_block;
  unsigned seek_rows;

  __device__ void restart() {
    col = LayoutRow::columns(*pattern, lane_head);
    row.init(*pattern, lane_head, query_block);
    if (!lane_has_head) row.entry_end = row.entry;
    seek_index = -1;
  }

  // The warp's next block (INT_MAX at the end) and the lanes (heads) that see it.
  __device__ int step(unsigned& rows) {
    const int mine = row.peek(col);
    const int j = __reduce_min_sync(0xffffffffu, mine);
    rows = __ballot_sync(0xffffffffu, j != INT32_MAX && mine == j);
    if (j != INT32_MAX && mine == j) row.advance();
    return j;
  }

  __device__ int seek(int k, unsigned& rows) {
    if (!layout) return set.block(k, rows);
    while (seek_index < k) {
      seek_block = step(seek_rows);
      ++seek_index;
    }
    rows = seek_rows;
    return seek_block;
  }

  __device__ void init_layout(const SparsePattern& p, int head, bool has_head, int i) {
    layout = true;
    pattern = &p;
    lane_head = head;
    lane_has_head = has_head;
    query_block = i;
    restart();
    total = 0;
    unsigned rows;
    while (step(rows) != INT32_MAX) ++total;  // a counting pass, then rewind
    restart();
  }
};

template <typename Element, int kHeadDimPad, typename Cache>
__global__ void __launch_bounds__(kDecodeThreads)
decode_sm80_kernel(const DecodeParams params) {
  using Smem = DecodeSmem<Element, kHeadDimPad, Cache>;
  constexpr int kStages = Smem::kStages;
  constexpr int kChunksPerRow = kHeadDimPad / 8;
  constexpr int kKSteps = kHeadDimPad / 16;
  constexpr int kDimTiles = kHeadDimPad / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* s_q = reinterpret_cast<Element*>(smem_raw);
  unsigned char* s_ring = smem_raw + Smem::kQueryBytes;  // [warp][stage][K|V][16][pad] Cache
  // fp8: [warp][16][pad] Element, the V slice
  Element* s_converted = reinterpret_cast<Element*>(smem_raw + Smem::kQueryBytes + Smem::kPipelineBytes);
  __shared__ int s_residues[kDecodeHeadsPerCta];
  __shared__ unsigned s_residue_rows[kDecodeHeadsPerCta];
  __shared__ int s_num_residues;
  __shared__ int s_slice_token[kDecodeWarps][kStages];  // first key position of each staged slice
  __shared__ unsigned s_slice_rows[kDecodeWarps][kStages];  // head rows that see it
  __shared__ float s_row_max[kDecodeWarps][kDecodeHeadsPerCta];
  __shared__ float s_row_sum[kDecodeWarps][kDecodeHeadsPerCta];

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / params.head_chunks;
  const int head_chunk = blockIdx.y % params.head_chunks;
  const int seq = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int head_size = params.head_size;
  const SparsePattern& pattern = params.pattern;
  const KeyValueSource& kv = params.kv;

  const int heads_per_kv = pattern.q_heads_per_kv;
  const int first_head = kv_head * heads_per_kv + head_chunk * kDecodeHeadsPerCta;
  const int num_rows = min(kDecodeHeadsPerCta, heads_per_kv - head_chunk * kDecodeHeadsPerCta);
  // A length the block table cannot address is clamped (the host checks it under BSA_CHECK_INPUTS).
  const int64_t table_tokens = kv.block_table_width * kv.kv_block_size;
  const int capacity = table_tokens > INT_MAX ? INT_MAX : static_cast<int>(table_tokens);
  const int seq_len = min(max(kv.seq_lens[seq], 0), capacity);
  const int query_block = seq_len > 0 ? (seq_len - 1) / pattern.block_size : 0;

  // Q rows = the chunk's heads; rows past num_rows and columns past head_size are zero.
  {
    const Element* q = static_cast<const Element*>(params.q);
    for (int c = tid; c < kDecodeHeadsPerCta * kChunksPerRow; c += kDecodeThreads) {
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool valid = row < num_rows && col < head_size;
      const Element* src = valid ? q + seq * params.q_row_stride + (first_head + row) * params.q_head_stride + col : q;
      ptx::cp_async_16(s_q + swizzle<kHeadDimPad>(row, col), src, valid);
    }
    ptx::cp_async_commit();
  }
  if (tid == 0 && !pattern.has_layout())  // the group's distinct vertical residues, sorted
    s_num_residues = head_residues(pattern, first_head, num_rows, s_residues, s_residue_rows);
  ptx::cp_async_wait<0>();
  __syncthreads();

  GroupKeyBlocks blocks;
  if (pattern.has_layout()) {
    blocks.init_layout(pattern, first_head + lane, lane < num_rows, query_block);
  } else {
    blocks.layout = false;
    blocks.set.init(pattern, query_block, s_residues, s_residue_rows, s_num_residues, 0xffffu);
    blocks.total = blocks.set.total;
  }
  if (seq_len == 0) blocks.total = 0;

  // This split's share of the union's 16-token slices (B / 16 per block, a power of two).
  const int slice_shift = __ffs(pattern.block_size / kDecodeSliceRows) - 1;
  const int total_slices = blocks.total << slice_shift;
  const int per_split = (total_slices + params.num_splits - 1) / params.num_splits;
  const int slice_begin = min(split * per_split, total_slices);
  const int slice_end = min(slice_begin + per_split, total_slices);

  // Q fragments stay in registers for the whole walk.
  uint32_t q_frag[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks)
    ptx::ldmatrix_x4(q_frag[ks], s_q + swizzle<kHeadDimPad>((lane & 7) + ((lane >> 3) & 1) * 8, ks * 16 + (lane >> 4) * 8));

  unsigned char* warp_ring = s_ring + warp * kStages * 2 * Smem::kSliceBytes;
  // The warp's m-th slice is slice_begin + warp + kDecodeWarps * m: its first key and its head rows.
  auto slice_token = [&](int m, unsigned& rows) {
    const int slice = slice_begin + warp + kDecodeWarps * m;
    const int block = blocks.seek(slice >> slice_shift, rows);
    return block * pattern.block_size + (slice & ((1 << slice_shift) - 1)) * kDecodeSliceRows;
  };
  // Page ids, fetched 32 slices ahead: with the parametric pattern and cache blocks holding whole
  // slices, lane l of the warp holds the page of the warp's slice 32 * batch + l. Looking the page up
  // just before the copy instead puts a dependent global load in front of every slice's cp.async.
  const bool prefetch_pages = !pattern.has_layout() && kv.kv_block_size % kDecodeSliceRows == 0;
  const int32_t* table = kv.table_row(seq, kv_head);
  auto fetch_pages = [&](int batch) {
    const int m = batch * 32 + lane;
    if (slice_begin + warp + kDecodeWarps * m >= slice_end) return -1;
    unsigned rows;
    const int token0 = slice_token(m, rows);
    if (token0 >= seq_len) return -1;  // the diagonal block's tail: past the table's used entries
    return table[token0 / kv.kv_block_size];
  };
  int pages_batch = 0, pages_current = -1, pages_next = -1;
  if (prefetch_pages) {
    pages_current = fetch_pages(0);
    pages_next = fetch_pages(1);
  }

  // This lane's share of a slice copy: rows lane_row + u * kRowsPerCopy, the 16-byte chunk that starts
  // at column lane_col (8 elements of 16 bits, or 16 of fp8). Elements land swizzled, as ldmatrix
  // reads them; fp8 lands row-major and is converted per slice.
  constexpr int kChunkElems = 16 / sizeof(Cache);
  constexpr int kCacheChunksPerRow = kHeadDimPad / kChunkElems;
  constexpr int kRowsPerCopy = 32 / kCacheChunksPerRow > 0 ? 32 / kCacheChunksPerRow : 1;
  constexpr int kCopies = kDecodeSliceRows * kCacheChunksPerRow / 32;
  const int lane_row = lane / kCacheChunksPerRow, lane_col = (lane % kCacheChunksPerRow) * kChunkElems;
  auto landed_offset = [](int row, int col) {
    return Smem::kFp8 ? swizzle_fp8<kHeadDimPad>(row, col) : swizzle<kHeadDimPad>(row, col) * static_cast<int>(sizeof(Element));
  };
  const Cache* key = static_cast<const Cache*>(kv.key);
  const Cache* value = static_cast<const Cache*>(kv.value);

  // Stages the warp's m-th slice: positions past seq_len, past what the block table addresses, or in
  // a bad block read as zeros, which keeps unwritten (possibly NaN) cache slots out of P.V.
  auto load_slice = [&](int m, int stage) {
    unsigned rows;
    const int token0 = slice_token(m, rows);
    if (lane == 0) {
      s_slice_token[warp][stage] = token0;
      s_slice_rows[warp][stage] = rows;
    }
    unsigned char* dst_k = warp_ring + stage * 2 * Smem::kSliceBytes;
    unsigned char* dst_v = dst_k + Smem::kSliceBytes;
    if (prefetch_pages) {  // warp-uniform branch: the shuffles below see every lane
      if (m / 32 != pages_batch) {
        pages_batch = m / 32;
        pages_current = pages_next;
        pages_next = fetch_pages(pages_batch + 1);
      }
      // The whole slice lies in one page: one base offset, then fixed steps.
      const int page = __shfl_sync(0xffffffffu, pages_current, m % 32);
      const bool page_ok = page >= 0 && page < kv.num_cache_blocks && lane_col < head_size;
      const int rows_left = seq_len - token0;
      const int64_t base = page_ok ? kv.page_offset(page, kv_head) +
                                         static_cast<int64_t>(token0 % kv.kv_block_size + lane_row) * head_size + lane_col
                                   : 0;
#pragma unroll
      for (int u = 0; u < kCopies; ++u) {
        const int row = lane_row + u * kRowsPerCopy;
        const bool valid = page_ok && row < rows_left;
        const int64_t offset = base + static_cast<int64_t>(u * kRowsPerCopy) * head_size;
        const int dst = landed_offset(row, lane_col);
        ptx::cp_async_16(dst_k + dst, valid ? key + offset : key, valid);
        ptx::cp_async_16(dst_v + dst, valid ? value + offset : value, valid);
      }
      return;
    }
    // General (explicit layouts, cache blocks smaller than a slice): a page lookup per row.
    copy_kv_rows<Cache, kCopies, kRowsPerCopy>(kv, seq, kv_head, token0, lane_row, lane_col, seq_len, head_size,
                                               true, dst_k, dst_v, landed_offset);
  };

  float acc_o[kDimTiles][4];
  OnlineSoftmax softmax;
  softmax.init(flat(acc_o));

  // An fp8 cache's scales: k_scale joins the softmax scale, v_scale multiplies the finished O.
  const float scale_log2 = params.scale_log2 * cache_scale(kv.k_scale);
  const float value_scale = cache_scale(kv.v_scale);

  // Slices of this warp: slice_begin + warp + kDecodeWarps * m. Iteration m first refills the stage
  // that slice m - 1 used with slice m + kStages - 1, then waits for slice m: kStages - 1 slices stay
  // in flight while one computes (waiting first would leave one fewer). Every iteration commits one
  // group, possibly empty, so wait_group<kStages - 1> always means "slice m landed".
#pragma unroll
  for (int m = 0; m < kStages - 1; ++m) {
    if (slice_begin + warp + kDecodeWarps * m < slice_end) load_slice(m, m);
    ptx::cp_async_commit();
  }
  for (int m = 0;; ++m) {
    const int slice = slice_begin + warp + kDecodeWarps * m;
    if (slice >= slice_end) break;
    const int stage = m % kStages;
    __syncwarp();  // every lane is done reading slice m - 1's stage (and its converted copy)
    const int ahead = m + kStages - 1;
    if (slice_begin + warp + kDecodeWarps * ahead < slice_end) load_slice(ahead, ahead % kStages);
    ptx::cp_async_commit();
    ptx::cp_async_wait<kStages - 1>();
    __syncwarp();  // every lane's copies of slice m are visible

    const unsigned char* landed = warp_ring + stage * 2 * Smem::kSliceBytes;
    const Element* k_slice = reinterpret_cast<const Element*>(landed);
    const Element* v_slice = reinterpret_cast<const Element*>(landed + Smem::kSliceBytes);
    if constexpr (Smem::kFp8) {  // V: fp8 -> Element through registers into the warp's converted slice
      Element* converted = s_converted + warp * Smem::kSliceElems;
      convert_fp8_tile<Element, Cache, kDecodeSliceRows, kHeadDimPad, 32>(
          landed + Smem::kSliceBytes, converted, lane, [](int row, int col) { return swizzle_fp8<kHeadDimPad>(row, col); },
          [](int row, int col) { return swizzle<kHeadDimPad>(row, col) * static_cast<int>(sizeof(Element)); });
      __syncwarp();
      v_slice = converted;
    }
    const int token0 = s_slice_token[warp][stage];
    const unsigned slice_rows = s_slice_rows[warp][stage];

    // S = Q K^T: 16 heads x 16 keys.
    float acc_s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t b[4];
      if constexpr (Smem::kFp8) {
        // The B fragments of keys group and group + 8, dims ks * 16 + 2 tig (+ 8): pairs of adjacent
        // fp8 values of the landed slice (swizzled: 8 rows' same columns sit in different banks),
        // converted in registers.
        auto pair = [&](int row, int col) {
          return fp8x2_to_elements<Element, Cache>(
              *reinterpret_cast<const __nv_fp8x2_storage_t*>(landed + swizzle_fp8<kHeadDimPad>(row, col)));
        };
        b[0] = pair(group, ks * 16 + tig * 2);
        b[1] = pair(group, ks * 16 + tig * 2 + 8);
        b[2] = pair(group + 8, ks * 16 + tig * 2);
        b[3] = pair(group + 8, ks * 16 + tig * 2 + 8);
      } else {
        ptx::ldmatrix_x4(b, k_slice + swizzle<kHeadDimPad>((lane & 7) + (lane >> 4) * 8, ks * 16 + ((lane >> 3) & 1) * 8));
      }
      ptx::mma_16816<Element>(acc_s[0], q_frag[ks], b[0], b[1]);
      ptx::mma_16816<Element>(acc_s[1], q_frag[ks], b[2], b[3]);
    }

    // Mask by head (which heads see this block) and by length: only far blocks and the last slice
    // need it; those are scaled and masked first, the others keep S unscaled (the scale folds into
    // the exponent). Rows past num_rows have zero queries and are never written, so the band needs
    // no row mask.
    float multiplier = scale_log2;
    if (slice_rows != 0xffffu || token0 + kDecodeSliceRows > seq_len || !(scale_log2 > 0.f)) {  // warp-uniform
      multiplier = 1.f;
      const bool sees[2] = {((slice_rows >> group) & 1u) != 0, ((slice_rows >> (group + 8)) & 1u) != 0};
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = token0 + n * 8 + tig * 2 + (e & 1);
          acc_s[n][e] = masked_score(acc_s[n][e], sees[e >> 1] && t < seq_len, scale_log2);
        }
    }
    float alpha[2];
    softmax.update(flat(acc_s), multiplier, 0.f, alpha);
    rescale_rows(flat(acc_o), alpha);

    // O += P V: the S accumulators of the two key n-tiles are exactly P's A fragment.
    uint32_t a[4];
    a[0] = ptx::pack2<Element>(acc_s[0][0], acc_s[0][1]);
    a[1] = ptx::pack2<Element>(acc_s[0][2], acc_s[0][3]);
    a[2] = ptx::pack2<Element>(acc_s[1][0], acc_s[1][1]);
    a[3] = ptx::pack2<Element>(acc_s[1][2], acc_s[1][3]);
#pragma unroll
    for (int nd = 0; nd < kDimTiles / 2; ++nd) {
      uint32_t b[4];
      ptx::ldmatrix_x4_trans(b, v_slice + swizzle<kHeadDimPad>((lane & 7) + ((lane >> 3) & 1) * 8, nd * 16 + (lane >> 4) * 8));
      ptx::mma_16816<Element>(acc_o[2 * nd], a, b[0], b[1]);
      ptx::mma_16816<Element>(acc_o[2 * nd + 1], a, b[2], b[3]);
    }
  }
  ptx::cp_async_wait<0>();

  // Merge the four warps' states through shared memory (over the ring, once every warp is done).
  const float row_sum[2] = {softmax.quad_sum(0), softmax.quad_sum(1)};
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(s_ring);  // [warp][16][pad]
  if (tig == 0) {
    s_row_max[warp][group] = softmax.row_max[0];
    s_row_max[warp][group + 8] = softmax.row_max[1];
    s_row_sum[warp][group] = row_sum[0];
    s_row_sum[warp][group + 8] = row_sum[1];
  }
#pragma unroll
  for (int d = 0; d < kDimTiles; ++d)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float* dst = s_o + (warp * kDecodeHeadsPerCta + group + 8 * r) * kHeadDimPad + d * 8 + tig * 2;
      dst[0] = acc_o[d][2 * r];
      dst[1] = acc_o[d][2 * r + 1];
    }
  __syncthreads();

  // Each thread finishes 8 columns of one head.
  Element* out = static_cast<Element*>(params.out);
  for (int c = tid; c < kDecodeHeadsPerCta * kChunksPerRow; c += kDecodeThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    if (row >= num_rows || col >= head_size) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, s_row_max[w][row]);
    float weight[kDecodeWarps], sum = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      weight[w] = s_row_max[w][row] == -INFINITY ? 0.f : ptx::exp2_approx(s_row_max[w][row] - mx);
      sum += weight[w] * s_row_sum[w][row];
    }
    // sum = 0: nothing visible (empty split, seq_len 0): O = 0, lse = -inf; a NaN sum (non-finite
    // input) stays NaN in both, as in dense attention.
    const float inv_sum = inverse_sum(sum) * value_scale;
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) acc += weight[w] * s_o[(w * kDecodeHeadsPerCta + row) * kHeadDimPad + col + e];
      o[e] = acc * inv_sum;
    }
    const float lse = row_lse(mx, sum);
    const int head = first_head + row;
    if (params.num_splits == 1) {
      uint4 packed;
      uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
      for (int e = 0; e < 4; ++e) words[e] = ptx::pack2<Element>(o[2 * e], o[2 * e + 1]);
      *reinterpret_cast<uint4*>(out + seq * params.out_row_stride + head * params.out_head_stride + col) = packed;
      if (params.lse != nullptr && col == 0) params.lse[static_cast<int64_t>(head) * params.num_seqs + seq] = lse;
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * params.num_q_heads + head) * params.num_splits + split;
      float4* dst = reinterpret_cast<float4*>(params.partial_out + part * head_size + col);
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (col == 0) params.partial_lse[part] = lse;
    }
  }
}

// Combines the splits of each (sequence, q head): out = sum_s exp(lse_s - lse*) O_s / sum_s exp(...).
template <typename Element>
__global__ void decode_merge_kernel(const DecodeParams params) {
  const int seq = blockIdx.x / params.num_q_heads;
  const int head = blockIdx.x % params.num_q_heads;
  const int64_t part0 = static_cast<int64_t>(blockIdx.x) * params.num_splits;
  const float* lse = params.partial_lse + part0;
  float mx = -INFINITY;
  for (int s = 0; s < params.num_splits; ++s) mx = fmaxf(mx, lse[s]);  // fmaxf skips NaN ...
  const float ref = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  for (int s = 0; s < params.num_splits; ++s) sum += lse[s] == -INFINITY ? 0.f : __expf(lse[s] - ref);  // ... this not
  const float inv_sum = sum == 0.f ? 0.f : 1.f / sum;  // every split empty: O = 0, lse = -inf
  Element* out = static_cast<Element*>(params.out) + seq * params.out_row_stride + head * params.out_head_stride;
  for (int d = threadIdx.x; d < params.head_size; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < params.num_splits; ++s) {
      const float w = lse[s] == -INFINITY ? 0.f : __expf(lse[s] - ref);
      acc += w * params.partial_out[(part0 + s) * params.head_size + d];
    }
    out[d] = static_cast<Element>(acc * inv_sum);
  }
  if (params.lse != nullptr && threadIdx.x == 0)
    params.lse[static_cast<int64_t>(head) * params.num_seqs + seq] = sum == 0.f ? -INFINITY : ref + __logf(sum);
}

template <typename Element, int kHeadDimPad, typename Cache>
void launch_decode_sm80(const DecodeParams& params, cudaStream_t stream) {
  constexpr int kSmemBytes = DecodeSmem<Element, kHeadDimPad, Cache>::kBytes;
  auto kernel = decode_sm80_kernel<Element, kHeadDimPad, Cache>;
  // Always: the 48 KB default counts the kernel's static shared memory too, so a dynamic size just
  // under it can still fail to launch (seen with 32-key tiles and 2 stages: exactly 48 KB dynamic).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  const dim3 grid(params.num_splits, params.num_kv_heads * params.head_chunks, params.num_seqs);
  kernel<<<grid, kDecodeThreads, kSmemBytes, stream>>>(params);
  if (params.num_splits > 1)
    decode_merge_kernel<Element><<<params.num_seqs * params.num_q_heads, 128, 0, stream>>>(params);
}

}  // namespace blocksparse_attn
