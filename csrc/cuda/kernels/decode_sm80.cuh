// Block-sparse decode over the paged KV cache on tensor cores: one query token per sequence.
//
// One CTA = one (split, kv head, chunk of up to 16 q heads of its group, sequence). The q heads are
// the rows of the m16n8k16 A fragment, so every key block the group needs is read from HBM once and
// serves all its heads (Phi-3-small: 4 heads, each seeing its own vertical columns plus the shared
// local band). The CTA walks only the union of the group's visible key blocks, in 16-token slices:
// warp w takes slices w, w + 4, ... of the split's range with its own cp.async ring and its own
// online softmax, so warps never wait on each other until the final merge through shared memory.
// Splits (flash-decoding) divide the union's slices evenly and are combined by log-sum-exp: on sm_90
// the splits of a group form one thread-block cluster and merge through distributed shared memory at
// the kernel's end (up to kMaxClusterSplits); elsewhere a merge kernel combines their outputs from
// global memory. Torch-free: compiled by bare nvcc in CI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
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
// Shared memory of one CTA: Q and each warp's cp.async ring of K/V slices as the cache stores them.
// An fp8 slice is read straight into mma fragments (converted in registers), so an fp8 CTA takes 52 KB
// at head dim 128 (four fit on an SM; two with a 16-bit cache, ~100 KB).
template <typename Element, int kHeadDimPad, typename Cache>
struct DecodeSmem {
  static constexpr bool kFp8 = CacheFormat<Cache>::kFp8;
  static constexpr int kStages = 3;  // ring depth per warp
  static constexpr int kSliceBytes = kDecodeSliceRows * kHeadDimPad * sizeof(Cache);  // K or V, as stored
  static constexpr int kPipelineBytes = kDecodeWarps * kStages * 2 * kSliceBytes;
  // The merge of the 4 warps' states: unnormalised O in float32 per warp, over the ring once every
  // warp is done (a 16-bit cache's ring is large enough; an fp8 one only at head dims up to 64).
  // Its rows are padded (4 or 8 floats) so that the quads' stores of a column tile fall in different
  // banks (unpadded, every store was an 8-way conflict: 1,024 shared-memory wavefronts a CTA, 2,048 fp8).
  static constexpr int kMergeRowFloats = kHeadDimPad + (kFp8 ? 4 : 8);
  static constexpr int kMergeBytes = kDecodeWarps * kDecodeHeadsPerCta * kMergeRowFloats * sizeof(float);
  static constexpr int kQueryBytes = kDecodeHeadsPerCta * kHeadDimPad * sizeof(Element);
  static constexpr int kBytes = kQueryBytes + (kMergeBytes > kPipelineBytes ? kMergeBytes : kPipelineBytes);
};

// The fp8 path's fragments (decode_sm80_kernel, Cache fp8). Both fp8 formats convert to fp16 exactly
// in one instruction per pair (to bf16 it takes four), so the tensor-core steps run in fp16 whatever
// the model's type: Q is scaled into fp16's range by a power of two (exact), P in [0, 1] is finer in
// fp16 than in bf16. Keys and values are read from the landed slice in 16- and 4-byte words, which
// the mma fragments can take unshuffled because both contractions and O's columns may run over the
// head dims in any order, as long as each side uses the same one:
//  - S = Q K^T: in k-step ks, thread (group, tig)'s fragment columns 2 tig (+1) and 2 tig + 8 (+9) are
//    head dims kQuarter * tig + 4 ks + 0..3: four adjacent bytes of a key row, one word;
//  - O += P V: V's fragment for keys 2 tig (+1) and 2 tig + 8 (+9) of O column n of dim tile j is head
//    dim fp8_value_dim(j, n): a word of key row 2 tig holds dims 4 group + 0..3 of one 32-dim span, for
//    four dim tiles, and a byte permute pairs it with row 2 tig + 1.
template <int kHeadDimPad>
__device__ __forceinline__ int fp8_value_dim(int tile, int n) {
  return 32 * (tile >> 2) + 4 * n + (tile & 3);
}

// A word of two stored fp8 pairs as two fp16 pairs (lo: bytes 0-1, hi: bytes 2-3). The word is split
// into 16-bit halves in PTX so that ptxas reads the high half in place (no shift per pair).
template <typename Cache>
__device__ __forceinline__ void fp8_pairs_to_half2(uint32_t word, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if constexpr (CacheFormat<Cache>::kKind == __NV_E4M3)
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}"
        : "=r"(lo), "=r"(hi) : "r"(word));
  else
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e5m2x2 %0, l;\n cvt.rn.f16x2.e5m2x2 %1, h;\n}"
        : "=r"(lo), "=r"(hi) : "r"(word));
#else
  auto pair = [](uint32_t bits) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(bits), CacheFormat<Cache>::kKind);
    return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
  };
  lo = pair(word & 0xffffu);
  hi = pair(word >> 16);
#endif
}

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
    // A lane past the group's heads reads nothing: its head's CSR row may lie past the layout.
    col = LayoutRow::columns(*pattern, lane_has_head ? lane_head : 0);
    row.entry = row.entry_end = 0;
    if (lane_has_head) row.init(*pattern, lane_head, query_block);
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

