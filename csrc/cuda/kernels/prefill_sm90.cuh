// Block-sparse flash-attention forward for Hopper (sm_90a): wgmma on warp-group tiles, a producer
// warp group that feeds a shared-memory ring completed on mbarriers, two consumer warp groups.
//
// Work unit = one (sequence, 128-row query tile, q head) of the plan kernel's list, or with packed
// heads (PrefillParams::pack_gqa_shift) one (sequence, tile of 128 / G tokens, kv head) whose rows
// are the tokens times the kv group's G q heads; the grid is
// persistent (one CTA per SM) and each CTA's producer claims units from a counter. Warp group 0
// (over contiguous K/V, one warp of it: BSA_SM90_PRODUCER_WARPS) brings Q and the K/V tiles:
// through the TMA for Q and whole tiles of contiguous K/V or of pages in the model's dtype, with
// cp.async for a sequence's last partial tile (zero-filled past the sequence, so unwritten cache
// slots never reach P.V), and through registers for fp8 pages (widened on the way); warp groups 1
// and 2 each own 64 query rows. Sparse blocks are
// multiples of 64 tokens, so each consumer's rows lie in one query block: the producer walks the
// union of the two blocks' visible key tiles and tells each consumer, per stage, whether it sees the
// tile and whether it needs the element mask.
//
// Per stage and consumer: S = Q K^T (wgmma, both operands in shared memory, K-major), online softmax
// in registers, O += P V (wgmma, P from registers in the accumulator layout, V MN-major); the P.V
// of one tile overlaps the softmax of the next. With 128-key fills the two groups issue their
// products in turns (sm90_turns), so one group's softmax overlaps the other's products.
// Torch-free: compiled by bare nvcc in CI. Built only for sm_90a; other targets compile a stub.
// Why it looks the way it does (each step measured): benchmarks/RESULTS.md, "Hopper prefill: how
// the kernel got here". Shapes and shared-memory layout: prefill_sm90_tiling.cuh; the host side (TMA
// maps, launch): cuda/launch_prefill_sm90.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/pattern.h"
#include "cuda/kernels/kv_tile.cuh"
#include "cuda/kernels/params.h"
#include "cuda/kernels/prefill_common.cuh"
#include "cuda/kernels/prefill_sm90_tiling.cuh"
#include "cuda/kernels/prefill_sm90_trace.cuh"
#include "cuda/kernels/ptx_sm90.cuh"
#include "cuda/kernels/softmax.cuh"

namespace blocksparse_attn {

// The shared-memory pieces both sides address (Sm90Smem's layout), from the 1024-byte aligned base.
template <int kHeadDim, typename Tiling>
struct Sm90Shared {
  using Smem = Sm90Smem<kHeadDim, Tiling>;
  using StageRecord = Sm90StageRecord<Tiling::kTilesPerStage>;
  unsigned char* smem;
  uint64_t* full;         // [key slots]: a fill's K, V, record and Q have landed
  uint64_t* value_empty;  // [value slots]: freed after P.V (with shared stages: the whole stage)
  uint64_t* key_empty;    // [key slots]: freed once S is done (split rings only)
  uint64_t* q_empty;      // [Q buffers]
  uint64_t* value_full;   // [value slots]: a fill's values have landed (sm90_value_barriers)
  int32_t* claimed;       // the producer's claimed units (two slots)
  // The producer resolves each unit (a chain of dependent global loads) and leaves it next to the
  // unit's Q buffer, published with the unit's first fill: the consumers start without the loads.
  PrefillItem* items;  // [Q buffers]
  StageRecord* records;  // [key slots]

