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

#include "cuda/kernels/params.h"
#include "cuda/kernels/prefill_sm80.cuh"  // swizzle, layout_block_visible
#include "cuda/kernels/ptx.cuh"

namespace blocksparse_attn {

constexpr int kDecodeWarps = kDecodeWarpsPerCta;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeSliceRows = kDecodeSliceTokens;
constexpr int kDecodeStages = 3;      // cp.async ring depth per warp: two slices in flight while one computes

template <typename Element, int kHeadDimPad>
struct DecodeSmem {
  static constexpr int kSliceElems = kDecodeSliceRows * kHeadDimPad;
  static constexpr int kPipelineBytes = kDecodeWarps * kDecodeStages * 2 * kSliceElems * sizeof(Element);
  // The merge of the 4 warps' states reuses the ring: unnormalised O in float32 per warp.
  static constexpr int kMergeBytes = kDecodeWarps * kDecodeHeadsPerCta * kHeadDimPad * sizeof(float);
  static_assert(kMergeBytes <= kPipelineBytes, "the warp merge must fit in the K/V ring");
  static constexpr int kQueryBytes = kDecodeHeadsPerCta * kHeadDimPad * sizeof(Element);
  static constexpr int kBytes = kQueryBytes + kPipelineBytes;
};

// The union of the key blocks that the CTA's q heads see from query block i, as a list indexed
// k = 0 .. total-1 in ascending block order; seek(k, rows) returns block k and sets bit r of rows
// when head row r sees it.
//  - parametric pattern: the far vertical blocks j < band_start whose residue j % V belongs to some
//    head (closed form, O(1) per index, so a split starts anywhere and lanes may seek independently),
//    then the band [band_start, i], seen by every head;
//  - explicit layout: a warp-wide merge of the heads' sorted CSR rows (lane r holds head r's cursor),
//    walked forwards; seek() must be called by all lanes of a warp with non-decreasing k.
struct GroupKeyBlocks {
  bool layout;
  int total;
  // parametric
  int vert_stride, band_start, num_far, num_residues;
  const int* residues;               // sorted, distinct (shared memory)
  const unsigned* residue_rows;      // rows whose heads have residues[e] (shared memory)
  // layout
  const SparsePattern* pattern;
  const int32_t* col;
  int query_block, lane_head;
  bool lane_has_head;
  int entry, entry_end, head_block;  // this lane's head: next entry and its block (INT_MAX when done)
  int seek_index, seek_block;

  __device__ int step() {
    const int j = __reduce_min_sync(0xffffffffu, head_block);
    if (j != INT_MAX && head_block == j) head_block = ++entry < entry_end ? col[entry] : INT_MAX;
    return j;
  }

  __device__ int seek(int k, unsigned& rows) {
    if (!layout) {
      if (k >= num_far) {
        rows = 0xffffu;
        return band_start + (k - num_far);
      }
      const int e = k % num_residues;
      rows = residue_rows[e];
      return (k / num_residues) * vert_stride + residues[e];
    }
    while (seek_index < k) {
      seek_block = step();
      ++seek_index;
    }
    rows = __ballot_sync(0xffffffffu, lane_has_head && block_visible(*pattern, lane_head, query_block, seek_block));
    return seek_block;
  }