// CTAs per SM the register allocation must allow: 4 for an fp8 cache at head dims up to 128 (its
// 52 KB of shared memory fit 4; at 162 registers only 3 did), else what shared memory allows.
template <int kHeadDimPad, typename Cache>
__host__ __device__ constexpr int decode_min_ctas_per_sm() {
  return CacheFormat<Cache>::kFp8 && kHeadDimPad <= 128 ? 4 : 1;
}
// A grid that this many CTAs an SM hold in one wave (a small batch) runs a second build of the fp8
// kernel, with the registers of 2 CTAs an SM: its walk is not squeezed into 128, and it keeps Q's
// fragments in registers (H200, graph-replayed, e4m3: 1 x 2k 7.9 -> 7.6 us, 4 x 2k 9.6 -> 9.2). The
// 4-CTA build stays for large batches: built for 2 CTAs, 64 x 16k took 290 us instead of 280.
constexpr int kDecodeRoomyCtasPerSm = 2;
template <int kHeadDimPad, typename Cache>
__host__ __device__ constexpr bool decode_has_roomy_build() {
  return decode_min_ctas_per_sm<kHeadDimPad, Cache>() > kDecodeRoomyCtasPerSm;
}

// The log-sum-exp merge of a decode's splits, chunk by chunk: out = sum_s 2^(lse_s log2 e - ref) O_s /
// sum_s 2^(...) over kCols head dims. Each split's weight is one FFMA and one ex2 in the log2 domain
// (exp2(-inf) = 0, so an empty split, or a padding slot with lse -inf and O 0, needs no test; a NaN
// lse propagates); the reference rises with each chunk's largest lse; the sum is inverted once.
template <int kCols>
struct SplitMerge {
  float ref = -INFINITY;  // the largest lse so far, log2 domain
  float sum = 0.f;        // sum of 2^(lse_s log2 e - ref)
  float acc[kCols] = {};  // the same sum of weighted O_s

  template <int kChunk>
  __device__ __forceinline__ void add(const float (&lse)[kChunk], const float (&o)[kChunk][kCols]) {
    constexpr float kLog2e = 1.4426950408889634f;
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) mx = fmaxf(mx, lse[i]);  // fmaxf skips NaN ...
    mx = fmaxf(ref, mx * kLog2e);  // log2 e > 0: the largest scaled lse is the scaled largest
    const float new_ref = mx == -INFINITY ? 0.f : mx;
    const float carry = ptx::exp2_approx(ref - new_ref);  // 0 while ref is -inf
    sum *= carry;
#pragma unroll
    for (int e = 0; e < kCols; ++e) acc[e] *= carry;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      const float w = ptx::exp2_approx(fmaf(lse[i], kLog2e, -new_ref));  // ... this not
      sum += w;
#pragma unroll
      for (int e = 0; e < kCols; ++e) acc[e] += w * o[i][e];
    }
    ref = mx;
  }
  __device__ __forceinline__ float inverse() const { return inverse_sum(sum); }  // every split empty: O = 0
  __device__ __forceinline__ float lse() const { return row_lse(ref, sum); }
};

// The merge of a cluster's splits (DecodeParams::cluster_merge), run by every CTA of the cluster once
// each has left its normalised O (rows of s_o, kORow floats apart) and lse (s_split_lse) in its shared
// memory, by SplitMerge as decode_merge_kernel merges partials from global memory. The cluster spans
// grid x, so a CTA's rank is its split; thread t of CTA r merges the group's chunk of kCols columns
// r * kDecodeThreads + t (+ a multiple of splits * kDecodeThreads). Four columns a thread: on a small
// decode this merge is on the path of every CTA of the cluster (none leaves before every CTA has read
// its shared memory), and a thread's weighted sums are half those of eight (H200, graph-replayed,
// 1 x 2k: 7.2 -> 6.9 us with a bf16 cache, 7.6 -> 7.2 with e4m3). A chunk of kChunk splits'
// lse and O is loaded at once (one round trip over the cluster up to 8 splits, two up to 16); splits
// past the cluster are loaded from nowhere and weigh nothing.
template <typename Element, int kORow>
__device__ __forceinline__ void merge_cluster_splits(const DecodeParams& params, const float* s_o,
                                                     const float* s_split_lse, int seq, int first_head,
                                                     int num_rows) {
  constexpr int kChunk = 8, kCols = 4;
  static_assert(kMaxClusterSplits % kChunk == 0, "whole chunks of splits");
  ptx::cluster_sync();
  const int splits = params.num_splits, rank = blockIdx.x;
  const int head_size = params.head_size, chunks_per_row = (head_size + kCols - 1) / kCols;
  const uint32_t o_base = ptx::smem_addr(s_o), lse_base = ptx::smem_addr(s_split_lse);
  Element* out = static_cast<Element*>(params.out);
  for (int c = rank * kDecodeThreads + threadIdx.x; c < num_rows * chunks_per_row; c += splits * kDecodeThreads) {
    const int row = c / chunks_per_row, col = (c % chunks_per_row) * kCols;
    const uint32_t lse_at = lse_base + row * 4, o_at = o_base + (row * kORow + col) * 4;
    SplitMerge<kCols> merge;
#pragma unroll
    for (int s0 = 0; s0 < kMaxClusterSplits; s0 += kChunk) {
      if (s0 >= splits) break;
      float lse[kChunk], o[kChunk][kCols];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        lse[i] = -INFINITY;
        if (s0 + i < splits) {
          lse[i] = ptx::cluster_load(ptx::cluster_map(lse_at, s0 + i));
          v = ptx::cluster_load4(ptx::cluster_map(o_at, s0 + i));
        }
        o[i][0] = v.x, o[i][1] = v.y, o[i][2] = v.z, o[i][3] = v.w;
      }
      merge.add(lse, o);
    }
    const float inv_sum = merge.inverse();
    const int head = first_head + row;
    const uint2 packed = make_uint2(ptx::pack2<Element>(merge.acc[0] * inv_sum, merge.acc[1] * inv_sum),
                                    ptx::pack2<Element>(merge.acc[2] * inv_sum, merge.acc[3] * inv_sum));
    *reinterpret_cast<uint2*>(out + seq * params.out_row_stride + head * params.out_head_stride + col) = packed;
    if (params.lse != nullptr && col == 0) params.lse[static_cast<int64_t>(head) * params.num_seqs + seq] = merge.lse();
  }
  ptx::cluster_sync();
}