  __device__ explicit Sm90Shared(unsigned char* base)
      : smem(base),
        full(reinterpret_cast<uint64_t*>(base + Smem::kBarrierOffset)),
        value_empty(full + Tiling::kKeySlots),
        key_empty(value_empty + Tiling::kValueSlots),
        q_empty(key_empty + Smem::kKeyEmptyBarriers),
        value_full(q_empty + Tiling::kQBuffers),
        claimed(reinterpret_cast<int32_t*>(base + Smem::kClaimOffset)),
        items(reinterpret_cast<PrefillItem*>(base + Smem::kItemOffset)),
        records(reinterpret_cast<StageRecord*>(base + Smem::kRecordOffset)) {}
};

// Packed heads (PrefillParams::pack_gqa_shift) run with 64-key fills only (the host sees to it): in
// the 128-key shape the shift is the constant 0, and that kernel's code is what it was without them
// (with the run-time shift ptxas spilled more in it: 80 B against 64).
template <typename Tiling>
__device__ __forceinline__ int sm90_pack_shift(const PrefillParams& params) {
  return Tiling::kTilesPerStage == 1 ? params.pack_gqa_shift : 0;
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The tensor-core operand type: the model's, but fp16 over fp8 pages (e4m3 and e5m2 widen to fp16
// exactly in one instruction a pair, to bf16 in four: the widening was most of the fp8 producer's
// work). A bf16 model's Q is then scaled into fp16's range by the consumers (sm90_query_to_fp16).
template <typename Element, typename Cache>
using Sm90Compute = std::conditional_t<CacheFormat<Cache>::kFp8, __half, Element>;

// Build knob BSA_SM90_PAGED_BOX_WARPS (default 1): paged TMA fills issue their pages' boxes from all four producer
// warps (box b from lane b / 4 of warp b % 4, each issuing lane expecting its own boxes' bytes)
// instead of lanes of the first warp, whose box issues queue behind each other (the TMA instruction
// takes uniform registers: one lane at a time) while warps 1-3 wait for it at the next unit's claim.
// On by default since the eighteenth session (H100, kv block 16, medians of 2 rounds against the
// first warp's lanes): paged/varlen 8k x 4 1.36 -> 1.23x, 32k 1.22 -> 1.12x, chunks 1.21 -> 1.10x.
#ifndef BSA_SM90_PAGED_BOX_WARPS
#define BSA_SM90_PAGED_BOX_WARPS 1
#endif

// Build knob BSA_SM90_PAGED_PAIRS (default 1; 0: the four producer warps issue every fill together):
// 128-key fills over TMA pages in the model's dtype (with Q through the TMA) are issued by two pairs
// of producer warps in turn, warps 0-1 the even fills and 2-3 the odd ones, each pair's lanes one box
// of the fill, so that one pair walks and looks up its next fill while the other's boxes go out. The
// traces (H100, 2k chunks of 8k x 4 at kv block 16, 2026-12-07) had the four warps take ~720 cycles a
// fill from their slots' release to their page ids with no box in flight, then ~1,570 to issue their
// boxes: the fills came every ~3,500 cycles against ~3,260 over contiguous K/V, and both consumer
// groups waited for each fill and took their turns together (81 % of fills, 8 % at kv block 32).
// Nsight Compute cycles (H100, 2 rounds, with BSA_SM90_PAGED_FILL_BOXES=3 under both; predicted: the
// chunks about as fast as kv block 32's, 1.04x contiguous): paged 2k chunks at kv block 16 -4.4 %
// (794,724 -> 759,494; 1.036x the contiguous chunks' 733,088), whole 8k x 4 prompts -4.1 %; wall time
// chunk / contiguous chunk 1.09 -> 1.05 at 8k x 4 and 1.13 -> 1.05 at 32k x 1. A pair's cp.async
// fills (a sequence's last partial tile) are copied by its 64 threads and published at the top of its
// next fill; each fill barrier counts the 64 arrivals of its pair.
#ifndef BSA_SM90_PAGED_PAIRS
#define BSA_SM90_PAGED_PAIRS 1
#endif
// Whether this instantiation can pair its warps (compile time), and whether this launch does.
template <typename Tiling, typename Cache, int kProducerThreads>
__host__ __device__ constexpr bool sm90_may_pair() {
  return BSA_SM90_PAGED_PAIRS && BSA_SM90_PAGED_BOX_WARPS && BSA_SM90_PAGED_FILL_BOXES >= 1 &&
         Tiling::kTilesPerStage == 2 && kProducerThreads == 128 && !CacheFormat<Cache>::kFp8;
}
template <typename Tiling, typename Cache, int kProducerThreads>
__device__ __forceinline__ bool sm90_paged_pairs(const PrefillParams& params, const Sm90TensorMaps& maps) {
  return sm90_may_pair<Tiling, Cache, kProducerThreads>() && params.kv.paged() && maps.kv_enabled &&
         maps.query_enabled;
}

// Warp group 0: claims work units, resolves them, and streams each unit's Q and visible K/V tiles
// through the ring, with one stage record per fill. kPagesAhead: a paged cache in the model's dtype
// through the TMA with 64-key fills, whose boxes' page ids are looked up a fill ahead (its own
// instantiation, so that contiguous K/V run the code they ran without it: a run-time switch cost
// them 2.7 %).
template <typename Element, int kHeadDim, typename Tiling, typename Cache, bool kPagesAhead, int kProducerThreads>
__device__ __forceinline__ void sm90_producer(const PrefillParams& params, const Sm90TensorMaps& maps,
                                              const Sm90Shared<kHeadDim, Tiling>& shared) {
  using Smem = Sm90Smem<kHeadDim, Tiling>;
  constexpr int kKeySlots = Tiling::kKeySlots;
  constexpr int kValueSlots = Tiling::kValueSlots;
  constexpr int kSlots = Tiling::kTilesPerStage;
  const int tid = threadIdx.x;
  const int head_size = params.head_size;
  const KeyValueSource& kv = params.kv;
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowStep = kProducerThreads / kChunksPerRow;
  const int chunk = tid % kChunksPerRow, col = chunk * 8;
  const int row0 = tid / kChunksPerRow;
  const bool col_valid = col < head_size;
  const Element* q = static_cast<const Element*>(params.q);
  const SparsePattern& pattern = params.pattern;
  // fp8 pages (the paged cache only) come through registers: thread t takes half of key row t / 2
  // of a tile, the 16-byte chunks 2 j + t % 2 (j < kFp8Chunks; a lane pair reads 32 contiguous bytes),
  // so it looks up one page id and works out one address a fill (with a 16-byte chunk of 4 rows, a
  // thread made 4 lookups and addresses: chunk e4m3 8k 0.78 -> 0.74 ms on the H200).
  constexpr bool kFp8Pages = CacheFormat<Cache>::kFp8;
  static_assert(!kFp8Pages || (kSlots == 1 && kProducerThreads == 128), "fp8 pages take 64-key fills, 128 threads");
  constexpr int kFp8Chunks = kHeadDim / 32;
  const int fp8_row = tid / 2, fp8_col0 = (tid % 2) * 16;
  static_assert(!kPagesAhead || (kSlots == 1 && !kFp8Pages), "page ids ahead: TMA pages with 64-key fills");
  // Paged TMA fills: box b of a tile, rows box_row .. box_row + rows - 1 (by column block: of column
  // block box_block), is issued by lane b / W of warp b % W, W the producer's warps (4;
  // BSA_SM90_PAGED_BOX_WARPS=0: lane b of the first warp); box_row >= 64: no box. At most 8 boxes
  // (pages of 16 rows or more, 2 column blocks); kFillBoxes: 16 over the fill's two tiles, box_row
  // >= 128 none.
  // A shift, not a division by the column blocks a box takes (1 or 2).
  constexpr int kProducerWarps = kProducerThreads / 32;
  constexpr bool kBoxWarps = BSA_SM90_PAGED_BOX_WARPS && kProducerWarps >= 2;
  // BSA_SM90_PAGED_FILL_BOXES: 128-key fills number their boxes over the whole fill (box_row = 64 slot
  // + the row in the tile), so that each lane holds one box of the fill, looks its page id up with
  // the other lanes of its warp in one load at the top of the fill, and its boxes are spread over
  // the warps (page blocks of 64: the two tiles' boxes from two warps, not both from the first).
  constexpr bool kFillBoxes = BSA_SM90_PAGED_FILL_BOXES >= 1 && kSlots > 1 && kBoxWarps && !kFp8Pages;
  // BSA_SM90_PAGED_FILL_BOXES=2: thread 0 expects each tile's bytes, as over contiguous K/V, and the box
  // lanes only issue. A box landing before the expectation takes the tx-count below zero, within its
  // signed range (-(2^20 - 1) to 2^20 - 1, recalled from the PTX ISA's mbarrier contents; the paged
  // tests, racecheck and synccheck passed on an H100); thread 0's arrival, after its expectation,
  // still holds the phase open.
  constexpr bool kFillExpect = BSA_SM90_PAGED_FILL_BOXES >= 2 && kFillBoxes;
  // BSA_SM90_PAGED_FILL_BOXES=3 (the default): each box lane issues its box once a fill, after the
  // fill's tiles (one pass with both tiles' box lanes, not one pass a tile in which half of them idle).
  constexpr bool kBoxPass = BSA_SM90_PAGED_FILL_BOXES == 3 && kFillBoxes;
  static_assert(!kFillBoxes || kSlots == 2, "fill boxes: two tiles a fill");
  const int box_shift = maps.kv_row_groups || kHeadDim == 64 ? 0 : 1;
  // sm90_paged_pairs: fill n comes from warps 2 (n % 2) and 2 (n % 2) + 1, box b from lane b / 2 of
  // the pair's warp b % 2; fill_leader is the pair's first thread (thread 0 without pairs), which
  // expects the fill's bytes and writes its record, its unit's item and issues its unit's Q.
  const bool pairs = sm90_paged_pairs<Tiling, Cache, kProducerThreads>(params, maps);
  const int pair = tid >> 6;
  const int box_warps = pairs ? 2 : kProducerWarps;
  const int box =
      kBoxWarps ? ((tid & 31) < (kFillBoxes ? 16 : 8) / box_warps ? ((tid >> 5) & (box_warps - 1)) + box_warps * (tid & 31) : 64)
                : tid;
  const int box_row = box < 32 ? (box >> box_shift) * maps.kv_page_rows : 64 * (kFillBoxes ? kSlots : 1);
  const int box_block = box & ((1 << box_shift) - 1);

  // Fill n is published (fence for the wgmma reads, then arrive) at the top of fill n + L, BEFORE
  // the wait for free slots: publication never waits on the consumers, so a consumer never idles
  // on a fill that has landed (publishing after that wait cost 30 % with the overlapped consumer).
  // A fill without cp.async copies (TMA only, or an end record) is published as soon as it is
  // issued: the TMA's bytes complete on the barrier by themselves. `early` marks such fills (bit
  // fill % kKeySlots, see Sm90TilingShape) so the in-order publication skips them.
  int n = 0, next_publish = pairs ? pair : 0;
  const int publish_step = pairs ? 2 : 1;  // a pair publishes its own fills
  auto owns = [&](int fill) { return !pairs || (fill & 1) == pair; };
  auto leader_of = [&](int fill) { return pairs ? 64 * (fill & 1) : 0; };
  int fill_leader = 0;  // leader_of(the fill being issued)
  uint32_t early = 0;
  auto publish = [&](int fill) {
    const uint32_t bit = 1u << (fill % kKeySlots);
    if (early & bit) {
      early &= ~bit;
      return;
    }
    ptx::fence_proxy_async_shared();
    ptx::mbarrier_arrive(&shared.full[fill % kKeySlots]);
  };
  // Waits for the slots fill n writes (an end record's too): its key slot (split rings) and its value
  // slot, before fill n is published, so before any group can release them again: no wait sees two
  // phases pass, and no group's release joins the other group's phase (scripts/sm90_protocol_model.py
  // checks both).
  auto begin_fill = [&] {
    if (pairs) {  // the pair's previous fill, n - 2, at the top of this one: its copies are the last pending
      if (n - 2 >= next_publish) {
        ptx::cp_async_wait<0>();
        publish(next_publish);
        next_publish += 2;
      }
    } else if (n - Tiling::kLoadsInFlight >= next_publish) {
      ptx::cp_async_wait<Tiling::kLoadsInFlight - 1>();  // fills up to n - kLoadsInFlight have landed
      publish(next_publish++);
    }
    const Sm90Fill fill = Tiling::fill(n);
    sm90_trace(n, kTraceSlotWait + tid / 32);
    if constexpr (Tiling::kSplitRings) {
      if (n >= kKeySlots) ptx::mbarrier_wait(&shared.key_empty[fill.key_slot], ((n / kKeySlots) + 1) & 1);
    }
    if (n >= kValueSlots) ptx::mbarrier_wait(&shared.value_empty[fill.value_slot], ((n / kValueSlots) + 1) & 1);
    sm90_trace(n, kTraceSlotFree + tid / 32);
    return fill;
  };

  // Claims run two units ahead and plan items one ahead: thread 0 claims unit k + 2 when unit k
  // starts and stores it for the other producer threads when unit k + 1 starts, and every warp
  // loads unit k + 1's plan item when unit k starts. The atomic's latency and the item's then pass
  // while the producer issues unit k's fills; short prompts' units (1-8 fills) waited for both in
  // every unit (ncu, 256 x 128 tokens: the item's loads and the claim were a quarter of the
  // producer's time, and the producer set the pace). A unit ahead is one register a thread, lane j
  // holding word j (unit_word), shuffled out when the unit starts: loaded whole, the item went to
  // uniform registers right at the load, which waited for it (SASS), and three registers more
  // made the producer spill.
  const int pack_shift = sm90_pack_shift<Tiling>(params);
  // This lane's word of a unit looked up ahead: lanes 0-5 the plan item's words that are used,
  // lane 6 the unit, lane 7 its anchor (-1 past the list).
  constexpr int kItemWords = 6, kUnitWord = 6, kAnchorWord = 7;
  static_assert(offsetof(PlanItem, k_len) == (kItemWords - 1) * sizeof(int32_t), "PlanItem's used words lead");
  const int lane = tid % 32;
  auto unit_word = [&](int unit) {
    const int anchor = plan_item_anchor(params, unit);
    int word = lane == kUnitWord ? unit : anchor < *params.num_tiles ? anchor : -1;
    if (lane < kItemWords && anchor < params.max_items)  // past num_tiles: a word that is never used
      word = reinterpret_cast<const int32_t*>(params.items + anchor)[lane];
    return word;
  };
  int claim_ahead = 0;  // thread 0: the claim of unit k + 2 while unit k is issued
  if (tid == 0) {
    shared.claimed[0] = atomicAdd(params.work_counter, 1);
    claim_ahead = atomicAdd(params.work_counter, 1);
  }
  ptx::named_barrier_sync(kSm90ClaimBarrier, kProducerThreads);
  int next_word = unit_word(shared.claimed[0]);
  int first_fill_back1 = 0, first_fill_back2 = 0;  // the first fills of units k - 1 and k - 2 (kQBuffers <= 3)
  for (int k = 0;; ++k) {
    const int word = next_word;
    // Slot (k + 1) & 1 was last read at unit k - 2 (or before the loop), before every thread's
    // barrier of unit k - 1, which thread 0 has passed.
    if (tid == 0) shared.claimed[(k + 1) & 1] = claim_ahead;
    ptx::named_barrier_sync(kSm90ClaimBarrier, kProducerThreads);
    next_word = unit_word(shared.claimed[(k + 1) & 1]);
    if (tid == 0) claim_ahead = atomicAdd(params.work_counter, 1);
    const int unit = __shfl_sync(0xffffffffu, word, kUnitWord);
    const int anchor = __shfl_sync(0xffffffffu, word, kAnchorWord);
    PlanItem item;
    if (anchor >= 0) {
      int32_t* words = reinterpret_cast<int32_t*>(&item);
#pragma unroll
      for (int j = 0; j < kItemWords; ++j) words[j] = __shfl_sync(0xffffffffu, word, j);
    }
    PrefillItem it;
    if (anchor >= 0) resolve_prefill_item(params, kPrefillSm90BlockM >> pack_shift, pack_shift, unit, anchor, item, it);
    else {
      if (owns(n)) {
        const Sm90Fill fill = begin_fill();  // the last fill: a record without work
        if (tid == leader_of(n)) {
          shared.records[fill.key_slot].unit = -1;
          shared.records[fill.key_slot].key_tile[0] = -1;
          if constexpr (sm90_value_barriers<Tiling, kProducerThreads>()) ptx::mbarrier_arrive(&shared.value_full[fill.value_slot]);
        }
      }
      ptx::cp_async_wait<0>();
      for (; next_publish <= n; next_publish += publish_step) publish(next_publish);
      break;
    }
    const int seq = it.seq, head = it.head, kv_head = it.kv_head, k_begin = it.k_begin, k_len = it.k_len;
    const int tile_pos = it.tile_pos, valid_begin = it.valid_begin, valid_end = it.valid_end;

    // Q: 128 rows; rows outside [valid_begin, valid_end) are zeros (never stored). The loads join
    // the unit's first fill, whose publication covers them. The buffer was last read by unit
    // k - Tiling::kQBuffers, whose consumers release it only after all its fills, so those must
    // be published first: with one buffer that is every fill so far; with B > 1, the fills before
    // unit k - B + 1's first. Those are normally out already (L fills back), but not when unit k - 1
    // has fewer than L fills and unit k - 2's last one carries cp.async copies (units without
    // key tiles, Q through cp.async), so the wait below would never end.
    const int buf = k % Tiling::kQBuffers;
    if (k >= Tiling::kQBuffers) {
      const int needed = Tiling::kQBuffers == 1 ? n : (Tiling::kQBuffers == 2 ? first_fill_back1 : first_fill_back2);
      if (next_publish < needed) {
        ptx::cp_async_wait<0>();
        for (; next_publish < needed; next_publish += publish_step) publish(next_publish);
      }
      // With pairs only the pair that loads the unit's Q (and writes its item) waits: the other could
      // reach this wait after the consumers had freed the buffer a second time, and wait for a phase
      // that would not come (scripts/sm90_protocol_model.py, "paged pairs").
      if (owns(n)) ptx::mbarrier_wait(&shared.q_empty[buf], ((k / Tiling::kQBuffers) + 1) & 1);
    }
    first_fill_back2 = first_fill_back1;
    first_fill_back1 = n;
    if (tid == leader_of(n)) shared.items[buf] = it;  // by the leader of the unit's first fill
    // Through the TMA (one thread, issued with the unit's first fill below), Q rows outside the
    // item are other rows of the tensor or zeros: they only ever feed their own, unstored output
    // rows. The cp.async path zero-fills them.
    unsigned char* s_q_buf = shared.smem + Smem::kQOffset + buf * Smem::kQBufferBytes;
    if (!maps.query_enabled) {
#pragma unroll
      for (int row = row0; row < kPrefillSm90BlockM; row += kRowStep) {
        const int pos = tile_pos + (row >> sm90_pack_shift<Tiling>(params));
        const bool valid = pos >= valid_begin && pos < valid_end && col_valid;
        const int row_head = head + (row & ((1 << sm90_pack_shift<Tiling>(params)) - 1));
        const Element* src = valid ? q + static_cast<int64_t>(it.q_begin + pos - it.first_pos) * params.q_row_stride +
                                         row_head * params.q_head_stride + col
                                   : q;
        unsigned char* dst = s_q_buf + (row >> 6) * Smem::kQTileBytes + sm90_tile_offset<64>(row & 63, col);
        ptx::cp_async_16(dst, src, valid);
      }
    }

    // Page ids looked up one fill ahead, so that a fill's issue waits for no load after the wait for
    // its slots: fp8 pages (the page of this thread's row: a page-id load in front of each row's load
    // kept the producer waiting on two round trips a fill) and kPagesAhead's TMA boxes (the page of
    // this lane's box; H200, 8k x 4: paged kv block 64 1.74 -> 1.66 ms, kv block 16 2.03 -> 1.93).
    // -1 past k_len, for no tile and for lanes without a box.
    constexpr bool kLookAhead = kFp8Pages || kPagesAhead;
    constexpr bool kTilesAhead = kSlots > 1;  // 128-key fills: a whole fill's tiles walked ahead
    // The unit's last fill marked in its record (sm90_marks_last_fill) instead of followed by an end
    // record: the consumers issue its P.V on its own and the ring carries one fill less a unit. The
    // next tile is walked before the record is written, after the fill's loads.
    constexpr bool kMarksLast = sm90_marks_last_fill<Tiling, kProducerThreads>();
    static_assert(!kMarksLast || !kLookAhead, "the mark: contiguous K/V");
    constexpr bool kWalkAhead = kLookAhead || kMarksLast;
    const int32_t* table = kv.paged() ? kv.table_row(seq, kv_head) : nullptr;
    auto look_up_page = [&](int key_tile) {
      if constexpr (kFp8Pages) {
        const int pos = key_tile * 64 + fp8_row;
        return key_tile >= 0 && pos < k_len ? table[kv.page_index(pos)] : -1;
      } else {
        const int pos = key_tile * 64 + box_row;
        return key_tile >= 0 && box_row < 64 && pos < k_len ? table[kv.page_index(pos)] : -1;
      }
    };
    // fp8 pages: the next tile's rows, loaded into registers at the top of its fill, before the wait
    // for free slots (their latency passes while the producer waits); the fill converts them. Issued
    // next to the conversions instead, ptxas put each load in front of its own conversion: one
    // round trip a chunk, 1.6x slower with fp16 steps (ncu).
    uint4 stored_k[kFp8Chunks], stored_v[kFp8Chunks];
    auto load_fp8_rows = [&](int key_tile, int page) {
      const Cache* key = static_cast<const Cache*>(kv.key);
      const Cache* value = static_cast<const Cache*>(kv.value);
      const bool page_ok = key_tile >= 0 && page >= 0 && page < kv.num_cache_blocks;
      const int64_t offset = page_ok ? kv.page_offset(page, kv_head) +
                                           static_cast<int64_t>(kv.row_in_page(key_tile * 64 + fp8_row)) * head_size +
                                           fp8_col0
                                     : 0;
#pragma unroll
      for (int j = 0; j < kFp8Chunks; ++j) {
        const bool valid = page_ok && fp8_col0 + 32 * j < head_size;
        stored_k[j] = valid ? *reinterpret_cast<const uint4*>(key + offset + 32 * j) : make_uint4(0, 0, 0, 0);
        stored_v[j] = valid ? *reinterpret_cast<const uint4*>(value + offset + 32 * j) : make_uint4(0, 0, 0, 0);
      }
    };

    // K and V of one 64-key tile into tile `slot` of a fill; keys past k_len, bad page ids and
    // empty slots (key_tile < 0) read as zeros. True when it issued cp.async copies.
    auto tma_tile = [&](int key_tile) {
      return !CacheFormat<Cache>::kFp8 && maps.kv_enabled && key_tile >= 0 && key_tile * 64 + 64 <= k_len;
    };
    // sm90_value_barriers: contiguous values through the TMA complete on the value slot's own barrier,
    // issued after the fill's keys (load_values); cp.async copies stay on the fill's full barrier.
    constexpr bool kValueBarriers = sm90_value_barriers<Tiling, kProducerThreads>();
    const bool values_apart = kValueBarriers && !kv.paged();
    // The stage layout (fp8 pages never come through the TMA: by column block, known at compile time).
    const Sm90KvLayout layout = sm90_kv_layout<Tiling::kBlockN, kHeadDim>(!kFp8Pages && maps.kv_row_groups);
    // One whole tile of contiguous K and/or V (keys, values) from `token` into tile offset tile_dst of
    // the fill's slots, through the TMA, completing on `landed`; K and V of a column block together.
    auto tma_contiguous_tile = [&](const Sm90Fill& fill, int tile_dst, int token, uint64_t* landed, bool keys,
                                   bool values) {
      unsigned char* dst_k = shared.smem + Smem::kKOffset + fill.key_slot * Smem::kStageBytes;
      unsigned char* dst_v = shared.smem + Smem::kVOffset + fill.value_slot * Smem::kStageBytes;
      if (maps.kv_row_groups) {
        if (keys) ptx::tma_load_5d(dst_k + tile_dst, &maps.key, 0, token, 0, 0, kv_head, landed);
        if (values) ptx::tma_load_5d(dst_v + tile_dst, &maps.value, 0, token, 0, 0, kv_head, landed);
      } else {
#pragma unroll
        for (int block = 0; block < kHeadDim / 64; ++block) {
          const int dst = block * Smem::kStageColumnBlockBytes + tile_dst;
          if (keys) ptx::tma_load_3d(dst_k + dst, &maps.key, block * 64, kv_head, token, landed);
          if (values) ptx::tma_load_3d(dst_v + dst, &maps.value, block * 64, kv_head, token, landed);
        }
      }
    };
    // Pages: one box of kv_page_rows rows per page (and 64-column block, by column block), each issued
    // by its own lane (`box`: from one thread the box issues queued behind each other), with its page
    // id looked up a fill ahead (kPagesAhead), at the top of the fill (kFillBoxes) or here (one lookup
    // round trip for all lanes). A page id outside [0, NB) is a box outside the map: zeros. This
    // lane's box of tile `slot` of the fill (key tile key_tile, a whole TMA tile; the tile at offset
    // tile_dst of the slots); own_expect: the lane expects its box's bytes first.
    auto issue_page_box = [&](const Sm90Fill& fill, int slot, int tile_dst, int key_tile, int box_page,
                              bool own_expect) {
      unsigned char* dst_k = shared.smem + Smem::kKOffset + fill.key_slot * Smem::kStageBytes;
      unsigned char* dst_v = shared.smem + Smem::kVOffset + fill.value_slot * Smem::kStageBytes;
      uint64_t* const landed = &shared.full[fill.key_slot];
      const int tile_row = kFillBoxes ? box_row & 63 : box_row;
      const int pos = key_tile * 64 + tile_row;
      if (slot == 0) sm90_trace(n, kTraceLookupStart + tid / 32);
      const int page = kPagesAhead || kFillBoxes ? box_page : kv.table_row(seq, kv_head)[kv.page_index(pos)];
      if (slot == 0 && page != INT_MAX) sm90_trace(n, kTracePageKnown + tid / 32);  // waits for the id
      const int slab =
          page >= 0 && page < kv.num_cache_blocks ? page * maps.kv_page_heads + kv_head * (maps.kv_page_heads > 1) : -1;
      const int in_page = kv.row_in_page(pos);
      const int dst = tile_dst + sm90_kv_offset(layout, tile_row, box_block * 64);
      if (own_expect) {  // kv_page_rows rows of 128-byte column blocks: kHeadDim / 64 of them, or one
        const uint32_t box_bytes = maps.kv_page_rows * 128 * ((kHeadDim / 64) >> box_shift);
        ptx::mbarrier_expect_tx(landed, 2 * box_bytes);
      }
      if (maps.kv_row_groups) {
        ptx::tma_load_5d(dst_k + dst, &maps.key, 0, 0, 0, in_page >> 3, slab, landed);
        ptx::tma_load_5d(dst_v + dst, &maps.value, 0, 0, 0, in_page >> 3, slab, landed);
      } else {
        ptx::tma_load_3d(dst_k + dst, &maps.key, box_block * 64, in_page, slab, landed);
        ptx::tma_load_3d(dst_v + dst, &maps.value, box_block * 64, in_page, slab, landed);
      }
    };
    // box_page: this lane's page, looked up a fill ahead (kPagesAhead).
    auto load_kv = [&](int key_tile, const Sm90Fill& fill, int slot, int box_page) -> bool {
      const int pos0 = key_tile * 64;
      unsigned char* dst_k = shared.smem + Smem::kKOffset + fill.key_slot * Smem::kStageBytes;
      unsigned char* dst_v = shared.smem + Smem::kVOffset + fill.value_slot * Smem::kStageBytes;
      // Whole tiles come through the TMA (issued from the first warp; the copies complete on the fill's
      // full barrier): contiguous K/V and pages of a cache in the model's dtype. Rows past the
      // sequence's end would read the next sequence's keys or unwritten cache slots, which may hold
      // anything: the last partial tile and empty slots take the zero-filling copies.
      if (tma_tile(key_tile)) {
        // kBoxWarps: every lane with a box issues in the paged case, each expecting its own boxes'
        // bytes first (the fill's barrier counts every producer thread's arrival, made after this, so
        // it cannot complete between one warp's boxes and another's expectation); with kFillExpect,
        // thread 0 expects the tile's bytes for all of them and the other box lanes only issue
        // (kBoxPass: after the fill's tiles, issue_page_box below).
        const bool box_lanes = kBoxWarps && kv.paged();
        const bool own_expect = box_lanes && !kFillExpect;
        const bool has_box = !kBoxPass && (kFillBoxes ? box_row >> 6 == slot : box_row < 64);  // in this tile
        if (box_lanes ? has_box || (kFillExpect && tid == fill_leader) : tid < 32) {
          uint64_t* const landed = &shared.full[fill.key_slot];
          constexpr uint32_t kBoxBytes = 64 * 128;
          if (tid == fill_leader && !own_expect)
            ptx::mbarrier_expect_tx(landed, (values_apart ? 1 : 2) * (kHeadDim / 64) * kBoxBytes);
          const int tile_dst = sm90_kv_offset(layout, slot * 64, 0);
          if (!kv.paged()) {
            if (tid == 0) tma_contiguous_tile(fill, tile_dst, k_begin + pos0, landed, true, !values_apart);
          } else if (has_box) {
            issue_page_box(fill, slot, tile_dst, key_tile, box_page, own_expect);
          }
          if (slot == kSlots - 1) sm90_trace(n, kTraceBoxesIssued + tid / 32);
          if (slot == 0 && kSlots > 1) sm90_trace(n, kTraceFirstTileIssued + tid / 32);
        }
        return false;
      }
      auto stage_layout = [slot, &layout](int row, int c) { return sm90_kv_offset(layout, slot * 64 + row, c); };
      if constexpr (CacheFormat<Cache>::kFp8) {
        // fp8 pages: the rows load_fp8_rows loaded, converted and stored in the wgmma layout; the
        // fill is published with a proxy fence like a cp.async fill.
#pragma unroll
        for (int j = 0; j < kFp8Chunks; ++j) {
          const int col = fp8_col0 + 32 * j;
          uint4 elements[2];
          fp8_chunk_to_elements<Sm90Compute<Element, Cache>, Cache>(stored_k[j], elements);
          *reinterpret_cast<uint4*>(dst_k + stage_layout(fp8_row, col)) = elements[0];
          *reinterpret_cast<uint4*>(dst_k + stage_layout(fp8_row, col + 8)) = elements[1];
          fp8_chunk_to_elements<Sm90Compute<Element, Cache>, Cache>(stored_v[j], elements);
          *reinterpret_cast<uint4*>(dst_v + stage_layout(fp8_row, col)) = elements[0];
          *reinterpret_cast<uint4*>(dst_v + stage_layout(fp8_row, col + 8)) = elements[1];
        }
      } else {
        // In passes of at most 8 rows a thread: a one-warp producer (BSA_SM90_PRODUCER_WARPS) copies 32
        // rows a thread, and all 32 at once spilled it (232 bytes at 128 keys, ptxas).
        // The tile's 64 rows, kStep rows apart from first_row (the copying threads / kChunksPerRow).
        auto copy_tile = [&](auto step, int first_row) {
          constexpr int kStep = decltype(step)::value, kCopies = 64 / kStep, kPassCopies = kCopies < 8 ? kCopies : 8;
#pragma unroll 1
          for (int pass = 0; pass < kCopies / kPassCopies; ++pass)
            copy_kv_rows<Cache, kPassCopies, kStep>(kv, seq, kv_head, pos0, first_row + pass * kPassCopies * kStep, col,
                                                    k_len, head_size, key_tile >= 0, dst_k, dst_v, stage_layout);
        };
        if constexpr (sm90_may_pair<Tiling, Cache, kProducerThreads>()) {
          if (pairs) {  // the fill's pair alone: its 64 threads
            copy_tile(std::integral_constant<int, kRowStep / 2>{}, (tid & 63) / kChunksPerRow);
            return true;
          }
        }
        copy_tile(std::integral_constant<int, kRowStep>{}, row0);
      }
      return true;
    };
    // values_apart: the values of a fill's whole tiles (fill_tiles), after all of its keys, on the value
    // slot's barrier; thread 0 arrives on it for every fill (with no bytes for an end record or a
    // paged fill) so that its phases follow the fills.
    auto load_values = [&](const int (&key_tiles)[kSlots], const Sm90Fill& fill) {
      if (tid != 0) return;
      uint32_t bytes = 0;
#pragma unroll
      for (int slot = 0; slot < kSlots; ++slot)
        if (values_apart && tma_tile(key_tiles[slot])) bytes += kHeadDim / 64 * 64 * 128;
      uint64_t* const landed = &shared.value_full[fill.value_slot];
      ptx::mbarrier_arrive_expect_tx(landed, bytes);
      if (bytes == 0) return;
#pragma unroll
      for (int slot = 0; slot < kSlots; ++slot)
        if (tma_tile(key_tiles[slot]))
          tma_contiguous_tile(fill, sm90_kv_offset(layout, slot * 64, 0), k_begin + key_tiles[slot] * 64, landed, false,
                              true);
    };

    // Each consumer group's valid rows (absolute positions) and its query block's bit among the
    // walk's rows, computed once per unit: the per-tile test below is integer-division free (the
    // producer's instructions share the issue slots with the consumers').
    int group_lo[kSm90ConsumerGroups], group_hi[kSm90ConsumerGroups];
    unsigned group_row[kSm90ConsumerGroups];
#pragma unroll
    for (int g = 0; g < kSm90ConsumerGroups; ++g) {
      const int group_tokens = 64 >> sm90_pack_shift<Tiling>(params);
      group_lo[g] = max(valid_begin, tile_pos + group_tokens * g);
      group_hi[g] = min(valid_end, tile_pos + group_tokens * (g + 1)) - 1;
      group_row[g] = 1u << ((group_lo[g] >> pattern.block_shift) - (valid_begin >> pattern.block_shift));
    }
    // The 64-key tiles of the blocks the query blocks of this 128-row tile see (one or two: sparse
    // blocks are multiples of 64 tokens), identically in every producer thread.
    BlockKeyTiles<64, 2> tiles;
    // sm90_counts_tiles: where every causal block up to the unit's last row is visible, its key tiles
    // are 0, 1, ... up to its last key (valid_end - 1), and a group sees a tile unless the tile starts
    // past its last row: the walk's result without the walk (tests/cpp/key_tiles_check.cpp checks that
    // BlockKeyTiles gives those tiles there; the group holding the unit's last row sees each of them,
    // so none is skipped).
    const bool count_tiles = sm90_counts_tiles<Tiling, kProducerThreads>() &&
                             every_block_visible_up_to(pattern, (valid_end - 1) >> pattern.block_shift);
    int counted_tile = 0;
    const int last_counted_tile = (valid_end - 1) >> 6;
    // BSA_SM90_LANE_WALK: a parametric pattern's tiles 32 at a time, one a lane, in closed form;
    // an explicit layout's, and those of the producer that looks page ids up ahead, by the walk.
    const bool lane_walk = BSA_SM90_LANE_WALK && !kPagesAhead && !count_tiles && !pattern.has_layout();
    ClosedKeyTiles<64, 2> closed;
    const int first_row_block = valid_begin >> pattern.block_shift;
    const int last_row_block = (valid_end - 1) >> pattern.block_shift;
    if (lane_walk)
      closed.init(pattern, head, first_row_block, last_row_block, valid_end - 1);
    else
      tiles.init(pattern, head, first_row_block, last_row_block, valid_end - 1);
    // Each group's flags for key_tile, whose block the query blocks `rows` see; false: no group sees it.
    auto group_flags = [&](int key_tile, unsigned rows, uint8_t (&flags)[kSm90ConsumerGroups]) {
      const int key_first = key_tile * 64, key_last = key_first + 63;
      bool any = false;
#pragma unroll
      for (int g = 0; g < kSm90ConsumerGroups; ++g) {
        flags[g] = 0;
        if (group_lo[g] > group_hi[g] || key_first > group_hi[g] || !(rows & group_row[g])) continue;
        flags[g] = kTileVisible | (key_last > group_lo[g] || key_last >= k_len ? kTileMasked : 0);
        any = true;
      }
      return any;
    };
    // The lane walk's batch: the closed form's tiles lane_next + lane, this lane's as
    // lane_word = tile << 4 | group 1's flags << 2 | group 0's; lane_seen: the batch's lanes whose tile
    // some group sees, not yet handed out; lane_next < 0: the batch reached the walk's end.
    static_assert(kSm90ConsumerGroups == 2 && (kTileVisible | kTileMasked) < 4, "two groups' flags in 4 bits");
    int lane_next = 0, lane_word = 0;
    unsigned lane_seen = 0;
    // The next key tile some consumer group sees, with the groups' flags; false at the end.
    auto next_tile = [&](int& key_tile, uint8_t (&flags)[kSm90ConsumerGroups]) {
      if (count_tiles) {
        key_tile = counted_tile <= last_counted_tile ? counted_tile++ : -1;
        const int key_first = key_tile * 64, key_last = key_first + 63;
#pragma unroll
        for (int g = 0; g < kSm90ConsumerGroups; ++g)
          flags[g] = key_tile < 0 || group_lo[g] > group_hi[g] || key_first > group_hi[g]
                         ? 0
                         : kTileVisible | (key_last > group_lo[g] || key_last >= k_len ? kTileMasked : 0);
        return key_tile >= 0;
      }
      if (lane_walk) {
        while (lane_seen == 0) {
          if (lane_next < 0) {
            key_tile = -1;
            return false;
          }
          unsigned rows = 0;
          const int tile = closed.tile(pattern, lane_next + lane, rows);
          uint8_t lane_flags[kSm90ConsumerGroups] = {};
          const bool seen = tile >= 0 && group_flags(tile, rows, lane_flags);
          lane_word = seen ? tile << 4 | lane_flags[1] << 2 | lane_flags[0] : 0;  // tile >= 0 where seen
          lane_seen = __ballot_sync(0xffffffffu, seen);
          lane_next = __any_sync(0xffffffffu, tile < 0) ? -1 : lane_next + 32;
        }
        const int word = __shfl_sync(0xffffffffu, lane_word, __ffs(lane_seen) - 1);
        lane_seen &= lane_seen - 1;
        key_tile = word >> 4;
#pragma unroll
        for (int g = 0; g < kSm90ConsumerGroups; ++g) flags[g] = (word >> (2 * g)) & 3;
        return true;
      }
      while (tiles.next(key_tile)) {
        if (group_flags(key_tile, tiles.rows, flags)) return true;
      }
      key_tile = -1;
      return false;
    };

    // The unit's fills, the last one marked (kMarksLast) or followed by an end record (first slot
    // empty); a unit without key tiles is its end record alone.
    bool more = true;
    bool copies = !maps.query_enabled;  // the first fill carries the unit's Q
    bool query_pending = maps.query_enabled;
    int ahead_tile = -1;  // kWalkAhead: the next tile (kLookAhead: whose page ids are being looked up)
    uint8_t ahead_flags[kSm90ConsumerGroups] = {};
    int ahead_page = -1;
    if constexpr (kWalkAhead) {
      more = next_tile(ahead_tile, ahead_flags);
      if constexpr (kLookAhead) ahead_page = look_up_page(ahead_tile);
    }
    // kTilesAhead: a whole fill's tiles walked ahead, after the previous fill's issue and before the
    // wait for this fill's slots, so that the walk (tens of dependent instructions a tile) is not
    // between a slot's release and its loads (H200, dense 32k x 1: 15.26 -> 14.46 ms; with 64-key
    // fills, whose ring runs four fills ahead, the pattern was slower: 32k 2.66 -> 2.80).
    // Looking a fill's page ids up ahead was measured and dropped (paged prefill at kv block 16, 8k x 4,
    // 2k chunks / whole prompts, Nsight Compute cycles, H100, 2026-12-06; predicted 3-10 % fewer): here,
    // before the wait for the fill's slots, +5.5 / +7.2 %; together once the wait is over, +2.9 /
    // +4.3 % (a single producer instantiation each: a second one beside the walk's made the consumers
    // spill 52 bytes, ptxas); rebuilt with the tiles' walk (2026-12-06, thirty-third session): -0.7 %
    // on the chunks, +1.3 % on whole prompts. BSA_SM90_TRACE says why (H100, 2k chunks of 8k x 4, kv
    // block 16 and 64 alike): after its slots are free each producer warp waits ~800 cycles for its
    // page id and then ~1,700 for its four TMA issues to go out (~400 cycles an issue instruction: held,
    // it seems, while the TMA is busy); with the ids looked up ahead the wait for them fell to ~500 (a
    // lookup issued before the slot wait still took longer than it) and the warps' issue to
    // ~2,050, yet a fill still landed every ~3,430 cycles, against ~2,800 over contiguous K/V (one
    // warp, ~1,280 from its slots to its arrival). Two fills ahead (thirty-fourth session, H100, 2k
    // chunks of 8k x 4, kv block 16): the warps' issue fell from ~2,750 to ~2,120 cycles, the time
    // from their arrival to the next slot wait grew by as much, and a fill still landed every
    // ~3,580; Nsight Compute cycles +2.4 % on the chunks, +4.3 % on whole prompts. Moving the lookups
    // did not set the paged fills' pace; having fewer of them on one warp's chain did
    // (BSA_SM90_PAGED_FILL_BOXES: one load a warp and fill, the two tiles' boxes from two warps at kv
    // block 64). In the same traces contiguous K/V on four producer warps (the first issuing
    // everything, as over pages at kv block 64) landed a fill every ~3,000 cycles against ~2,920 on
    // one: the four-warp structure is not the paged gap.
    int fill_tiles[kSlots];
    uint8_t fill_flags[kSlots][kSm90ConsumerGroups];
    auto walk_fill = [&] {
#pragma unroll
      for (int slot = 0; slot < kSlots; ++slot) {
        fill_tiles[slot] = -1;
#pragma unroll
        for (int g = 0; g < kSm90ConsumerGroups; ++g) fill_flags[slot][g] = 0;
        if (more) more = next_tile(fill_tiles[slot], fill_flags[slot]);
      }
    };
    if constexpr (kTilesAhead) walk_fill();
    // kLookAhead: the tile after key_tile walked and its page ids looked up. TMA pages do it once
    // key_tile's fill is issued and published, so a freed slot is refilled without the walk and the
    // lookup in between (ncu, paged 8k x 4 at kv block 8192: the consumers waited for fills 2.5x as
    // long as with contiguous K/V in the same storage order); fp8 pages before their conversion, since
    // the next fill's rows are loaded (from these page ids) at the top of its iteration.
    auto walk_ahead = [&](int key_tile) {
      if (key_tile < 0) return;
      ahead_tile = -1;
#pragma unroll
      for (int g = 0; g < kSm90ConsumerGroups; ++g) ahead_flags[g] = 0;
      if (more) more = next_tile(ahead_tile, ahead_flags);
      if constexpr (kLookAhead) ahead_page = look_up_page(ahead_tile);
    };
    for (;; ++n) {
      if (!owns(n)) {  // sm90_paged_pairs: the other pair's fill, whose tiles this pair walked too
        query_pending = false;
        if (fill_tiles[0] < 0) {
          ++n;
          break;
        }
        walk_fill();
        continue;
      }
      fill_leader = leader_of(n);
      if constexpr (kFp8Pages) load_fp8_rows(ahead_tile, ahead_page);
      const Sm90Fill fill = begin_fill();
      const int key_slot = fill.key_slot;  // the fill's full barrier and record
      if (query_pending) {
        query_pending = false;
        if (tid == fill_leader) {
          ptx::mbarrier_expect_tx(&shared.full[key_slot], kPrefillSm90BlockM * kHeadDim * sizeof(Element));
#pragma unroll
          for (int g = 0; g < kSm90ConsumerGroups; ++g)
#pragma unroll
            for (int block = 0; block < kHeadDim / 64; ++block)
              ptx::tma_load_3d(s_q_buf + g * Smem::kQTileBytes + block * 64 * 128, &maps.query, block * 64, head,
                               it.q_begin + tile_pos + (64 >> sm90_pack_shift<Tiling>(params)) * g - it.first_pos,
                               &shared.full[key_slot]);
        }
      }
      int first_tile = -1;
      bool last = false;  // kMarksLast: this fill is the unit's last
      // kFillBoxes: this lane's box's page id, every lane of the warp in one load.
      int fill_page = -1;
      if constexpr (kFillBoxes) {
        const int box_slot = box_row >> 6;
        const int tile = box_slot == 0 ? fill_tiles[0] : box_slot == 1 ? fill_tiles[1] : -1;
        const int pos = tile * 64 + (box_row & 63);
        if (kv.paged() && tile >= 0 && pos < k_len) fill_page = kv.table_row(seq, kv_head)[kv.page_index(pos)];
      }
#pragma unroll
      for (int slot = 0; slot < kSlots; ++slot) {
        int key_tile = -1, page = -1;
        uint8_t flags[kSm90ConsumerGroups] = {};
        if constexpr (kTilesAhead) {
          key_tile = fill_tiles[slot];
          if constexpr (kFillBoxes) page = fill_page;
#pragma unroll
          for (int g = 0; g < kSm90ConsumerGroups; ++g) flags[g] = fill_flags[slot][g];
        } else if constexpr (kWalkAhead) {
          key_tile = ahead_tile;
          page = ahead_page;
#pragma unroll
          for (int g = 0; g < kSm90ConsumerGroups; ++g) flags[g] = ahead_flags[g];
          if constexpr (kFp8Pages) walk_ahead(key_tile);
        } else {
          if (more) more = next_tile(key_tile, flags);
        }
        if (slot == 0) first_tile = key_tile;
        if (key_tile >= 0 || (slot > 0 && first_tile >= 0))  // an empty second slot: zeros
          copies |= load_kv(key_tile, fill, slot, page);
        if constexpr (kMarksLast) {
          walk_ahead(key_tile);  // after the loads: they wait for no walk
          last = key_tile >= 0 && ahead_tile < 0;
          if (last) {
#pragma unroll
            for (int g = 0; g < kSm90ConsumerGroups; ++g) flags[g] |= kFillLast;
          }
        }
        if (tid == fill_leader) {
          shared.records[key_slot].key_tile[slot] = key_tile;
#pragma unroll
          for (int g = 0; g < kSm90ConsumerGroups; ++g) shared.records[key_slot].flags[g][slot] = flags[g];
        }
      }
      if (tid == fill_leader) shared.records[key_slot].unit = unit;
      if constexpr (kBoxPass) {
        const int box_slot = box_row >> 6;  // kSlots or more: no box
        if (kv.paged() && box_slot < kSlots) {
          const int key_tile = box_slot == 0 ? fill_tiles[0] : fill_tiles[1];
          if (tma_tile(key_tile))
            issue_page_box(fill, box_slot, sm90_kv_offset(layout, box_slot * 64, 0), key_tile, fill_page, false);
        }
      }
      if constexpr (kValueBarriers) load_values(fill_tiles, fill);
      ptx::cp_async_commit();
      if (!copies) {
        ptx::mbarrier_arrive(&shared.full[key_slot]);
        early |= 1u << (n % kKeySlots);
      }
      sm90_trace(n, kTraceIssued + tid / 32);
      copies = false;
      if constexpr (kPagesAhead) walk_ahead(first_tile);  // one tile a fill
      if (first_tile < 0 || last) {
        ++n;
        break;
      }
      if constexpr (kTilesAhead) walk_fill();
#if BSA_SM90_PRODUCER_PAD || BSA_SM90_PRODUCER_PAD_ALU
      // Diagnostics: the one-warp producer made late after a fill is out, before the wait for the
      // next one's slots, on the SM sub-partition it shares with a consumer warp of each group.
      // BSA_SM90_PRODUCER_PAD=n: n integer multiply-adds in four chains; BSA_SM90_PRODUCER_PAD_ALU=n:
      // n rotates and XORs instead (ALU pipe, not FMA). BSA_SM90_PRODUCER_SLEEP_NS=t: a sleep,
      // no issue slots (nanosleep: 0 to 2t). H100, Nsight Compute cycles, dense 16k x 2 (2026-12-07):
      // IMAD 64 +2.1 %, 128 +7.7 / +8.3 %, 256 +20.7 % (a threshold near 42 a fill, then ~2.5
      // cycles each); ALU 128 +5.1 %; sleep 100 ns +0.0 %, 300 ns +5.2 %. So the producer has ~100-300
      // cycles of slack a fill (of ~2,570) and sets no pace: 65 fewer of its instructions a fill
      // (commit 0db9f34) measured +0.4 %.
      if constexpr (kProducerThreads == 32) {
        uint32_t pad[4] = {static_cast<uint32_t>(n), static_cast<uint32_t>(tid), static_cast<uint32_t>(k), 7u};
        const uint32_t mul = static_cast<uint32_t>(unit) | 1u, add = static_cast<uint32_t>(seq);
#pragma unroll
        for (int i = 0; i < (BSA_SM90_PRODUCER_PAD + BSA_SM90_PRODUCER_PAD_ALU) / 4; ++i)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (BSA_SM90_PRODUCER_PAD_ALU == 0)
              asm volatile("mad.lo.u32 %0, %0, %1, %2;" : "+r"(pad[c]) : "r"(mul), "r"(add));
            else if (i % 2 == 0)  // two instructions a step, half the steps
              asm volatile("{ shf.l.wrap.b32 %0, %0, %0, 5; xor.b32 %0, %0, %1; }" : "+r"(pad[c]) : "r"(mul));
          }
        if ((pad[0] ^ pad[1] ^ pad[2] ^ pad[3]) == 0x9e3779b9u) shared.records[0].unit = -2;  // keeps them
      }
#endif
#if BSA_SM90_PRODUCER_SLEEP_NS
      if constexpr (kProducerThreads == 32) __nanosleep(BSA_SM90_PRODUCER_SLEEP_NS);
#endif
    }
  }
}

// A consumer warp's 16 rows of a bf16 Q tile (64-column blocks of 64 rows x 128 bytes, swizzled
// inside a row: the warp's rows are 2 KB of each block) rewritten in place as fp16, multiplied by a
// power of two of their own (fp16_range_exponent). Returns the inverse factor (exact), which joins
// the warp's softmax scale: its rows are the accumulator rows 16 warp .. 16 warp + 15. The writes are
// made visible to the wgmma (async proxy) here; the caller synchronises the group's warps before the
// first product.
template <int kHeadDim>
__device__ __forceinline__ float sm90_query_to_fp16(unsigned char* s_q, int warp, int lane) {
  constexpr int kWords = kHeadDim / 64 * 4;  // 16-byte words a lane: 2 KB of each block / 32 lanes
  uint4 words[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i)
    words[i] = *reinterpret_cast<const uint4*>(s_q + (i / 4) * 64 * 128 + warp * 2048 + ((i % 4) * 32 + lane) * 16);
  unsigned amax = 0;
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    const uint32_t w[4] = {words[i].x, words[i].y, words[i].z, words[i].w};
#pragma unroll
    for (int e = 0; e < 4; ++e) amax = bf16x2_finite_magnitude_max(amax, w[e]);
  }
  amax = __reduce_max_sync(0xffffffffu, max(amax & 0xffffu, amax >> 16));
  const int exponent = fp16_range_exponent(amax);
  const float factor = exp2f(static_cast<float>(exponent));
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    uint32_t w[4] = {words[i].x, words[i].y, words[i].z, words[i].w};
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = bf16x2_to_half2(w[e], factor);
    *reinterpret_cast<uint4*>(s_q + (i / 4) * 64 * 128 + warp * 2048 + ((i % 4) * 32 + lane) * 16) =
        make_uint4(w[0], w[1], w[2], w[3]);
  }
  ptx::fence_proxy_async_shared();
  return exp2f(static_cast<float>(-exponent));
}