  __device__ void init_layout(const SparsePattern& p, int head, bool has_head, int i) {
    layout = true;
    pattern = &p;
    query_block = i;
    lane_head = head;
    lane_has_head = has_head;
    entry = entry_end = 0;
    if (has_head && i < p.layout_rows) {
      const int32_t* crow = p.layout_crow + static_cast<int64_t>(head) * (p.layout_rows + 1);
      col = p.layout_col + static_cast<int64_t>(head) * p.layout_col_stride;
      entry = crow[i];
      entry_end = crow[i + 1];
    }
    const int first_entry = entry;
    head_block = entry < entry_end ? col[entry] : INT_MAX;
    total = 0;
    while (step() != INT_MAX) ++total;  // a counting pass, then rewind
    entry = first_entry;
    head_block = entry < entry_end ? col[entry] : INT_MAX;
    seek_index = -1;
  }
};

template <typename Element, int kHeadDimPad>
__global__ void __launch_bounds__(kDecodeThreads)
decode_sm80_kernel(const DecodeParams params) {
  using Smem = DecodeSmem<Element, kHeadDimPad>;
  constexpr int kChunksPerRow = kHeadDimPad / 8;
  constexpr int kKSteps = kHeadDimPad / 16;
  constexpr int kDimTiles = kHeadDimPad / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* s_q = reinterpret_cast<Element*>(smem_raw);
  Element* s_ring = reinterpret_cast<Element*>(smem_raw + Smem::kQueryBytes);  // [warp][stage][K|V][16][pad]
  __shared__ int s_residues[kDecodeHeadsPerCta];
  __shared__ unsigned s_residue_rows[kDecodeHeadsPerCta];
  __shared__ int s_num_residues;
  __shared__ int s_slice_token[kDecodeWarps][kDecodeStages];  // first key position of each staged slice
  __shared__ unsigned s_slice_rows[kDecodeWarps][kDecodeStages];  // head rows that see it
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
  const int64_t table_tokens = kv.block_table_stride * kv.kv_block_size;
  const int capacity = table_tokens > INT_MAX ? INT_MAX : static_cast<int>(table_tokens);
  const int seq_len = min(max(kv.seq_lens[seq], 0), capacity);
  const int query_block = seq_len > 0 ? (seq_len - 1) / pattern.block_size : 0;
  const int band_start = max(query_block - pattern.local_blocks + 1, 0);

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
  if (tid == 0 && !pattern.has_layout()) {  // the group's distinct vertical residues, sorted
    int n = 0;
    for (int r = 0; r < num_rows; ++r) {
      int rho = vertical_residue(pattern, first_head + r);
      int pos = n;
      bool seen = false;
      for (int e = 0; e < n; ++e) seen |= s_residues[e] == rho;
      if (seen) continue;
      while (pos > 0 && s_residues[pos - 1] > rho) {
        s_residues[pos] = s_residues[pos - 1];
        --pos;
      }
      s_residues[pos] = rho;
      ++n;
    }
    s_num_residues = n;
    for (int e = 0; e < n; ++e) {
      unsigned rows = 0;
      for (int r = 0; r < num_rows; ++r) rows |= (vertical_residue(pattern, first_head + r) == s_residues[e]) << r;
      s_residue_rows[e] = rows;
    }
  }
  ptx::cp_async_wait<0>();
  __syncthreads();

  GroupKeyBlocks blocks;
  if (pattern.has_layout()) {
    blocks.init_layout(pattern, first_head + lane, lane < num_rows, query_block);
  } else {
    blocks.layout = false;
    blocks.vert_stride = pattern.vert_stride;
    blocks.band_start = band_start;
    blocks.num_residues = s_num_residues;
    blocks.residues = s_residues;
    blocks.residue_rows = s_residue_rows;
    int far = (band_start / pattern.vert_stride) * s_num_residues;
    for (int e = 0; e < s_num_residues; ++e) far += s_residues[e] < band_start % pattern.vert_stride;
    blocks.num_far = far;
    blocks.total = far + query_block - band_start + 1;
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

  Element* warp_ring = s_ring + warp * kDecodeStages * 2 * Smem::kSliceElems;
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
  auto fetch_pages = [&](int batch) {
    const int m = batch * 32 + lane;
    if (slice_begin + warp + kDecodeWarps * m >= slice_end) return -1;
    unsigned rows;
    const int token0 = slice_token(m, rows);
    if (token0 >= seq_len) return -1;  // the diagonal block's tail: past the table's used entries
    return kv.block_tables[seq * kv.block_table_stride + token0 / kv.kv_block_size];
  };
  int pages_batch = 0, pages_current = -1, pages_next = -1;
  if (prefetch_pages) {
    pages_current = fetch_pages(0);
    pages_next = fetch_pages(1);
  }

  // This lane's share of a slice copy: rows lane_row + u * kRowsPerCopy, 16-byte chunk lane_col.
  constexpr int kRowsPerCopy = 32 / kChunksPerRow > 0 ? 32 / kChunksPerRow : 1;
  constexpr int kCopies = kDecodeSliceRows * kChunksPerRow / 32;
  const int lane_row = lane / kChunksPerRow, lane_col = (lane % kChunksPerRow) * 8;
  const Element* key = static_cast<const Element*>(kv.key);
  const Element* value = static_cast<const Element*>(kv.value);
  const int64_t head_offset = kv_head * kv.cache_head_stride;

  // Stages the warp's m-th slice: positions past seq_len, past what the block table addresses, or in
  // a bad block read as zeros, which keeps unwritten (possibly NaN) cache slots out of P.V.
  auto load_slice = [&](int m, int stage) {
    unsigned rows;
    const int token0 = slice_token(m, rows);
    if (lane == 0) {
      s_slice_token[warp][stage] = token0;
      s_slice_rows[warp][stage] = rows;
    }
    Element* dst_k = warp_ring + stage * 2 * Smem::kSliceElems;
    Element* dst_v = dst_k + Smem::kSliceElems;
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
      const int64_t base = page_ok ? page * kv.cache_block_stride + head_offset +
                                         static_cast<int64_t>(token0 % kv.kv_block_size + lane_row) * head_size + lane_col
                                   : 0;
#pragma unroll
      for (int u = 0; u < kCopies; ++u) {
        const int row = lane_row + u * kRowsPerCopy;
        const bool valid = page_ok && row < rows_left;
        const int64_t offset = base + static_cast<int64_t>(u * kRowsPerCopy) * head_size;
        const int dst = swizzle<kHeadDimPad>(row, lane_col);
        ptx::cp_async_16(dst_k + dst, valid ? key + offset : key, valid);
        ptx::cp_async_16(dst_v + dst, valid ? value + offset : value, valid);
      }
      return;
    }
#pragma unroll
    for (int u = 0; u < kCopies; ++u) {  // general: a page lookup per row
      const int row = lane_row + u * kRowsPerCopy;
      const int pos = token0 + row;
      bool valid = pos < seq_len && lane_col < head_size;
      int64_t offset = 0;
      if (valid) {
        const int page = kv.block_tables[seq * kv.block_table_stride + pos / kv.kv_block_size];
        valid = page >= 0 && page < kv.num_cache_blocks;
        offset = page * kv.cache_block_stride + head_offset + static_cast<int64_t>(pos % kv.kv_block_size) * head_size +
                 lane_col;
      }
      const int dst = swizzle<kHeadDimPad>(row, lane_col);
      ptx::cp_async_16(dst_k + dst, valid ? key + offset : key, valid);
      ptx::cp_async_16(dst_v + dst, valid ? value + offset : value, valid);
    }
  };

  float acc_o[kDimTiles][4];
#pragma unroll
  for (int d = 0; d < kDimTiles; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[d][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  // Slices of this warp: slice_begin + warp + kDecodeWarps * m. Iteration m first refills the stage
  // that slice m - 1 used with slice m + kDecodeStages - 1, then waits for slice m: kDecodeStages - 1
  // slices stay in flight while one computes (waiting first would leave one fewer). Every iteration
  // commits one group, possibly empty, so wait_group<kDecodeStages - 1> always means "slice m landed".
#pragma unroll
  for (int m = 0; m < kDecodeStages - 1; ++m) {
    if (slice_begin + warp + kDecodeWarps * m < slice_end) load_slice(m, m);
    ptx::cp_async_commit();
  }
  for (int m = 0;; ++m) {
    const int slice = slice_begin + warp + kDecodeWarps * m;
    if (slice >= slice_end) break;
    const int stage = m % kDecodeStages;
    __syncwarp();  // every lane is done reading slice m - 1's stage
    const int ahead = m + kDecodeStages - 1;
    if (slice_begin + warp + kDecodeWarps * ahead < slice_end) load_slice(ahead, ahead % kDecodeStages);
    ptx::cp_async_commit();
    ptx::cp_async_wait<kDecodeStages - 1>();
    __syncwarp();  // every lane's copies of slice m are visible

    const Element* k_slice = warp_ring + stage * 2 * Smem::kSliceElems;
    const Element* v_slice = k_slice + Smem::kSliceElems;
    const int token0 = s_slice_token[warp][stage];
    const unsigned slice_rows = s_slice_rows[warp][stage];

    // S = Q K^T: 16 heads x 16 keys.
    float acc_s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t b[4];
      ptx::ldmatrix_x4(b, k_slice + swizzle<kHeadDimPad>((lane & 7) + (lane >> 4) * 8, ks * 16 + ((lane >> 3) & 1) * 8));
      ptx::mma_16816<Element>(acc_s[0], q_frag[ks], b[0], b[1]);
      ptx::mma_16816<Element>(acc_s[1], q_frag[ks], b[2], b[3]);
    }

    // Mask by head (which heads see this block) and by length: only far blocks and the last slice
    // need it (a select, never an added bias: NaN-safe). Rows past num_rows have zero queries and
    // are never written, so the band needs no row mask.
    if (slice_rows != 0xffffu || token0 + kDecodeSliceRows > seq_len) {  // warp-uniform
      const bool sees[2] = {((slice_rows >> group) & 1u) != 0, ((slice_rows >> (group + 8)) & 1u) != 0};
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = token0 + n * 8 + tig * 2 + (e & 1);
          if (!(sees[e >> 1] && t < seq_len)) acc_s[n][e] = -INFINITY;
        }
    }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[n][e] *= params.scale_log2;

    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(row_max[r], fmaxf(fmaxf(acc_s[0][2 * r], acc_s[0][2 * r + 1]), fmaxf(acc_s[1][2 * r], acc_s[1][2 * r + 1])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float ref = mx == -INFINITY ? 0.f : mx;  // a head that has seen nothing yet: avoid inf - inf
      alpha[r] = ptx::exp2_approx(row_max[r] - ref);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        acc_s[n][2 * r] = ptx::exp2_approx(acc_s[n][2 * r] - ref);
        acc_s[n][2 * r + 1] = ptx::exp2_approx(acc_s[n][2 * r + 1] - ref);
        sum += acc_s[n][2 * r] + acc_s[n][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha[r] + sum;
    }
    // The running maxima settle after a few slices; skip the 2 x kDimTiles rescales while they hold.
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int d = 0; d < kDimTiles; ++d) {
        acc_o[d][0] *= alpha[0];
        acc_o[d][1] *= alpha[0];
        acc_o[d][2] *= alpha[1];
        acc_o[d][3] *= alpha[1];
      }
    }

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
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(s_ring);  // [warp][16][pad]
  if (tig == 0) {
    s_row_max[warp][group] = row_max[0];
    s_row_max[warp][group + 8] = row_max[1];
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
    const float inv_sum = sum == 0.f ? 0.f : 1.f / sum;
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) acc += weight[w] * s_o[(w * kDecodeHeadsPerCta + row) * kHeadDimPad + col + e];
      o[e] = acc * inv_sum;
    }
    const float lse = sum == 0.f ? -INFINITY : (mx + __log2f(sum)) * 0.69314718055994531f;
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

template <typename Element, int kHeadDimPad>
void launch_decode_sm80(const DecodeParams& params, cudaStream_t stream) {
  constexpr int kSmemBytes = DecodeSmem<Element, kHeadDimPad>::kBytes;
  auto kernel = decode_sm80_kernel<Element, kHeadDimPad>;
  // Always: the 48 KB default counts the kernel's static shared memory too, so a dynamic size just
  // under it can still fail to launch (seen with 32-key tiles and 2 stages: exactly 48 KB dynamic).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  const dim3 grid(params.num_splits, params.num_kv_heads * params.head_chunks, params.num_seqs);
  kernel<<<grid, kDecodeThreads, kSmemBytes, stream>>>(params);
  if (params.num_splits > 1)
    decode_merge_kernel<Element><<<params.num_seqs * params.num_q_heads, 128, 0, stream>>>(params);
}

}  // namespace blocksparse_attn