template <typename Element, int kHeadDimPad, typename Cache, int kMinCtasPerSm>
__global__ void __launch_bounds__(kDecodeThreads, kMinCtasPerSm) decode_sm80_kernel(const DecodeParams params) {
  using Smem = DecodeSmem<Element, kHeadDimPad, Cache>;
  // Q's fragments stay in registers for the whole walk with a 16-bit cache and in the roomy fp8 build.
  constexpr bool kQueryInRegisters =
      !Smem::kFp8 || (decode_has_roomy_build<kHeadDimPad, Cache>() && kMinCtasPerSm == kDecodeRoomyCtasPerSm);
  constexpr int kStages = Smem::kStages;
  constexpr int kChunksPerRow = kHeadDimPad / 8;
  constexpr int kKSteps = kHeadDimPad / 16;
  constexpr int kDimTiles = kHeadDimPad / 8;
  // The tensor-core operand type: the model's with a 16-bit cache, fp16 with an fp8 one (above).
  using Compute = std::conditional_t<Smem::kFp8, __half, Element>;
  constexpr int kQuarter = kHeadDimPad / 4;  // fp8: head dims per fragment column quad (above)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* s_q = reinterpret_cast<Element*>(smem_raw);
  unsigned char* s_ring = smem_raw + Smem::kQueryBytes;  // [warp][stage][K|V][16][pad] Cache
  __shared__ int s_residues[kDecodeWarps][kDecodeHeadsPerCta];  // each warp's copy (below)
  __shared__ unsigned s_residue_rows[kDecodeWarps][kDecodeHeadsPerCta];
  __shared__ float s_scales[2];  // an fp8 cache's k_scale and v_scale
  __shared__ int s_slice_token[kDecodeWarps][kStages];  // first key position of each staged slice
  __shared__ unsigned s_slice_rows[kDecodeWarps][kStages];  // head rows that see it
  __shared__ float s_row_max[kDecodeWarps][kDecodeHeadsPerCta];
  __shared__ float s_row_sum[kDecodeWarps][kDecodeHeadsPerCta];
  __shared__ float s_split_lse[kDecodeHeadsPerCta];  // cluster_merge: this split's lse per head

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
  // The group's distinct vertical residues, sorted (head_residues' result), worked out by each warp
  // for itself, lane r for head r: no warp waits for another (a thread-0 loop and a CTA barrier were
  // ~1,300 cycles of this kernel's path). From the parameters only, so before the wait below, while
  // the previous kernel ends (H200, graph-replayed, 1 x 2k: 6.9 -> 6.2 us bf16 cache, 7.2 -> 6.6 e4m3).
  int num_residues = 0;
  if (!pattern.has_layout()) {
    const bool mine = lane < num_rows;
    const int rho = mine ? vertical_residue(pattern, first_head + lane) : INT_MAX;
    const unsigned heads = __ballot_sync(0xffffffffu, mine);
    const unsigned same = __match_any_sync(0xffffffffu, mine ? rho : -1 - lane) & heads;
    const bool leader = mine && (same & ((1u << lane) - 1u)) == 0;  // the lowest head of its residue
    const unsigned leaders = __ballot_sync(0xffffffffu, leader);
    int rank = 0;  // residues below this one
    for (int j = 0; j < num_rows; ++j) rank += ((leaders >> j) & 1u) != 0 && __shfl_sync(0xffffffffu, rho, j) < rho;
    if (leader) {
      s_residues[warp][rank] = rho;
      s_residue_rows[warp][rank] = same;
    }
    num_residues = __popc(leaders);
    __syncwarp();
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the stream's previous kernel (launch_decode_sm80): the CTA
  // may be resident before that kernel has finished, and waits here, before its first global read,
  // until it has (and its writes are visible), as if launched in plain stream order. What comes
  // before reads only the parameters: it overlaps the previous kernel's end.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // The merge kernel (a programmatic dependent) may be scheduled now; it waits for this grid to finish.
  // With a cluster merge there is none, and the trigger lets the stream's next programmatic launch
  // (the next layer's decode in a serving step's graph) place its CTAs early in the same way.
  if (params.num_splits > 1) asm volatile("griddepcontrol.launch_dependents;");
#endif
  // A length the block table cannot address is clamped (the host checks it under BSA_CHECK_INPUTS).
  const int64_t table_tokens = kv.block_table_width * kv.kv_block_size;
  const int capacity = table_tokens > INT_MAX ? INT_MAX : static_cast<int>(table_tokens);
  // A small decode is a chain of dependent steps (measured at 1 x 2k: 7.6 us for the kernel, of which
  // an empty kernel is 1.8), so every load that does not need seq_len goes out before it is used:
  // seq_lens itself, Q and the fp8 scales (one cp.async group), and an L1 prefetch of this sequence's
  // block-table row for the page lookups.
  const int seq_len_stored = kv.seq_lens[seq];
  {
    const char* row = reinterpret_cast<const char*>(kv.table_row(seq, kv_head));
    if (static_cast<int64_t>(tid) * 128 < kv.block_table_width * 4)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(row + tid * 128));
  }

  // Q rows = the chunk's heads; rows past num_rows and columns past head_size are zero.
  {
    const Element* q = static_cast<const Element*>(params.q);
    static_assert(kDecodeHeadsPerCta * kChunksPerRow % kDecodeThreads == 0, "whole rounds of Q chunks");
#pragma unroll
    for (int i = 0; i < kDecodeHeadsPerCta * kChunksPerRow / kDecodeThreads; ++i) {
      const int c = tid + i * kDecodeThreads;
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool valid = row < num_rows && col < head_size;
      const Element* src = valid ? q + seq * params.q_row_stride + (first_head + row) * params.q_head_stride + col : q;
      ptx::cp_async_16(s_q + swizzle<kHeadDimPad>(row, col), src, valid);
    }
    if (tid == 0) {  // read after Q's group has landed: no register waits on them
      if (kv.k_scale != nullptr) ptx::cp_async_4(&s_scales[0], kv.k_scale);
      if (kv.v_scale != nullptr) ptx::cp_async_4(&s_scales[1], kv.v_scale);
    }
    ptx::cp_async_commit();
  }
  const int seq_len = min(max(seq_len_stored, 0), capacity);
  const int query_block = seq_len > 0 ? (seq_len - 1) / pattern.block_size : 0;

  GroupKeyBlocks blocks;
  if (pattern.has_layout()) {
    blocks.init_layout(pattern, first_head + lane, lane < num_rows, query_block);
  } else {
    blocks.layout = false;
    blocks.set.init(pattern, query_block, s_residues[warp], s_residue_rows[warp], num_residues, 0xffffu);
    blocks.total = blocks.set.total;
  }
  if (seq_len == 0) blocks.total = 0;

  // This split's share of the union's 16-token slices (B / 16 per block, a power of two).
  const int slice_shift = __ffs(pattern.block_size / kDecodeSliceRows) - 1;
  const int total_slices = blocks.total << slice_shift;
  const int per_split = (total_slices + params.num_splits - 1) / params.num_splits;
  const int slice_begin = min(split * per_split, total_slices);
  const int slice_end = min(slice_begin + per_split, total_slices);

  unsigned char* warp_ring = s_ring + warp * kStages * 2 * Smem::kSliceBytes;
  // The warp's m-th slice is slice_begin + warp + kDecodeWarps * m: its first key and its head rows.
  auto slice_token = [&](int m, unsigned& rows) {
    const int slice = slice_begin + warp + kDecodeWarps * m;
    const int block = blocks.seek(slice >> slice_shift, rows);
    return block * pattern.block_size + (slice & ((1 << slice_shift) - 1)) * kDecodeSliceRows;
  };
  // Slices described 32 at a time: with the parametric pattern and cache blocks holding whole slices,
  // lane l of the warp works out the warp's slice 32 * batch + l (its first key, head rows and page,
  // the page id fetched a batch ahead) and each slice's copy takes them by shuffles. Looking the page
  // up just before the copy puts a dependent global load in front of every slice's cp.async, and
  // working the slice out there costs every lane two integer divisions per slice.
  const bool prefetch_pages = !pattern.has_layout() && kv.kv_block_size % kDecodeSliceRows == 0;
  const int32_t* table = kv.table_row(seq, kv_head);
  struct SliceRef {
    int token0 = INT_MAX;  // first key (INT_MAX: past the split)
    unsigned rows = 0;
    int page = -1;         // -1: none (past the split or past seq_len: the diagonal block's tail)
    int page_row = 0;      // token0's row in its page
  };
  auto fetch_batch = [&](int batch) {
    SliceRef ref;
    const int m = batch * 32 + lane;
    if (slice_begin + warp + kDecodeWarps * m >= slice_end) return ref;
    ref.token0 = slice_token(m, ref.rows);
    if (ref.token0 < seq_len) {
      ref.page = table[kv.page_index(ref.token0)];
      ref.page_row = kv.row_in_page(ref.token0);
    }
    return ref;
  };
  // The current batch: this lane's slice's first key, rows and copy base (element offset of its first
  // row; -1 where it reads zeros: no page, or a page id out of range).
  int batch_current = 0, token_current = INT_MAX;
  unsigned rows_current = 0;
  int64_t base_current = -1;
  SliceRef next_ref;
  auto take_batch = [&](const SliceRef& ref) {
    token_current = ref.token0;
    rows_current = ref.rows;
    base_current = ref.page >= 0 && ref.page < kv.num_cache_blocks
                       ? kv.page_offset(ref.page, kv_head) + static_cast<int64_t>(ref.page_row) * head_size
                       : -1;
  };
  if (prefetch_pages) {
    take_batch(fetch_batch(0));
    next_ref = fetch_batch(1);
  }

  // This lane's share of a slice copy: rows lane_row + u * kRowsPerCopy, the 16-byte chunk that starts
  // at column lane_col (8 elements of 16 bits, or 16 of fp8). Elements land swizzled, as ldmatrix
  // reads them; fp8 chunks land XOR-swizzled by row (swizzle_fp8), as the fragment words are read.
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
    unsigned char* dst_k = warp_ring + stage * 2 * Smem::kSliceBytes;
    unsigned char* dst_v = dst_k + Smem::kSliceBytes;
    if (prefetch_pages) {  // warp-uniform branch: the shuffles below see every lane
      if (m / 32 != batch_current) {
        batch_current = m / 32;
        take_batch(next_ref);
        next_ref = fetch_batch(batch_current + 1);
      }
      const int token0 = __shfl_sync(0xffffffffu, token_current, m % 32);
      const unsigned rows = __shfl_sync(0xffffffffu, rows_current, m % 32);
      const int64_t slice_base = __shfl_sync(0xffffffffu, base_current, m % 32);
      if (lane == 0) {
        s_slice_token[warp][stage] = token0;
        s_slice_rows[warp][stage] = rows;
      }
      // The whole slice lies in one page: one base offset, then fixed steps.
      const bool page_ok = slice_base >= 0 && lane_col < head_size;
      const int rows_left = seq_len - token0;
      const int64_t base = page_ok ? slice_base + static_cast<int64_t>(lane_row) * head_size + lane_col : 0;
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
    unsigned rows;
    const int token0 = slice_token(m, rows);
    if (lane == 0) {
      s_slice_token[warp][stage] = token0;
      s_slice_rows[warp][stage] = rows;
    }
    copy_kv_rows<Cache, kCopies, kRowsPerCopy>(kv, seq, kv_head, token0, lane_row, lane_col, seq_len, head_size,
                                               true, dst_k, dst_v, landed_offset);
  };

  // Slices of this warp: slice_begin + warp + kDecodeWarps * m. Iteration m first refills the stage
  // that slice m - 1 used with slice m + kStages - 1, then waits for slice m: kStages - 1 slices stay
  // in flight while one computes (waiting first would leave one fewer). Every iteration commits one
  // group, possibly empty, so wait_group<kStages - 1> always means "slice m landed".
#pragma unroll
  for (int m = 0; m < kStages - 1; ++m) {
    if (slice_begin + warp + kDecodeWarps * m < slice_end) load_slice(m, m);
    ptx::cp_async_commit();
  }
  ptx::cp_async_wait<kStages - 1>();  // Q's group (the oldest) has landed
  __syncthreads();

  // Q fragments: in registers for the whole walk (kQueryInRegisters), else in shared memory (below).
  uint32_t q_frag[kKSteps][4];
  float q_factor_inverse = 1.f;  // fp8 with a bf16 model: S is divided by Q's factor (exact, below)
  if constexpr (Smem::kFp8) {
    // The fragments replace Q in shared memory, [ks][lane] 16 bytes each (the same 32 x kHeadDimPad
    // bytes), and are read back per slice (32 registers fewer leave room for 4 CTAs per SM) or once
    // into registers (kQueryInRegisters). Warp w builds those of k-steps w * kStepsPerWarp +
    // [0, kStepsPerWarp): thread (group, tig) takes head dims kQuarter * tig + 4 ks + 0..3 of rows
    // group and group + 8, 8 bytes each (every warp built all of them from 2-byte loads, one warp
    // stored them: ~400 instructions a thread on a small decode's path, 10 % of its stall samples at
    // 1 x 2k with ncu, against 2 % for a bf16 cache).
    constexpr int kStepsPerWarp = kKSteps / kDecodeWarps;
    static_assert(kKSteps % kDecodeWarps == 0, "whole k-steps a warp");
    uint2 q_words[kStepsPerWarp][2];
#pragma unroll
    for (int i = 0; i < kStepsPerWarp; ++i) {
      const int dim = kQuarter * tig + 4 * (warp * kStepsPerWarp + i);
      q_words[i][0] = *reinterpret_cast<const uint2*>(s_q + swizzle<kHeadDimPad>(group, dim));
      q_words[i][1] = *reinterpret_cast<const uint2*>(s_q + swizzle<kHeadDimPad>(group + 8, dim));
    }
    float q_factor = 1.f;
    if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
      // One power of two for the CTA (its fragments are shared), from |q| of 16-byte words of Q
      // (fp16_range_exponent).
      __shared__ unsigned s_q_amax[kDecodeWarps];
      unsigned amax = 0;
#pragma unroll
      for (int c = tid; c < kDecodeHeadsPerCta * kHeadDimPad / 8; c += kDecodeThreads) {
        const uint4 chunk = reinterpret_cast<const uint4*>(s_q)[c];
        const uint32_t words[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) amax = bf16x2_finite_magnitude_max(amax, words[e]);
      }
      amax = __reduce_max_sync(0xffffffffu, max(amax & 0xffffu, amax >> 16));
      if (lane == 0) s_q_amax[warp] = amax;
      __syncthreads();  // every warp's reads of Q are done, and its |q|max is out
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) amax = max(amax, s_q_amax[w]);
      const int exponent = fp16_range_exponent(amax);
      q_factor = exp2f(static_cast<float>(exponent));
      q_factor_inverse = exp2f(static_cast<float>(-exponent));
    } else {
      __syncthreads();  // every warp's reads of Q are done
    }
    auto to_half2 = [&](uint32_t pair) {  // two of the model's values (low half first) as fp16
      if constexpr (std::is_same_v<Element, __half>) return pair;
      else return bf16x2_to_half2(pair, q_factor);
    };