// Warp groups 1 and 2: 64 query rows each; per fill, S = Q K^T, the online softmax, O += P V, then
// each unit's epilogue.
// kLastMarked: the producer marks each unit's last fill (sm90_marks_last_fill), except in units
// without key tiles, whose end record brings their Q; without it every unit ends with an end record
// and the code has no test for the mark.
// kValueBarriers: a fill's values complete on their value slot's own barrier (sm90_value_barriers),
// waited for just before the fill's P.V.
// kDescriptorCursor: the K and V descriptors advance with the fill cursor (sm90_descriptor_cursor).
template <typename Element, int kHeadDim, typename Tiling, typename Cache, bool kTurns, bool kLastMarked,
          bool kValueBarriers, bool kDescriptorCursor>
__device__ __forceinline__ void sm90_consumer(const PrefillParams& params, const Sm90TensorMaps& maps,
                                              const Sm90Shared<kHeadDim, Tiling>& shared, bool kv_row_groups) {
  using Smem = Sm90Smem<kHeadDim, Tiling>;
  using StageRecord = Sm90StageRecord<Tiling::kTilesPerStage>;
  constexpr int kKeySlots = Tiling::kKeySlots;
  constexpr int kSlots = Tiling::kTilesPerStage;
  const int tid = threadIdx.x;
  const int head_size = params.head_size;
  using Compute = Sm90Compute<Element, Cache>;
  using MmaS = ptx::Wgmma<Compute, Tiling::kBlockN>;
  using MmaO = ptx::Wgmma<Compute, kHeadDim>;
  // An fp8 cache's scales (1 otherwise): k_scale joins the softmax scale, v_scale multiplies the
  // finished O.
  const float cache_scale_log2 = params.scale_log2 * cache_scale(params.kv.k_scale);
  const float value_scale = cache_scale(params.kv.v_scale);
  constexpr int kSRegs = Tiling::kBlockN / 2;  // S accumulators per thread: 64 rows x kBlockN keys / 128
  constexpr int kORegs = kHeadDim / 2;
  constexpr bool kPvWaitBeforeExp = sm90_pv_wait_before_exp<Tiling>();
  constexpr bool kSHalves = sm90_s_halves<Tiling>();  // BSA_SM90_S_HALVES
  constexpr bool kVoteOnGrowth = BSA_SM90_VOTE_ON_GROWTH;
  constexpr bool kMaxVote = BSA_SM90_MAX_VOTE;
  using MmaSHalf = ptx::Wgmma<Compute, (kSHalves ? Tiling::kBlockN / 2 : Tiling::kBlockN)>;  // kSHalves only
  // Values the compiler can prove warp-uniform (a lane-0 broadcast) keep the slot indices and the
  // wgmma descriptors in uniform registers: otherwise every wgmma is preceded by register-to-
  // uniform moves and address arithmetic (SASS: ~70 instructions per tile).
  auto uniform = [](int x) { return __shfl_sync(0xffffffffu, x, 0); };
  const int group = uniform(tid / 128) - 1;
  const int t = tid % 128, warp = t / 32, lane = t % 32;
  const int quad_row = lane / 4, tig = lane % 4;
  // Descriptor steps (16-byte units): K-major operands advance 32 B per 16 columns inside a
  // 64-column block, then a whole block; V (MN-major) advances two 8-row groups per 16 keys.
  const Sm90KvLayout layout = sm90_kv_layout<Tiling::kBlockN, kHeadDim>(kv_row_groups);
  auto q_step = [](int ks) { return static_cast<uint32_t>((ks & 3) * 32 + (ks >> 2) * 64 * 128); };
  auto k_step = [&layout](int ks) { return static_cast<uint32_t>((ks & 3) * 32 + (ks >> 2) * layout.column_block_bytes); };

  // A fill's slots and, with kDescriptorCursor, the low words of their K and V descriptors.
  struct Fill : Sm90Fill {
    uint32_t key_desc_lo, value_desc_lo;
  };
  struct StageInfo {
    Fill fill;
    int unit;
    int tile[kSlots];
    uint8_t flags[kSlots];
    bool end;   // an end record: no tiles
    bool last;  // the unit's last fill (kFillLast): no end record follows
  };
  // The next fill's slots (Tiling::fill) and phase parities, advanced fill by fill rather than
  // derived from the fill count: dividing it by the ring sizes (n % 3 for 128-key value slots, a
  // multiply-high and fix-ups on the uniform datapath) put ~17 instructions between a fill's end and
  // the next fill's wait. The cursor took 1.1-1.4 % fewer cycles (H100, Nsight Compute, 2026-12-06:
  // dense 16k x 2 -1.17 %, 32k x 1 -1.30 %, the pattern 8k x 4 -1.07 %, 32k x 1 -1.36 %, 128 x 256
  // -0.37 %).
  Sm90Fill cursor{0, 0};
  int cursor_parity = 0, cursor_value_parity = 0;  // the latter: the value slot's (kValueBarriers)
  // kDescriptorCursor: the slots' K and V descriptors advanced with them. A slot's start address is
  // its descriptor's low word (bits 0-13): the next slot's is one add, or the first slot's on a wrap.
  const ptx::SmemDescriptor key_desc0 =
      ptx::smem_descriptor_sw128(shared.smem + Smem::kKOffset, 16, layout.row_group_bytes);
  const ptx::SmemDescriptor value_desc0 =
      ptx::smem_descriptor_sw128(shared.smem + Smem::kVOffset, layout.column_block_bytes, layout.row_group_bytes);
  uint32_t cursor_key_lo = kDescriptorCursor ? uniform(key_desc0.lo) : 0u;
  uint32_t cursor_value_lo = kDescriptorCursor ? uniform(value_desc0.lo) : 0u;
  constexpr uint32_t kStageStep = Smem::kStageBytes >> 4;
  auto advance = [&] {
    if (++cursor.key_slot == kKeySlots) {
      cursor.key_slot = 0;
      cursor_parity ^= 1;
    }
    if (++cursor.value_slot == Tiling::kValueSlots) {
      cursor.value_slot = 0;
      cursor_value_parity ^= 1;
    }
    if constexpr (kDescriptorCursor) {
      cursor_key_lo = cursor.key_slot == 0 ? uniform(key_desc0.lo) : cursor_key_lo + kStageStep;
      cursor_value_lo = cursor.value_slot == 0 ? uniform(value_desc0.lo) : cursor_value_lo + kStageStep;
    }
  };
  int trace_fill = 0;  // BSA_SM90_TRACE: the fills waited for so far
  // BSA_SM90_TRACE: this group's event `event` (a per-group offset) of the fill it last waited for.
  auto trace_group = [&](int event) {
    if (t < 32) sm90_trace(trace_fill - 1, event + group);
  };
  auto wait_fill = [&] {
    if (t < 32) sm90_trace(trace_fill, kTraceFillWait + group);
    ptx::mbarrier_wait(&shared.full[cursor.key_slot], cursor_parity);
    ++trace_fill;
    trace_group(kTraceFillLanded);
    return Fill{cursor, cursor_key_lo, cursor_value_lo};
  };
  auto read_record = [&](const Fill& fill) {
    StageInfo info;
    info.fill = fill;
    const StageRecord& record = shared.records[fill.key_slot];
    info.unit = uniform(record.unit);
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) {
      info.tile[slot] = uniform(record.key_tile[slot]);
      info.flags[slot] = static_cast<uint8_t>(uniform(record.flags[group][slot]));
    }
    info.end = info.tile[0] < 0;
    info.last = false;
    if constexpr (kLastMarked) {
      info.last = (info.flags[0] & kFillLast) != 0;
      info.flags[0] &= ~kFillLast;
    }
    return info;
  };
  // Every thread arrives after its own reads of the slot (a key slot's record included): one
  // arrival per warp after __syncwarp is also correct, but compute-sanitizer's racecheck cannot
  // see it. With split rings a key slot is freed once S is done; a value slot (with shared stages,
  // the whole stage) after P.V.
  auto release_key = [&](const Sm90Fill& fill) {
    trace_group(kTraceKeyReleased);
    if constexpr (Tiling::kSplitRings) ptx::mbarrier_arrive(&shared.key_empty[fill.key_slot]);
  };
  auto release_value = [&](const Sm90Fill& fill) { ptx::mbarrier_arrive(&shared.value_empty[fill.value_slot]); };

  // Turns (kTurns, see sm90_turns): group g waits for its turn before it issues a fill's products and
  // hands the turn on after them; group 1 hands group 0 its first turn, and group 0 takes group 1's
  // last hand-over when the CTA's work ends, so each barrier's arrivals and waits pair up. Both groups
  // must take the same turns: every turn decision comes from the shared record (unit, end), never
  // from a group's own flags (scripts/sm90_protocol_model.py checks the protocol).
  auto begin_turn = [&] {
    if constexpr (kTurns) ptx::named_barrier_sync(kSm90TurnBarrier + group, 2 * 128);
    trace_group(kTraceTurn);
  };
  auto end_turn = [&] {
    if constexpr (kTurns) ptx::named_barrier_arrive(kSm90TurnBarrier + (group ^ 1), 2 * 128);
  };
  if (group == 1) end_turn();

  for (int k = 0;; ++k) {
    StageInfo info = read_record(wait_fill());  // the unit's first fill, which also brought its Q
    if (info.unit < 0) {
      if (group == 0) begin_turn();
      if (t == 0) ptx::bulk_wait_group<0>();  // the group's last TMA stores of O have landed
      break;
    }
    const int buf = k % Tiling::kQBuffers;
    const PrefillItem it = shared.items[buf];
    // The group's 64 rows: row r is token group_pos + (r >> s), q head it.head + (r & (2^s - 1)) for
    // s = sm90_pack_shift (read where used: a register held for it made ptxas spill).
    const int group_pos = it.tile_pos + (64 >> sm90_pack_shift<Tiling>(params)) * group;
    const int row_pos[2] = {group_pos + ((warp * 16 + quad_row) >> sm90_pack_shift<Tiling>(params)),
                            group_pos + ((warp * 16 + quad_row + 8) >> sm90_pack_shift<Tiling>(params))};
    const int k_len = it.k_len;
    unsigned char* s_q = shared.smem + Smem::kQOffset + buf * Smem::kQBufferBytes + group * Smem::kQTileBytes;
    const ptx::SmemDescriptor desc_q = ptx::smem_descriptor_sw128(s_q, 16);
    // The softmax scale of this warp's rows: a bf16 Q over fp8 pages is scaled into fp16 first.
    float scale_log2 = cache_scale_log2;
    if constexpr (!std::is_same_v<Compute, Element>) {
      if (!info.end) {
        scale_log2 *= sm90_query_to_fp16<kHeadDim>(s_q, warp, lane);
        ptx::named_barrier_sync(kSm90EpilogueBarrier + group, 128);  // every warp's rows are fp16
      }
    }

    float acc_o[kORegs];
    OnlineSoftmax softmax;
    softmax.init(acc_o);
    uint32_t p_frag[Tiling::kBlockN / 16][4];

    auto key_descriptor = [&](const Fill& fill) {
      return kDescriptorCursor ? ptx::SmemDescriptor{fill.key_desc_lo, key_desc0.hi}
                               : ptx::smem_descriptor_sw128(shared.smem + Smem::kKOffset + fill.key_slot * Smem::kStageBytes,
                                                            16, layout.row_group_bytes);
    };
    auto issue_s = [&](float (&s)[kSRegs], const Fill& fill) {
      const ptx::SmemDescriptor desc_k = key_descriptor(fill);
      ptx::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks) MmaS::ss(s, desc_q.at(q_step(ks)), desc_k.at(k_step(ks)), ks > 0);
      ptx::wgmma_commit();
    };
    // kSHalves: S's keys 0-63 (slot 0) into s_lo = s[0, 32), committed, and keys 64-127 (slot 1, 8
    // row groups on) into s_hi = s[32, 64), left for P.V's commit group: the m64n128 accumulators'
    // layout, 8-key block by block. The second descriptor goes through a lane-0 broadcast: computed
    // from the layout alone, it took the loop's slot state out of the uniform registers.
    auto issue_s_halves = [&](float (&s_lo)[kSRegs / 2], float (&s_hi)[kSRegs / 2], const Fill& fill) {
      const ptx::SmemDescriptor desc_k = key_descriptor(fill);
      if constexpr (kSHalves) {
        const ptx::SmemDescriptor desc_k_hi{static_cast<uint32_t>(uniform(desc_k.lo + ((8 * layout.row_group_bytes) >> 4))),
                                            desc_k.hi};
        ptx::wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kHeadDim / 16; ++ks) MmaSHalf::ss(s_lo, desc_q.at(q_step(ks)), desc_k.at(k_step(ks)), ks > 0);
        ptx::wgmma_commit();
#pragma unroll
        for (int ks = 0; ks < kHeadDim / 16; ++ks)
          MmaSHalf::ss(s_hi, desc_q.at(q_step(ks)), desc_k_hi.at(k_step(ks)), ks > 0);
      }
    };
    // kValueBarriers: waits for the fill's values (its value slot's phase `parity`) first.
    auto issue_pv = [&](const Fill& fill, int parity) {
      if constexpr (kValueBarriers) {
        ptx::mbarrier_wait(&shared.value_full[fill.value_slot], parity);
        trace_group(kTraceValuesSeen);
      }
      // V (MN-major): the 64-column blocks column_block_bytes apart, the 8-key groups row_group_bytes.
      const ptx::SmemDescriptor desc_v =
          kDescriptorCursor ? ptx::SmemDescriptor{fill.value_desc_lo, value_desc0.hi}
                            : ptx::smem_descriptor_sw128(shared.smem + Smem::kVOffset + fill.value_slot * Smem::kStageBytes,
                                                         layout.column_block_bytes, layout.row_group_bytes);
      ptx::fence_registers(acc_o);
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Tiling::kBlockN / 16; ++kk)
        MmaO::rs_mn_major_b(acc_o, p_frag[kk], desc_v.at(kk * 2 * layout.row_group_bytes));
      ptx::wgmma_commit();
      ptx::fence_registers(acc_o);
    };
    // Scores -> P with the online softmax (the 4 threads of a quad hold one row's keys), in the
    // log2 domain. s[4j + e]: row row_pos[e / 2], stage column 8j + 2 tig + e % 2 (slot j / 8).
    // S stays unscaled: the scale folds into the exponent's FFMA (max(scale * s) = scale * max(s)
    // needs scale > 0; other scales are applied first, on every tile). Tiles that need a mask (the
    // diagonal, the sequence's last, those a group does not see) select -inf by one limit per slot
    // and row, without branches (select, never add: garbage K rows may hold NaN; per-element tests
    // with branches made a masked 128-key tile 1188 SASS instructions against 457 unmasked).
    // mask_scores returns the multiplier the softmax applies to the scores.
    const bool scale_first = !(scale_log2 > 0.f);
    auto mask_scores = [&](float (&s)[kSRegs], const StageInfo& stage_info, int first_slot = 0,
                           int end_slot = Tiling::kTilesPerStage) {  // the slots [first_slot, end_slot) (kSHalves: one)
      bool plain = !scale_first;
#pragma unroll
      for (int slot = 0; slot < kSlots; ++slot) plain &= stage_info.flags[slot] == kTileVisible;
      auto mask = [&](auto scale) {  // std::true_type: scale the visible scores too
        constexpr bool kScale = decltype(scale)::value;
#pragma unroll
        for (int slot = first_slot; slot < end_slot; ++slot) {
          const uint8_t flags = stage_info.flags[slot];
          const int key_pos0 = stage_info.tile[slot] * 64 + 2 * tig;
          int limit[2];  // each row's last visible column, as an offset from key_pos0
#pragma unroll
          for (int r = 0; r < 2; ++r)
            limit[r] = !(flags & kTileVisible) ? -1
                       : (flags & kTileMasked) ? min(row_pos[r], k_len - 1) - key_pos0
                                               : 1 << 30;
#pragma unroll
          for (int j = slot * 8; j < slot * 8 + 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int offset = 8 * (j - slot * 8) + (e & 1);
              const float score = kScale ? s[4 * j + e] * scale_log2 : s[4 * j + e];
              s[4 * j + e] = offset <= limit[e >> 1] ? score : -INFINITY;
            }
        }
      };
      if (!plain) {
        if (scale_first) mask(std::true_type{});
        else mask(std::false_type{});
      }
      return scale_first ? 1.f : scale_log2;
    };
    // Scores -> P; returns the O rescale factors in row_alpha, and whether a row's reference moved.
    auto scores_to_p = [&](float (&s)[kSRegs], const StageInfo& stage_info, float (&row_alpha)[2]) {
      return softmax.update<kMaxVote>(s, mask_scores(s, stage_info), kSm90MaxSlack, row_alpha);
    };
    // P as A fragments (16 keys per P.V k-step; two 8-key accumulator blocks form one fragment).
    auto pack_p = [&](const float (&s)[kSRegs]) {
#pragma unroll
      for (int kk = 0; kk < Tiling::kBlockN / 16; ++kk) {
        p_frag[kk][0] = ptx::pack2<Compute>(s[8 * kk + 0], s[8 * kk + 1]);
        p_frag[kk][1] = ptx::pack2<Compute>(s[8 * kk + 2], s[8 * kk + 3]);
        p_frag[kk][2] = ptx::pack2<Compute>(s[8 * kk + 4], s[8 * kk + 5]);
        p_frag[kk][3] = ptx::pack2<Compute>(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };

    // Software pipeline (FA3's intra-warpgroup overlap): issue S_n = Q K_n, issue O += P_{n-1}
    // V_{n-1}, wait for S_n, free K_n, softmax, wait for P.V, free V_{n-1}, rescale O. ptxas moves
    // a wgmma wait up to the top of its basic block: written after the softmax in the same block,
    // the P.V wait sat before the row maxima's shuffles (P.V overlapped the masking only). It now
    // sits at a block boundary (finish_pv below): after the exponentials, or with
    // sm90_pv_wait_before_exp between the row maxima and the exponentials, which P then packs
    // beside. Earlier pins (a barrier wait, or a shared store of the row sums, which ptxas keeps
    // ahead of the wgmma wait) measured slower: 2 % at 8k x 4, 5-8 % on dense layouts.
    // Every tile of the list goes through both groups (one a group does not see is fully masked):
    // skipping it would put the wgmma issue in data-dependent branches, where ptxas serialises
    // them.
    if (!info.end) {
      {
        float s[kSRegs], row_alpha[2];
        begin_turn();
        issue_s(s, info.fill);
        end_turn();
        ptx::wgmma_wait<0>();
        ptx::fence_registers(s);
        release_key(info.fill);
        scores_to_p(s, info, row_alpha);  // O is still zero: nothing to rescale (SASS: ~70 instructions)
        pack_p(s);
        trace_group(kTraceReady);
      }
      Fill pending = info.fill;
      int pending_parity = cursor_value_parity;
      // The previous fill's P.V done, O readable and its value slot freed.
      auto pending_pv_waited = [&] {  // after the wait for it
        ptx::fence_registers(acc_o);
        release_value(pending);
      };
      auto finish_pending_pv = [&] {
        ptx::wgmma_wait<0>();
        pending_pv_waited();
      };
      while (!info.last) {
        // Both products are issued before the fill's record is read (its load and broadcast
        // would delay them): an end record's key slot holds stale keys, whose scores are dropped
        // (at S = 128 one S product in 2.5; reading the expected end record first measured no
        // faster there, H100, 2026-12-05). ptxas puts the record's loads and the end test between
        // the last two P.V wgmmas, where the test waits on the loads (the pattern's 32k x 1: 16.5k
        // of 297k stall samples), but the tensor pipe is busy meanwhile: reading the record before
        // the products cost 0.7-0.8 % more cycles (dense 16k, the pattern 8k and 32k; 128 x 256
        // -0.5 %, H100, Nsight Compute, 2026-12-06).
        advance();
        const Fill fill = wait_fill();
        float s[kSRegs], row_alpha[2];
        float(&s_lo)[kSRegs / 2] = *reinterpret_cast<float(*)[kSRegs / 2]>(&s[0]);
        float(&s_hi)[kSRegs / 2] = *reinterpret_cast<float(*)[kSRegs / 2]>(&s[kSRegs / 2]);
        begin_turn();
        if constexpr (kSHalves) issue_s_halves(s_lo, s_hi, fill);
        else issue_s(s, fill);
        issue_pv(pending, pending_parity);
        end_turn();
        info = read_record(fill);
        float multiplier = 1.f;  // kSHalves: the softmax's, from the first half's mask
        if constexpr (kSHalves) {
          ptx::wgmma_wait<1>();  // S's first 64 keys are done; its other 64 and P.V may still run
          ptx::fence_registers(s_lo);
          if (info.end) {
            finish_pending_pv();
            release_key(fill);
            break;
          }
          multiplier = mask_scores(s, info, 0, 1);
          softmax.new_reference(s_lo, multiplier, kSm90MaxSlack, row_alpha);
          softmax.exponentiate(s_lo, multiplier, row_alpha);
          // S's second half and P.V (one commit group), in a block of its own so that ptxas keeps
          // the wait after the first half's exponentials.
          trace_group(kTraceVoted);
          ptx::wgmma_wait_in_own_block<0>(info.tile[0] & 1);
          ptx::fence_registers(s_hi);
          release_key(fill);
          pending_pv_waited();
          trace_group(kTracePvDone);
        } else {
          ptx::wgmma_wait<1>();  // S is done; P.V may still run
          ptx::fence_registers(s);
          release_key(fill);
          if (info.end) {
            finish_pending_pv();
            break;
          }
        }
        // O scaled by the change of the row maxima, skipped while they hold (the common case); each
        // warp votes for its own rows. The P.V wait begins a block of its own on a branch the group
        // takes alike, so that ptxas keeps it after the maxima and the group's four warps run the
        // same wait instruction (wgmma.wait_group is .aligned over the warp group). A wait in each
        // arm of the warp's vote failed compute-sanitizer synccheck; the group voting as one
        // (bar.red.or) passed at 2.6 % more cycles at dense 16k x 2; this way passes at 0.8 % more
        // than the warp's arms (H100, 2026-12-07/08).
        // kVoteOnGrowth: the vote takes whether a row's reference moved, which the maxima give
        // before the exponential of alpha (the same rows: alpha is 1 exactly where it did not).
        // kMaxVote: the softmax has voted already (moved is the warp's).
        auto finish_pv = [&](const float (&alpha)[2], bool moved) {
          const bool rescale =
              kMaxVote ? moved : __any_sync(0xffffffffu, kVoteOnGrowth ? moved : (alpha[0] != 1.f || alpha[1] != 1.f));
          trace_group(kTraceVoted);
          ptx::wgmma_wait_in_own_block<0>(info.tile[0] & 1);  // the shared record's: the group's alike
          pending_pv_waited();
          if (rescale) scale_rows(acc_o, alpha);
          trace_group(kTracePvDone);
        };
        if constexpr (BSA_SM90_SKIP_SOFTMAX == 1) {  // diagnostic, wrong output: P = the raw scores
          finish_pending_pv();
          trace_group(kTracePvDone);
        } else if constexpr (kSHalves) {
          // The second half's maxima; where they move a row's reference, the first half's P (taken
          // against the old one) and O follow it, and the row sums take it in exponentiate.
          mask_scores(s, info, 1, 2);
          float alpha_hi[2];
          softmax.new_reference(s_hi, multiplier, kSm90MaxSlack, alpha_hi);
          rescale_rows(s_lo, alpha_hi);
          row_alpha[0] *= alpha_hi[0];
          row_alpha[1] *= alpha_hi[1];
          rescale_rows(acc_o, row_alpha);
          softmax.exponentiate(s_hi, multiplier, alpha_hi);
        } else if constexpr (kPvWaitBeforeExp) {  // sm90_pv_wait_before_exp
          // FlashAttention-4's order (the maxima and the FFMAs of s * scale - max before this P.V
          // wait), O rescaled every fill or on the vote: 0.4-3.4 % more cycles (H100, 2026-12-07).
          const float multiplier = mask_scores(s, info);
          const bool moved = softmax.new_reference<kMaxVote>(s, multiplier, kSm90MaxSlack, row_alpha);
          // Half the exponentials before this wait (in its shadow) measured 0.1 % (dense 16k) and
          // 2.3 % (the pattern 8k) more cycles (H100, 2026-12-07).
          finish_pv(row_alpha, moved);
          if constexpr (BSA_SM90_SKIP_SOFTMAX != 2) softmax.exponentiate(s, multiplier, row_alpha);
        } else {
          const bool moved = scores_to_p(s, info, row_alpha);
          finish_pv(row_alpha, moved);
        }
        pack_p(s);
        trace_group(kTraceReady);
#if BSA_SM90_CONSUMER_SLEEP_NS
        __nanosleep(BSA_SM90_CONSUMER_SLEEP_NS);  // diagnostic (prefill_sm90_tiling.cuh)
#endif
        pending = fill;
        pending_parity = cursor_value_parity;
      }
      if (info.last) {  // the marked last fill's P.V, on its own
        begin_turn();
        issue_pv(pending, pending_parity);
        end_turn();
        finish_pending_pv();
      }
    } else {
      release_key(info.fill);  // a unit without key tiles: its first fill is the end record
    }
    if (!info.last) release_value(info.fill);  // the end record's value slot (it carries no values)
    advance();

    // Epilogue: normalise, write lse, stage O through this group's Q tile for 16-byte stores.
    float inv_sum[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int head_mask = (1 << sm90_pack_shift<Tiling>(params)) - 1;
      const int head = it.head + ((warp * 16 + quad_row + 8 * r) & head_mask);
      inv_sum[r] = finish_prefill_row(params, it, softmax, r, row_pos[r], head, tig) * value_scale;
    }
    ptx::named_barrier_sync(kSm90EpilogueBarrier + group, 128);  // the group's wgmma reads of s_q are over
    // This thread's two rows (r = 0, 1: 8 apart) share row & 7 = quad_row, so the 128-byte swizzle
    // of column chunk j is one XOR on bits 4-6 of a per-thread base (sm90_tile_offset<64> with
    // col = 8 j + 2 tig); the rest are immediate offsets. Per element addressing took ~250
    // instructions here (SASS), more than the stores.
    const uint32_t o_base = (warp * 16 + quad_row) * 128 + (quad_row << 4) + 4 * tig;
#pragma unroll
    for (int j = 0; j < kORegs / 4; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t packed =
            ptx::pack2<Element>(acc_o[4 * j + 2 * r] * inv_sum[r], acc_o[4 * j + 2 * r + 1] * inv_sum[r]);
        const uint32_t offset = (j >> 3) * (64 * 128) + r * 8 * 128 + (o_base ^ ((j & 7) << 4));
        *reinterpret_cast<uint32_t*>(s_q + offset) = packed;
      }
    // Where every row of the group is a query of the unit's sequence (the box would overwrite any
    // other), one thread stores the staged rows through the TMA (Q's boxes) and waits only until the
    // TMA has read them, so the Q buffer may be refilled; the group's threads skip the copy-out.
    const int shift = sm90_pack_shift<Tiling>(params);
    const bool tma_store = maps.out_enabled && group_pos >= it.valid_begin && group_pos + (64 >> shift) <= it.valid_end;
    if (tma_store) ptx::fence_proxy_async_shared();  // this thread's staged O, for the TMA's reads
    ptx::named_barrier_sync(kSm90EpilogueBarrier + group, 128);
    if (tma_store) {
      if (t == 0) {
        const int token = it.q_begin - it.first_pos + group_pos;
#pragma unroll
        for (int block = 0; block < kHeadDim / 64; ++block)
          ptx::tma_store_3d(&maps.out, s_q + block * 64 * 128, block * 64, it.head, token);
        ptx::bulk_commit_group();
        ptx::bulk_wait_group_read<0>();
      }
      ptx::mbarrier_arrive(&shared.q_empty[buf]);
      continue;
    }
    // 16-byte chunks to global memory: thread t takes column chunk t % kChunksPerRow of rows
    // t / kChunksPerRow + kRowsPerPass i; kRowsPerPass is a multiple of 8, so the swizzle is the
    // same for all of them and the shared offsets step by immediates.
    Element* out = static_cast<Element*>(params.out);
    constexpr int kChunksPerRow = kHeadDim / 8, kRowsPerPass = 128 / kChunksPerRow;
    static_assert(kRowsPerPass % 8 == 0 && 64 % kRowsPerPass == 0, "the swizzle repeats every 8 rows");
    const int out_row0 = t / kChunksPerRow, out_col = (t % kChunksPerRow) * 8;
    const unsigned char* s_out = s_q + sm90_tile_offset<64>(out_row0, out_col);
    const int64_t token0 = static_cast<int64_t>(it.q_begin) - it.first_pos;
    auto store_chunk = [&](Element* dst, int i) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(s_out + i * kRowsPerPass * 128);
    };
    if (out_col < head_size) {
      const int head_mask = (1 << shift) - 1;
      if (head_mask < kRowsPerPass) {
        // Every pass's row has the thread's head (packed heads of at most kRowsPerPass): one
        // address, then steps of kRowsPerPass >> shift tokens (64-bit multiplies cost ~17
        // instructions a store).
        const int pos_step = kRowsPerPass >> shift;
        int pos = group_pos + (out_row0 >> shift);
        Element* dst = out + (token0 + pos) * params.out_row_stride +
                       static_cast<int64_t>(it.head + (out_row0 & head_mask)) * params.out_head_stride + out_col;
        const int64_t dst_step = pos_step * params.out_row_stride;
#pragma unroll
        for (int i = 0; i < 64 / kRowsPerPass; ++i, pos += pos_step, dst += dst_step)
          if (pos >= it.valid_begin && pos < it.valid_end) store_chunk(dst, i);
      } else {
#pragma unroll
        for (int i = 0; i < 64 / kRowsPerPass; ++i) {
          const int row = out_row0 + kRowsPerPass * i;
          const int pos = group_pos + (row >> shift);
          if (pos < it.valid_begin || pos >= it.valid_end) continue;
          const int head = it.head + (row & head_mask);
          store_chunk(out + (token0 + pos) * params.out_row_stride + static_cast<int64_t>(head) * params.out_head_stride +
                          out_col,
                      i);
        }
      }
    }
    ptx::mbarrier_arrive(&shared.q_empty[buf]);  // this thread's reads of the Q buffer are over
  }
}