#pragma unroll
    for (int i = 0; i < kStepsPerWarp; ++i)
      reinterpret_cast<uint4*>(s_q)[(warp * kStepsPerWarp + i) * 32 + lane] =
          make_uint4(to_half2(q_words[i][0].x), to_half2(q_words[i][1].x), to_half2(q_words[i][0].y),
                     to_half2(q_words[i][1].y));
    __syncthreads();
    if constexpr (kQueryInRegisters) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        const uint4 q4 = reinterpret_cast<const uint4*>(s_q)[ks * 32 + lane];
        q_frag[ks][0] = q4.x, q_frag[ks][1] = q4.y, q_frag[ks][2] = q4.z, q_frag[ks][3] = q4.w;
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks)
      ptx::ldmatrix_x4(q_frag[ks], s_q + swizzle<kHeadDimPad>((lane & 7) + ((lane >> 3) & 1) * 8, ks * 16 + (lane >> 4) * 8));
  }

  float acc_o[kDimTiles][4];
  OnlineSoftmax softmax;
  softmax.init(flat(acc_o));

  // An fp8 cache's scales: k_scale joins the softmax scale, v_scale multiplies the finished O.
  // (From shared memory: they came with Q's group, which has landed.)
  const float scale_log2 = params.scale_log2 * (kv.k_scale != nullptr ? s_scales[0] : 1.f) * q_factor_inverse;
  const float value_scale = kv.v_scale != nullptr ? s_scales[1] : 1.f;

  // The walk (the ring's protocol is described above the first loads).
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
    const int token0 = s_slice_token[warp][stage];
    const unsigned slice_rows = s_slice_rows[warp][stage];

    // S = Q K^T: 16 heads x 16 keys.
    float acc_s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    if constexpr (Smem::kFp8) {
      // Keys group and group + 8, head dims kQuarter * tig + [0, kQuarter): 16-byte words of the
      // landed slice (its chunks swizzled by row, so the 8 rows a quarter warp reads sit in different banks).
      uint4 key_words[2][kQuarter / 16];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < kQuarter / 16; ++c)
          key_words[r][c] =
              *reinterpret_cast<const uint4*>(landed + swizzle_fp8<kHeadDimPad>(group + 8 * r, kQuarter * tig + 16 * c));
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t q[4];
        if constexpr (kQueryInRegisters) {
#pragma unroll
          for (int e = 0; e < 4; ++e) q[e] = q_frag[ks][e];
        } else {
          const uint4 q4 = reinterpret_cast<const uint4*>(s_q)[ks * 32 + lane];
          q[0] = q4.x, q[1] = q4.y, q[2] = q4.z, q[3] = q4.w;
        }
        uint32_t b[4];
        fp8_pairs_to_half2<Cache>(reinterpret_cast<const uint32_t*>(&key_words[0][ks / 4])[ks % 4], b[0], b[1]);
        fp8_pairs_to_half2<Cache>(reinterpret_cast<const uint32_t*>(&key_words[1][ks / 4])[ks % 4], b[2], b[3]);
        ptx::mma_16816<Compute>(acc_s[0], q, b[0], b[1]);
        ptx::mma_16816<Compute>(acc_s[1], q, b[2], b[3]);
      }
    } else {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t b[4];
        ptx::ldmatrix_x4(b, k_slice + swizzle<kHeadDimPad>((lane & 7) + (lane >> 4) * 8, ks * 16 + ((lane >> 3) & 1) * 8));
        ptx::mma_16816<Compute>(acc_s[0], q_frag[ks], b[0], b[1]);
        ptx::mma_16816<Compute>(acc_s[1], q_frag[ks], b[2], b[3]);
      }
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
    a[0] = ptx::pack2<Compute>(acc_s[0][0], acc_s[0][1]);
    a[1] = ptx::pack2<Compute>(acc_s[0][2], acc_s[0][3]);
    a[2] = ptx::pack2<Compute>(acc_s[1][0], acc_s[1][1]);
    a[3] = ptx::pack2<Compute>(acc_s[1][2], acc_s[1][3]);
    if constexpr (Smem::kFp8) {
      // Per 32-dim span: a word of key rows 2 tig, 2 tig + 1, 2 tig + 8 and 2 tig + 9 (dims 4 group +
      // 0..3), byte-permuted into (key, key + 1) pairs, one per dim tile 4 span + 0..3.
      const unsigned char* landed_v = landed + Smem::kSliceBytes;
#pragma unroll
      for (int span = 0; span < kHeadDimPad / 32; ++span) {
        const int col = 32 * span + 4 * group;
        uint32_t w[4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
          w[r] = *reinterpret_cast<const uint32_t*>(landed_v + swizzle_fp8<kHeadDimPad>(2 * tig + (r & 1) + 8 * (r >> 1), col));
        // b[i][0]: keys 2 tig, 2 tig + 1 of dim tile 4 span + i; b[i][1]: keys 2 tig + 8, 2 tig + 9
        uint32_t b[4][2];
        fp8_pairs_to_half2<Cache>(__byte_perm(w[0], w[1], 0x5140), b[0][0], b[1][0]);
        fp8_pairs_to_half2<Cache>(__byte_perm(w[2], w[3], 0x5140), b[0][1], b[1][1]);
        fp8_pairs_to_half2<Cache>(__byte_perm(w[0], w[1], 0x7362), b[2][0], b[3][0]);
        fp8_pairs_to_half2<Cache>(__byte_perm(w[2], w[3], 0x7362), b[2][1], b[3][1]);
#pragma unroll
        for (int i = 0; i < 4; ++i) ptx::mma_16816<Compute>(acc_o[4 * span + i], a, b[i][0], b[i][1]);
      }
    } else {
#pragma unroll
      for (int nd = 0; nd < kDimTiles / 2; ++nd) {
        uint32_t b[4];
        ptx::ldmatrix_x4_trans(b, v_slice + swizzle<kHeadDimPad>((lane & 7) + ((lane >> 3) & 1) * 8, nd * 16 + (lane >> 4) * 8));
        ptx::mma_16816<Compute>(acc_o[2 * nd], a, b[0], b[1]);
        ptx::mma_16816<Compute>(acc_o[2 * nd + 1], a, b[2], b[3]);
      }
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
  constexpr int kORow = Smem::kMergeRowFloats;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (group + 8 * r >= num_rows) continue;  // only the CTA's real heads
    float* dst = s_o + (warp * kDecodeHeadsPerCta + group + 8 * r) * kORow;
    if constexpr (Smem::kFp8) {
      // O column n of dim tile d is head dim fp8_value_dim(d, n): dims 32 span + 4 n + (0..3) are dim
      // tiles 4 span + (0..3), one 16-byte store.
#pragma unroll
      for (int span = 0; span < kDimTiles / 4; ++span)
#pragma unroll
        for (int k = 0; k < 2; ++k)
          *reinterpret_cast<float4*>(dst + fp8_value_dim<kHeadDimPad>(4 * span, 2 * tig + k)) =
              make_float4(acc_o[4 * span][2 * r + k], acc_o[4 * span + 1][2 * r + k], acc_o[4 * span + 2][2 * r + k],
                          acc_o[4 * span + 3][2 * r + k]);
    } else {
#pragma unroll
      for (int d = 0; d < kDimTiles; ++d)
        *reinterpret_cast<float2*>(dst + d * 8 + tig * 2) = make_float2(acc_o[d][2 * r], acc_o[d][2 * r + 1]);
    }
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
      for (int w = 0; w < kDecodeWarps; ++w) acc += weight[w] * s_o[(w * kDecodeHeadsPerCta + row) * kORow + col + e];
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
    } else if (params.cluster_merge) {
      // In place of warp 0's columns, which only this thread reads: the cluster's merge reads them.
      float* dst = s_o + row * kORow + col;
      *reinterpret_cast<float4*>(dst) = make_float4(o[0], o[1], o[2], o[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(o[4], o[5], o[6], o[7]);
      if (col == 0) s_split_lse[row] = lse;
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * params.num_q_heads + head) * params.num_splits + split;
      float4* dst = reinterpret_cast<float4*>(params.partial_out + part * head_size + col);
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (col == 0) params.partial_lse[part] = lse;
    }
  }
  if (params.cluster_merge) merge_cluster_splits<Element, kORow>(params, s_o, s_split_lse, seq, first_head, num_rows);
}

// Combines the splits of each (sequence, q head): out = sum_s exp(lse_s - lse*) O_s / sum_s exp(...).
// Launched as a programmatic dependent of the decode kernel (sm_90): its CTAs are resident before the
// decode grid ends and wait here for it, so the launch gap leaves the critical path of a small decode.
// Each thread combines its head dims on its own: it loads kMergeChunk splits' lse and partial O at
// once (one round trip to the L2 up to that many splits; no shared memory, shuffles or barrier),
// with a running maximum across chunks.
constexpr int kMergeThreads = 128;
constexpr int kMergeChunk = 32;
template <typename Element>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(const DecodeParams params) {
  const int seq = blockIdx.x / params.num_q_heads;
  const int head = blockIdx.x % params.num_q_heads;
  const int64_t part0 = static_cast<int64_t>(blockIdx.x) * params.num_splits;
  const int num_splits = params.num_splits, head_size = params.head_size;
  Element* out = static_cast<Element*>(params.out) + seq * params.out_row_stride + head * params.out_head_stride;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // A next decode on the stream (launched the same way) may be placed now; it waits for this grid.
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  // Each thread merges its head dims (SplitMerge); O comes from a pointer stepped by head_size (a
  // 64-bit index per split was ~12 SASS instructions).
  const float* split_lse = params.partial_lse + part0;
  for (int d = threadIdx.x; d < head_size; d += kMergeThreads) {
    SplitMerge<1> merge;
    const float* split_out = params.partial_out + part0 * head_size + d;
    for (int s0 = 0; s0 < num_splits; s0 += kMergeChunk, split_out += kMergeChunk * head_size) {
      float lse[kMergeChunk], o[kMergeChunk][1];
#pragma unroll
      for (int i = 0; i < kMergeChunk; ++i) {
        const bool split = s0 + i < num_splits;
        lse[i] = split ? split_lse[s0 + i] : -INFINITY;
        o[i][0] = split ? split_out[i * head_size] : 0.f;
      }
      merge.add(lse, o);
    }
    out[d] = static_cast<Element>(merge.acc[0] * merge.inverse());
    if (d == 0 && params.lse != nullptr)
      params.lse[static_cast<int64_t>(head) * params.num_seqs + seq] = merge.lse();
  }
}