#endif

// kProducerThreads: 128, or 32 (BSA_SM90_PRODUCER_WARPS=1, contiguous K/V through the TMA). Over TMA
// pages the one-warp producer took 16 % more cycles with 64-key fills (its lanes issue the boxes one
// after another, the TMA instruction taking uniform registers; page ids looked up a fill ahead and the
// last fill marked) and 20 % more with 128-key fills (paged prefill at kv block 16, 2k chunks of 8k x
// 4; whole prompts +15 %), and two warps (two pages' boxes a warp, the walk in two) 9.0 % more on
// those chunks and 8.4 % on whole prompts (H100, Nsight Compute, 2026-12-06): pages keep four warps.
template <typename Element, int kHeadDim, typename Tiling, typename Cache, int kProducerThreads>
__global__ void __launch_bounds__(kSm90Threads, 1)
    prefill_sm90_kernel(const PrefillParams params, const __grid_constant__ Sm90TensorMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Smem = Sm90Smem<kHeadDim, Tiling>;
  extern __shared__ unsigned char smem_unaligned[];
  // Aligned by arithmetic on the __shared__ array itself: a round trip through an integer address
  // made every shared access generic (the records took LD.E and shuffles, and ptxas spilled).
  const Sm90Shared<kHeadDim, Tiling> shared(
      smem_unaligned + ((1024u - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_unaligned)) & 1023u)) & 1023u));
  if (threadIdx.x == 0) {
    // every working producer thread arrives on full (with sm90_paged_pairs, the fill's pair's); every
    // consumer thread on the empties
    const int fill_arrivals =
        sm90_paged_pairs<Tiling, Cache, kProducerThreads>(params, maps) ? kProducerThreads / 2 : kProducerThreads;
    for (int s = 0; s < Tiling::kKeySlots; ++s) ptx::mbarrier_init(&shared.full[s], fill_arrivals);
    for (int s = 0; s < Tiling::kValueSlots; ++s) ptx::mbarrier_init(&shared.value_empty[s], 128 * kSm90ConsumerGroups);
    for (int s = 0; s < Smem::kKeyEmptyBarriers; ++s)
      ptx::mbarrier_init(&shared.key_empty[s], 128 * kSm90ConsumerGroups);
    for (int b = 0; b < Tiling::kQBuffers; ++b) ptx::mbarrier_init(&shared.q_empty[b], 128 * kSm90ConsumerGroups);
    if constexpr (sm90_value_barriers<Tiling, kProducerThreads>())
      for (int s = 0; s < Tiling::kValueSlots; ++s) ptx::mbarrier_init(&shared.value_full[s], 1);  // the producer's thread 0
    ptx::mbarrier_init_fence();
  }
  __syncthreads();
  // Launched as a programmatic dependent of the plan kernel (launch_prefill_sm90.cuh): the list, the
  // counter and (transitively) the inputs are only read after it has finished.
  asm volatile("griddepcontrol.wait;" ::: "memory");

  // The CTA is persistent: its producer claims work units (plan item * Hq + head) from a counter
  // until none is left, and streams each unit's fills through the same ring; the consumers follow
  // the records. Units differ in length (sparse rows, varlen), so claiming beats a static split.
  if (threadIdx.x < 128) {
    ptx::setmaxnreg_dec<kSm90ProducerRegisters>();
    if (threadIdx.x >= kProducerThreads) return;  // BSA_SM90_PRODUCER_WARPS
    constexpr bool kMayLookAhead = Tiling::kTilesPerStage == 1 && !CacheFormat<Cache>::kFp8 && kProducerThreads == 128;
    if (kMayLookAhead && params.kv.paged() && maps.kv_enabled)
      sm90_producer<Element, kHeadDim, Tiling, Cache, kMayLookAhead, kProducerThreads>(params, maps, shared);
    else
      sm90_producer<Element, kHeadDim, Tiling, Cache, false, kProducerThreads>(params, maps, shared);
  } else {
    ptx::setmaxnreg_inc<kSm90ConsumerRegisters>();
    const bool kv_row_groups = !CacheFormat<Cache>::kFp8 && maps.kv_row_groups;
    sm90_consumer<Element, kHeadDim, Tiling, Cache, sm90_turns<Tiling>(), sm90_marks_last_fill<Tiling, kProducerThreads>(),
                  sm90_value_barriers<Tiling, kProducerThreads>(), sm90_descriptor_cursor<kProducerThreads>()>(
        params, maps, shared, kv_row_groups);
  }
#else
  __trap();  // built for a target without wgmma: the host never launches it there
#endif
}

}  // namespace blocksparse_attn