// The decode kernel built for its usual occupancy (decode_min_ctas_per_sm), or with the registers of
// kDecodeRoomyCtasPerSm CTAs an SM (decode_has_roomy_build).
template <typename Element, int kHeadDimPad, typename Cache, bool kRoomy = false>
constexpr auto decode_kernel =
    decode_sm80_kernel<Element, kHeadDimPad, Cache,
                       kRoomy ? kDecodeRoomyCtasPerSm : decode_min_ctas_per_sm<kHeadDimPad, Cache>()>;

// Properties of a kernel that depend on the code the driver loaded for a device, computed once per
// device (stored + 1; 0: not asked yet).
constexpr int kMaxDevices = 64;
template <typename Compute>
int once_per_device(std::atomic<int> (&cache)[kMaxDevices], Compute compute) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  if (device >= kMaxDevices) return compute();
  int stored = cache[device].load(std::memory_order_relaxed);
  if (stored == 0) {
    stored = compute() + 1;
    cache[device].store(stored, std::memory_order_relaxed);
  }
  return stored - 1;
}

// Whether the decode kernel's code on the current device was compiled for sm_90 or newer: only then
// does it hold the griddepcontrol steps that a programmatic dependent launch relies on (and the cluster
// merge's); a kernel JIT-compiled from older PTX (e.g. built for "8.0+PTX" and run on an H100) has them
// compiled out, and launched as a programmatic dependent it could read its inputs early.
template <typename Element, int kHeadDimPad, typename Cache>
bool decode_has_sm90_steps() {
  static std::atomic<int> cache[kMaxDevices];
  return once_per_device(cache, [] {
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, decode_kernel<Element, kHeadDimPad, Cache>) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return attributes.ptxVersion >= 90 ? 1 : 0;
  }) != 0;
}

template <typename Element, int kHeadDimPad, typename Cache, bool kRoomy>
int decode_kernel_ctas_per_sm() {
  static const int ctas = [] {
    constexpr int kSmemBytes = DecodeSmem<Element, kHeadDimPad, Cache>::kBytes;
    auto kernel = decode_kernel<Element, kHeadDimPad, Cache, kRoomy>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kDecodeThreads, kSmemBytes) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 1;
    }
    return n > 0 ? n : 1;
  }();
  return ctas;
}
template <typename Element, int kHeadDimPad, typename Cache>
int decode_sm80_ctas_per_sm() {
  return decode_kernel_ctas_per_sm<Element, kHeadDimPad, Cache, false>();
}
template <typename Element, int kHeadDimPad, typename Cache>
int decode_sm80_small_grid_ctas_per_sm() {
  if constexpr (decode_has_roomy_build<kHeadDimPad, Cache>())
    return decode_kernel_ctas_per_sm<Element, kHeadDimPad, Cache, true>();
  else
    return 0;
}

// The launch attribute that makes the `splits` CTAs of a group (along grid x) one thread-block cluster.
inline cudaLaunchAttribute split_cluster_attribute(int splits) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = splits;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  return attribute;
}

// The most splits (2..kMaxClusterSplits) that one thread-block cluster of this instantiation can hold
// on the current device, so that they merge on chip (DecodeParams::cluster_merge); 0 where clusters
// cannot run: below sm_90, or a kernel built from PTX older than sm_90's (its cluster steps compile to
// traps), or not even 2 CTAs fit a cluster. Asked once per device; sizes above 8 are non-portable
// (H100 / H200 take 16 when a GPC holds 16 of the CTAs; launch_decode_sm80 allows them per launch).
template <typename Element, int kHeadDimPad, typename Cache>
int decode_sm80_max_cluster_splits() {
  static std::atomic<int> cache[kMaxDevices];
  return once_per_device(cache, [] {
    if (!decode_has_sm90_steps<Element, kHeadDimPad, Cache>()) return 0;
    constexpr int kSmemBytes = DecodeSmem<Element, kHeadDimPad, Cache>::kBytes;
    // A grid of clusters fits one CTA an SM (choose_decode_cluster_merge), so it runs the roomy build
    // where there is one (launch_decode_sm80).
    auto kernel = decode_kernel<Element, kHeadDimPad, Cache, decode_has_roomy_build<kHeadDimPad, Cache>()>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
      (void)cudaGetLastError();
    for (int splits = kMaxClusterSplits; splits >= 2; --splits) {
      cudaLaunchAttribute attribute = split_cluster_attribute(splits);
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(splits);
      config.blockDim = dim3(kDecodeThreads);
      config.dynamicSmemBytes = kSmemBytes;
      config.attrs = &attribute;
      config.numAttrs = 1;
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      if (clusters > 0) return splits;
    }
    return 0;
  });
}

template <typename Element, int kHeadDimPad, typename Cache>
void launch_decode_sm80(const DecodeParams& params, cudaStream_t stream) {
  constexpr int kSmemBytes = DecodeSmem<Element, kHeadDimPad, Cache>::kBytes;
  const dim3 grid(params.num_splits, params.num_kv_heads * params.head_chunks, params.num_seqs);
  auto kernel = decode_kernel<Element, kHeadDimPad, Cache>;
  if constexpr (decode_has_roomy_build<kHeadDimPad, Cache>()) {
    if (params.small_grid_build) kernel = decode_kernel<Element, kHeadDimPad, Cache, true>;
  }
  // Always: the 48 KB default counts the kernel's static shared memory too, so a dynamic size just
  // under it can still fail to launch (seen with 32-key tiles and 2 stages: exactly 48 KB dynamic).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  // Clusters above 8 CTAs are non-portable: allowed per device, so per launch like the size above.
  if (params.cluster_merge && params.num_splits > 8)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  // Both kernels as programmatic dependents of the kernel before them on the stream (sm_90; each waits
  // for it before its first global read): their CTAs are placed while it finishes, which takes the
  // launch gaps off a small decode's path.
  cudaLaunchAttribute attributes[2] = {};
  int num_attributes = 0;
  const bool programmatic = decode_has_sm90_steps<Element, kHeadDimPad, Cache>();
  if (programmatic) {
    attributes[num_attributes].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[num_attributes++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (params.cluster_merge) attributes[num_attributes++] = split_cluster_attribute(params.num_splits);
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kDecodeThreads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = num_attributes;
  cudaLaunchKernelEx(&config, kernel, params);
  if (params.num_splits > 1 && !params.cluster_merge) {
    config.numAttrs = programmatic ? 1 : 0;  // the programmatic launch only
    // The merge asks for the decode kernel's split of L1 and shared memory: an SM whose split differs
    // from a resident CTA's cannot take the merge's CTAs until it drains, which would undo the early
    // placement (and the next decode's after the merge).
    static const bool carveout_set = [] {
      cudaFuncSetAttribute(decode_merge_kernel<Element>, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared);
      (void)cudaGetLastError();
      return true;
    }();
    (void)carveout_set;
    config.gridDim = dim3(params.num_seqs * params.num_q_heads);
    config.blockDim = dim3(kMergeThreads);
    config.dynamicSmemBytes = 0;
    cudaLaunchKernelEx(&config, decode_merge_kernel<Element>, params);
  }
}

}  // namespace blocksparse_attn
