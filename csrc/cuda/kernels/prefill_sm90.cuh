// Block-sparse flash-attention forward for Hopper (sm_90a): wgmma on warp-group tiles, a producer
// warp group that feeds a shared-memory ring completed on mbarriers, two consumer warp groups.
//
// Work unit = one (sequence, 128-row query tile, q head) of the plan kernel's list; the grid is
// persistent (one CTA per SM) and each CTA's producer claims units from a counter. Warp group 0
// brings Q and the K/V tiles: through the TMA for Q and whole tiles of contiguous K/V, with cp.async
// for a sequence's last partial tile and the paged cache (zero-filled past the sequence, so unwritten
// cache slots never reach P.V); warp groups 1 and 2 each own 64 query rows. Sparse blocks are
// multiples of 64 tokens, so each consumer's rows lie in one query block: the producer walks the
// union of the two blocks' visible key tiles and tells each consumer, per stage, whether it sees the
// tile and whether it needs the element mask.
//
// Per stage and consumer: S = Q K^T (wgmma, both operands in shared memory, K-major), online softmax
// in registers, O += P V (wgmma, P from registers in the accumulator layout, V MN-major); the P.V
// of one tile overlaps the softmax of the next.
// Torch-free: compiled by bare nvcc in CI. Built only for sm_90a; other targets compile a stub.
//
// Measured (H100 SXM, 8k x 4, Phi-3-small, bf16; scripts/device_prefill_stages.sh), each step:
// 2.46 ms first version (the sm80 kernel: 3.7 ms); 2.42 ms planning sequence by sequence (DRAM
// traffic 3 GB -> 0.4 GB per call, less gain than expected: the kernel was not memory bound); 2.39 ms
// publishing fills before waiting for free stages; 2.28 ms folding the softmax scale into the
// exponent; 2.04 ms with 32-bit descriptor steps and a division-free producer visibility test
// (issue-bound: instructions between wgmmas and in the producer cost time directly); 1.93 -> 1.86 ms
// persistent CTAs (same build, one CTA per unit vs one per SM); 1.61 ms with warp-uniform stage
// records (the wgmma descriptors left vector registers: 80 -> 2 R2UR) and the conditional O
// rescale; 1.53 ms with unclamped zero-fill copies; 1.49 ms with K/V tiles and Q through the TMA
// (fills without cp.async published at issue); S and P.V issued before the record is read (32k: 3.14
// -> 3.00 ms); 1.45-1.47 ms with each unit resolved once by the producer; 1.467 -> 1.45 ms with the
// row maxima and sums as trees. 128-key stages: slower on sparse rows (2.04-3.4 ms early on; 1.59 ms
// against 1.45 since the trees), faster on long dense ones (Sm90Tiling). Tried and not kept: 3 or 5
// stages, FA3's ping-pong between the consumer groups, Q in registers for S, the P.V wait kept
// after the exponentials (see the consumer loop), skipping the tiles a group
// does not see at a unit's edges (the groups fall out of lockstep: 2 % slower), O stored through
// the TMA (no change). The card runs this kernel at its power cap. Since the reduction trees,
// variants are compared interleaved (scripts/device_ab.sh): measured one after the other, the first
// had a ~2 % advantage from the clock drift. Also not kept (interleaved): the next unit's first S
// issued before the epilogue (1.475 ms), one-round-trip unit starts (1.454 ms), every 2nd or 4th
// exponential as a polynomial on the FMA pipe (1.59 / 1.55 ms), skipping the row maxima's shuffles
// on a warp vote (1.477 against 1.467 ms), one producer warp (same), K and V rings of their own for
// 64-key fills (1.485 against 1.461 ms), the unit's last fill flagged instead of an end record
// (1.511 against 1.461 ms, although it removes an S wgmma per unit), V completing on a barrier of
// its own (1.469 against 1.459 ms), thread 0 prefetching the next tiles into L2 (1.93 ms). The two
// sides apart (measurement builds): the fills alone 0.99 ms, the consumers alone 1.33 ms.
#pragma once

#include <cuda_bf16.h>
#include <cuda.h>  // CUtensorMap (the types only: the encoder is fetched through the runtime)
#include <cudaTypedefs.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cuda/kernels/prefill_common.cuh"
#include "cuda/kernels/params.h"
#include "cuda/kernels/ptx_sm90.cuh"

namespace blocksparse_attn {

// K and V come in fills of kBlockN keys (kTilesPerStage 64-key tiles of the visible list, not
// necessarily adjacent): fill n takes key slot n % kKeySlots and value slot n % kValueSlots. Two
// shapes; the host picks one per call (choose_sm90_stage_keys):
// - 64-key fills in 4 shared stages (K and V of a fill in slots of the same index, freed together
//   after P.V) and two Q buffers (the producer loads the next unit's Q while the consumers finish
//   the current one): the best for sparse patterns, whose units are short (8k x 4, Phi-3-small:
//   1.45 ms; 1.50 ms with the 128-key shape below).
// - 128-key fills with rings of their own for K (2 slots, each freed once S is done) and V (3
//   slots, freed after P.V), as FA3 pipelines them: the producer runs as far ahead as with 3 shared
//   stages, and the 64 KB saved hold a second Q buffer (224 KB in all at head dim 128). Half the
//   per-tile bookkeeping and n = 128 wgmmas for S: the better shape when every causal block is
//   visible (dense 2k x 16: 1.12 ms against 1.15 ms; with 3 shared stages and one Q buffer it lost
//   there, 1.25 ms, and on Phi-3-small, 1.60 ms).
// Build-time knobs for experiments.
#ifndef BSA_SM90_STAGES
#define BSA_SM90_STAGES 4
#endif
#ifndef BSA_SM90_LOADS_IN_FLIGHT
#define BSA_SM90_LOADS_IN_FLIGHT 2
#endif
#ifndef BSA_SM90_Q_BUFFERS
#define BSA_SM90_Q_BUFFERS 2
#endif
#ifndef BSA_SM90_K128_KEY_SLOTS
#define BSA_SM90_K128_KEY_SLOTS 2
#endif
#ifndef BSA_SM90_K128_VALUE_SLOTS
#define BSA_SM90_K128_VALUE_SLOTS 3
#endif
#ifndef BSA_SM90_K128_Q_BUFFERS
#define BSA_SM90_K128_Q_BUFFERS 2
#endif
// The key and value slots of one fill.
struct Sm90Fill {
  int key_slot;
  int value_slot;
};

template <int kTilesPerStage_, int kKeySlots_, int kValueSlots_, int kQBuffers_, int kLoadsInFlight_>
struct Sm90TilingShape {
  static constexpr int kTilesPerStage = kTilesPerStage_;
  static constexpr int kBlockN = 64 * kTilesPerStage;  // keys per fill
  static constexpr int kKeySlots = kKeySlots_;
  static constexpr int kValueSlots = kValueSlots_;
  // Equal rings are one ring of shared stages: a key slot is freed with its value slot.
  static constexpr bool kSplitRings = kKeySlots != kValueSlots;
  static constexpr int kQBuffers = kQBuffers_;
  static constexpr int kLoadsInFlight = kLoadsInFlight_;  // cp.async groups the producer keeps outstanding
  static_assert(kQBuffers == 1 || kQBuffers == 2, "one or two Q buffers");
  // The producer publishes fill m (cp.async path) at the top of fill m + L, before it waits for the
  // slots of fill m + L. A consumer frees value slot m after P.V m, which it issues once fill m + 1
  // is published, so kValueSlots >= L + 1; with split rings it frees key slot m after S m, which
  // needs fill m published, so kKeySlots >= L. Fill m's `early` bit (m % kKeySlots) is cleared at
  // fill m + L, before fill m + kKeySlots sets it again.
  static_assert(kLoadsInFlight >= 1 && kLoadsInFlight + 1 <= kValueSlots && kLoadsInFlight <= kKeySlots,
                "the producer must publish a fill before it waits for the consumers to free its slots");
  static_assert(kSplitRings || kKeySlots == kValueSlots, "shared stages need equal rings");
  // The slots of fill n.
  __device__ static Sm90Fill fill(int n) { return {n % kKeySlots, n % kValueSlots}; }
};
template <int kStageKeys>
struct Sm90Tiling;
template <>
struct Sm90Tiling<64>
    : Sm90TilingShape<1, BSA_SM90_STAGES, BSA_SM90_STAGES, BSA_SM90_Q_BUFFERS, BSA_SM90_LOADS_IN_FLIGHT> {};
template <>
struct Sm90Tiling<128>
    : Sm90TilingShape<2, BSA_SM90_K128_KEY_SLOTS, BSA_SM90_K128_VALUE_SLOTS, BSA_SM90_K128_Q_BUFFERS, 2> {};

constexpr int kSm90ConsumerGroups = kPrefillSm90BlockM / 64;
constexpr int kSm90Threads = 128 * (1 + kSm90ConsumerGroups);
// Register split between the producer (addresses, the tile cursor) and the consumers (O, S and P):
// the whole pool, 104 + 2 x 200 = 3 x 168 (the split rings' producer spilled at 96; 96 or 104 made
// no measurable difference to the 64-key shape: 1.461 / 1.453 ms at 8k). setmaxnreg.inc blocks
// until the registers it asks for are free in the CTA's pool, which holds what the launch allocated
// (65536 / threads per thread, in steps of 8): a split beyond it hangs. Both sides fit without
// spills here (ptxas -v).
constexpr int kSm90ProducerRegisters = 104;
constexpr int kSm90ConsumerRegisters = 200;
static_assert(kSm90ProducerRegisters + kSm90ConsumerGroups * kSm90ConsumerRegisters <=
                  (1 + kSm90ConsumerGroups) * (65536 / kSm90Threads / 8 * 8),
              "the register split exceeds the CTA's pool");
// Named barriers (0 is __syncthreads): each consumer group's epilogue, the producer's broadcast of
// a claimed unit.
constexpr int kSm90EpilogueBarrier = 1;   // + group
constexpr int kSm90ClaimBarrier = 3;

// How far (log2 units) a row's running maximum may lag the true one: P <= 2^8, exact in fp16 and
// bf16, and O and the row sum stay far from overflow in fp32.
constexpr float kSm90MaxSlack = 8.f;

// Per-stage flags for one consumer warp group.
constexpr uint8_t kTileVisible = 1;  // the group's query block sees this key tile
constexpr uint8_t kTileMasked = 2;   // ... and some (row, key) pairs are causal or past the keys

// Shared memory: operand tiles of kRows rows x kHeadDim, stored as 64-column blocks of kRows rows x
// 128 B with the 128-byte swizzle (the layout wgmma reads), every tile 1024-byte aligned. Q has
// Tiling::kQBuffers buffers (consecutive work units of a CTA alternate between two), each one 64-row
// tile per consumer group; K and V slots have Tiling::kBlockN rows.
template <int kHeadDim, typename Tiling>
struct Sm90Smem {
  static constexpr int kQTileBytes = kHeadDim / 64 * 64 * 128;
  static constexpr int kQBufferBytes = kSm90ConsumerGroups * kQTileBytes;
  static constexpr int kStageColumnBlockBytes = Tiling::kBlockN * 128;
  static constexpr int kStageBytes = kHeadDim / 64 * kStageColumnBlockBytes;
  static constexpr int kQOffset = 0;  // reused to stage O
  static constexpr int kKOffset = kQOffset + Tiling::kQBuffers * kQBufferBytes;
  static constexpr int kVOffset = kKOffset + Tiling::kKeySlots * kStageBytes;
  static constexpr int kBarrierOffset = kVOffset + Tiling::kValueSlots * kStageBytes;
  // full[key slots] (a fill's K, V, record and Q complete on its key slot's), value_empty[value
  // slots] (with shared stages: each stage's release), key_empty[key slots] (split rings only),
  // q_empty[Q buffers]; then the producer's claimed units (two slots), each Q buffer's resolved work
  // unit, the fill records (one per key slot)
  static constexpr int kKeyEmptyBarriers = Tiling::kSplitRings ? Tiling::kKeySlots : 0;
  static constexpr int kClaimOffset =
      kBarrierOffset + 8 * (Tiling::kKeySlots + Tiling::kValueSlots + kKeyEmptyBarriers + Tiling::kQBuffers);
  static constexpr int kItemOffset = kClaimOffset + 8;
  static constexpr int kRecordOffset = (kItemOffset + Tiling::kQBuffers * sizeof(PrefillItem) + 15) / 16 * 16;
  static constexpr int kBytes = kRecordOffset + 16 * Tiling::kKeySlots + 1024;  // + slack to align the base
  static_assert(kBytes <= 227 * 1024, "more shared memory than a CTA may have");
};

// What the producer tells the consumers about a filled stage: the work unit it belongs to (-1: no
// more work, the CTA's last fill), per 64-key slot the key tile (absolute positions key_tile * 64 ...;
// -1 for an empty slot) and each consumer group's flags. A record whose first slot is empty ends
// the unit's list; the first fill of a unit also carries its Q.
template <int kTilesPerStage>
struct Sm90StageRecord {
  int32_t unit;
  int32_t key_tile[kTilesPerStage];
  uint8_t flags[kSm90ConsumerGroups][kTilesPerStage];
};
static_assert(sizeof(Sm90StageRecord<2>) <= 16, "stage records have 16 bytes each");

// Byte offset of (row, col) in a swizzled tile of kRows rows.
template <int kRows>
__device__ __forceinline__ int sm90_tile_offset(int row, int col) {
  return (col >> 6) * (kRows * 128) + row * 128 + ((((col & 63) >> 3) ^ (row & 7)) << 4) + (col & 7) * 2;
}

// Reduces x[0..n) pairwise, log2(n) dependent steps deep (n a power of two); overwrites x. One
// template level per step: with a runtime halving loop nvcc kept 16-element arrays in local memory.
template <int kWidth, int kCount, typename Op>
__device__ __forceinline__ void reduce_tree_step(float (&x)[kCount], Op op) {
#pragma unroll
  for (int j = 0; j < kWidth; ++j) x[j] = op(x[j], x[j + kWidth]);
  if constexpr (kWidth > 1) reduce_tree_step<kWidth / 2>(x, op);
}
template <int kCount, typename Op>
__device__ __forceinline__ float reduce_tree(float (&x)[kCount], Op op) {
  static_assert(kCount >= 2 && (kCount & (kCount - 1)) == 0, "a power of two");
  reduce_tree_step<kCount / 2>(x, op);
  return x[0];
}

// Enumerates, identically in every producer thread, the 64-key tiles that the query blocks of a
// 128-row tile see: for the pattern, the vertical columns below the first block's band, then the
// band up to the last block; for a layout, the merge of the two CSR rows. Sparse blocks are multiples
// of 64 tokens, so a 128-row tile touches one or two query blocks.
struct Sm90KeyTileCursor {
  const SparsePattern* p;
  int head;
  int qb_first, qb_last;
  int last_pos;         // the tile's last valid query position: later key tiles are never visible
  int tiles_per_block;  // B / 64
  int block;            // pattern: the next key block to visit; layout: unused
  int band_start;
  int entry[2], entry_end[2];  // layout: positions in the two rows
  int sub;                     // next 64-key tile inside the current block
  int current;                 // the key block of the last tile returned, -1 before the first

  __device__ void init(const SparsePattern& pattern, int h, int first_pos, int last_valid_pos) {
    p = &pattern;
    head = h;
    qb_first = first_pos / pattern.block_size;
    qb_last = last_valid_pos / pattern.block_size;
    last_pos = last_valid_pos;
    tiles_per_block = pattern.block_size / 64;
    sub = 0;
    current = -1;
    band_start = 0;
    if (pattern.has_layout()) {
      const int32_t* crow = pattern.layout_crow + static_cast<int64_t>(h) * (pattern.layout_rows + 1);
      const int rows[2] = {qb_first, qb_last};
      for (int r = 0; r < 2; ++r) {
        const bool covered = rows[r] < pattern.layout_rows && (r == 0 || qb_last != qb_first);
        entry[r] = covered ? crow[rows[r]] : 0;
        entry_end[r] = covered ? crow[rows[r] + 1] : 0;
      }
    } else {
      band_start = max(qb_first - pattern.local_blocks + 1, 0);
      const int rho = vertical_residue(pattern, h);
      block = rho < band_start ? rho : band_start;
    }
  }

  // The next key block of the union, or -1.
  __device__ int next_block() {
    if (p->has_layout()) {
      const int32_t* col = p->layout_col + static_cast<int64_t>(head) * p->layout_col_stride;
      const int a = entry[0] < entry_end[0] ? col[entry[0]] : INT32_MAX;
      const int b = entry[1] < entry_end[1] ? col[entry[1]] : INT32_MAX;
      const int j = min(a, b);
      if (j == INT32_MAX) return -1;
      if (a == j) ++entry[0];
      if (b == j) ++entry[1];
      return j;
    }
    if (block > qb_last) return -1;
    const int j = block;
    if (block < band_start) {
      block += p->vert_stride;
      if (block >= band_start) block = band_start;
    } else {
      ++block;
    }
    return j;
  }

  // The next key tile of the union, or false at the end.
  __device__ bool next(int& key_tile) {
    while (true) {
      if (current < 0 || sub == tiles_per_block) {
        current = next_block();
        sub = 0;
        if (current < 0) return false;
      }
      const int tile = current * tiles_per_block + sub++;
      if (tile * 64 > last_pos) {  // the rest of this block lies after every query of the tile
        sub = tiles_per_block;
        continue;
      }
      key_tile = tile;
      return true;
    }
  }
};

// TMA descriptors of Q ([T, Hq, D]) and of contiguous K and V ([Tk, Hkv, D]), any row and head
// strides: 3-D maps (head dim, head, token) read in boxes of 64 x 1 x 64 with the 128-byte swizzle,
// i.e. one 64-column block of a 64-row tile in the layout wgmma reads. A flag is 0 where the host
// could not build the maps (paged cache, strides the TMA cannot express): the producer then copies
// with cp.async.
struct Sm90TensorMaps {
  CUtensorMap query;
  CUtensorMap key;
  CUtensorMap value;
  int query_enabled;
  int kv_enabled;
};

template <typename Element, int kHeadDim, typename Tiling>
__global__ void __launch_bounds__(kSm90Threads, 1)
    prefill_sm90_kernel(const PrefillParams params, const __grid_constant__ Sm90TensorMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Smem = Sm90Smem<kHeadDim, Tiling>;
  constexpr int kKeySlots = Tiling::kKeySlots;
  constexpr int kValueSlots = Tiling::kValueSlots;
  constexpr int kSlots = Tiling::kTilesPerStage;
  extern __shared__ unsigned char smem_unaligned[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_unaligned) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Smem::kBarrierOffset);
  uint64_t* value_empty = full + kKeySlots;
  uint64_t* key_empty = value_empty + kValueSlots;  // split rings only
  uint64_t* q_empty = key_empty + Smem::kKeyEmptyBarriers;
  int32_t* claimed = reinterpret_cast<int32_t*>(smem + Smem::kClaimOffset);
  // The producer resolves each unit (a chain of dependent global loads) and leaves it next to the
  // unit's Q buffer, published with the unit's first fill: the consumers start without the loads.
  PrefillItem* items = reinterpret_cast<PrefillItem*>(smem + Smem::kItemOffset);
  using StageRecord = Sm90StageRecord<Tiling::kTilesPerStage>;
  StageRecord* records = reinterpret_cast<StageRecord*>(smem + Smem::kRecordOffset);

  const int tid = threadIdx.x;
  const int head_size = params.head_size;
  const KeyValueSource& kv = params.kv;

  if (tid == 0) {
    for (int s = 0; s < kKeySlots; ++s) ptx::mbarrier_init(&full[s], 128);  // every producer thread arrives
    // every consumer thread arrives
    for (int s = 0; s < kValueSlots; ++s) ptx::mbarrier_init(&value_empty[s], 128 * kSm90ConsumerGroups);
    for (int s = 0; s < Smem::kKeyEmptyBarriers; ++s) ptx::mbarrier_init(&key_empty[s], 128 * kSm90ConsumerGroups);
    for (int b = 0; b < Tiling::kQBuffers; ++b) ptx::mbarrier_init(&q_empty[b], 128 * kSm90ConsumerGroups);
    ptx::mbarrier_init_fence();
  }
  __syncthreads();

  // The CTA is persistent: its producer claims work units (plan item * Hq + head) from a counter
  // until none is left, and streams each unit's fills through the same ring; the consumers follow
  // the records. Units differ in length (sparse rows, varlen), so claiming beats a static split.
  if (tid < 128) {
    // ---------------------------------------------------------------- producer warp group
    ptx::setmaxnreg_dec<kSm90ProducerRegisters>();
    constexpr int kChunksPerRow = kHeadDim / 8;
    constexpr int kRowStep = 128 / kChunksPerRow;
    const int chunk = tid % kChunksPerRow, col = chunk * 8;
    const int row0 = tid / kChunksPerRow;
    const bool col_valid = col < head_size;
    const Element* q = static_cast<const Element*>(params.q);
    const Element* key = static_cast<const Element*>(kv.key);
    const Element* value = static_cast<const Element*>(kv.value);
    const SparsePattern& pattern = params.pattern;

    // Fill n is published (fence for the wgmma reads, then arrive) at the top of fill n + L, BEFORE
    // the wait for free slots: publication never waits on the consumers, so a consumer never idles
    // on a fill that has landed (publishing after that wait cost 30 % with the overlapped consumer).
    // A fill without cp.async copies (TMA only, or an end record) is published as soon as it is
    // issued: the TMA's bytes complete on the barrier by themselves. `early` marks such fills (bit
    // fill % kKeySlots, see Sm90TilingShape) so the in-order publication skips them.
    int n = 0, next_publish = 0;
    uint32_t early = 0;
    auto publish = [&](int fill) {
      const uint32_t bit = 1u << (fill % kKeySlots);
      if (early & bit) {
        early &= ~bit;
        return;
      }
      ptx::fence_proxy_async_shared();
      ptx::mbarrier_arrive(&full[fill % kKeySlots]);
    };
    auto begin_fill = [&] {
      if (n - Tiling::kLoadsInFlight >= next_publish) {
        ptx::cp_async_wait<Tiling::kLoadsInFlight - 1>();  // fills up to n - kLoadsInFlight have landed
        publish(next_publish++);
      }
      const Sm90Fill fill = Tiling::fill(n);
      if constexpr (Tiling::kSplitRings) {
        if (n >= kKeySlots) ptx::mbarrier_wait(&key_empty[fill.key_slot], ((n / kKeySlots) + 1) & 1);
      }
      if (n >= kValueSlots) ptx::mbarrier_wait(&value_empty[fill.value_slot], ((n / kValueSlots) + 1) & 1);
      return fill;
    };

    // Thread 0 claims unit k + 1 when unit k starts, so the atomic's latency passes while it issues
    // unit k's fills; it stores the claim for the other producer threads when unit k + 1 starts.
    int next_claim = tid == 0 ? atomicAdd(params.work_counter, 1) : 0;
    int previous_unit_first_fill = 0;
    for (int k = 0;; ++k) {
      if (tid == 0) claimed[k & 1] = next_claim;
      ptx::named_barrier_sync(kSm90ClaimBarrier, 128);
      const int unit = claimed[k & 1];
      if (tid == 0) next_claim = atomicAdd(params.work_counter, 1);
      PrefillItem it;
      if (!load_prefill_item(params, kPrefillSm90BlockM, unit, it)) {
        const Sm90Fill fill = begin_fill();  // the last fill: a record without work
        if (tid == 0) {
          records[fill.key_slot].unit = -1;
          records[fill.key_slot].key_tile[0] = -1;
        }
        ptx::cp_async_wait<0>();
        while (next_publish <= n) publish(next_publish++);
        break;
      }
      const int seq = it.seq, head = it.head, kv_head = it.kv_head, k_len = it.k_len;
      const int tile_pos = it.tile_pos, valid_begin = it.valid_begin, valid_end = it.valid_end;

      // Q: 128 rows; rows outside [valid_begin, valid_end) are zeros (never stored). The loads join
      // the unit's first fill, whose publication covers them. The buffer was last read by unit
      // k - Tiling::kQBuffers, whose consumers release it only after all its fills, so those must
      // be published first: with one buffer that is every fill so far; with two, the fills before
      // unit k - 1's first. Those are normally out already (L fills back), but not when unit k - 1
      // has fewer than L fills and unit k - 2's last one carries cp.async copies (units without
      // key tiles, Q through cp.async), so the wait below would never end.
      const int buf = k % Tiling::kQBuffers;
      if (k >= Tiling::kQBuffers) {
        const int needed = Tiling::kQBuffers == 1 ? n : previous_unit_first_fill;
        if (next_publish < needed) {
          ptx::cp_async_wait<0>();
          while (next_publish < needed) publish(next_publish++);
        }
        ptx::mbarrier_wait(&q_empty[buf], ((k / Tiling::kQBuffers) + 1) & 1);
      }
      previous_unit_first_fill = n;
      if (tid == 0) items[buf] = it;
      // Through the TMA (one thread, issued with the unit's first fill below), Q rows outside the
      // item are other rows of the tensor or zeros: they only ever feed their own, unstored output
      // rows. The cp.async path zero-fills them.
      unsigned char* s_q_buf = smem + Smem::kQOffset + buf * Smem::kQBufferBytes;
      if (!maps.query_enabled) {
#pragma unroll
        for (int row = row0; row < kPrefillSm90BlockM; row += kRowStep) {
          const int pos = tile_pos + row;
          const bool valid = pos >= valid_begin && pos < valid_end && col_valid;
          const Element* src = valid ? q + static_cast<int64_t>(it.q_begin + pos - it.first_pos) * params.q_row_stride +
                                           head * params.q_head_stride + col
                                     : q;
          unsigned char* dst = s_q_buf + (row >> 6) * Smem::kQTileBytes + sm90_tile_offset<64>(row & 63, col);
          ptx::cp_async_16(dst, src, valid);
        }
      }

      // K and V of one 64-key tile into tile `slot` of a fill; keys past k_len, bad page ids and
      // empty slots (key_tile < 0) read as zeros. True when it issued cp.async copies.
      auto load_kv = [&](int key_tile, const Sm90Fill& fill, int slot) -> bool {
        const int pos0 = key_tile * 64;
        unsigned char* dst_k = smem + Smem::kKOffset + fill.key_slot * Smem::kStageBytes;
        unsigned char* dst_v = smem + Smem::kVOffset + fill.value_slot * Smem::kStageBytes;
        uint64_t* const landed = &full[fill.key_slot];
        if (!kv.paged()) {
          // Whole tiles of the sequence come through the TMA (one thread issues them; the copies
          // complete on the fill's full barrier). Rows past the sequence's end would read the next
          // sequence's keys, which may hold anything: the last partial tile takes the zero-filling
          // copies below.
          if (maps.kv_enabled && key_tile >= 0 && pos0 + 64 <= k_len) {
            if (tid == 0) {
              constexpr uint32_t kBoxBytes = 64 * 128;
              ptx::mbarrier_expect_tx(landed, 2 * (kHeadDim / 64) * kBoxBytes);
              const int token = kv.cu_seqlens_k[seq] + pos0;
#pragma unroll
              for (int block = 0; block < kHeadDim / 64; ++block) {
                const int dst = block * Smem::kStageColumnBlockBytes + slot * 64 * 128;
                ptx::tma_load_3d(dst_k + dst, &maps.key, block * 64, kv_head, token, landed);
                ptx::tma_load_3d(dst_v + dst, &maps.value, block * 64, kv_head, token, landed);
              }
            }
            return false;
          }
          const int64_t base = static_cast<int64_t>(kv.cu_seqlens_k[seq] + pos0 + row0) * kv.row_stride +
                               kv_head * kv.head_stride + col;
          const int64_t step = kRowStep * kv.row_stride;
#pragma unroll
          for (int u = 0; u < 64 / kRowStep; ++u) {
            const int row = row0 + u * kRowStep;
            const bool valid = key_tile >= 0 && pos0 + row < k_len && col_valid;
            const int64_t offset = base + u * step;
            const int dst = sm90_tile_offset<Tiling::kBlockN>(slot * 64 + row, col);
            // An invalid row reads nothing (source size 0): its address needs no clamp (SASS: four
            // selects per pair of copies fewer).
            ptx::cp_async_16(dst_k + dst, key + offset, valid);
            ptx::cp_async_16(dst_v + dst, value + offset, valid);
          }
          return true;
        }
#pragma unroll
        for (int u = 0; u < 64 / kRowStep; ++u) {
          const int row = row0 + u * kRowStep;
          const int pos = pos0 + row;
          bool valid = key_tile >= 0 && pos < k_len && col_valid;
          int64_t offset = 0;
          if (valid) {
            const int page = kv.block_tables[seq * kv.block_table_stride + pos / kv.kv_block_size];
            valid = page >= 0 && page < kv.num_cache_blocks;
            offset = page * kv.cache_block_stride + kv_head * kv.cache_head_stride +
                     static_cast<int64_t>(pos % kv.kv_block_size) * head_size + col;
          }
          const int dst = sm90_tile_offset<Tiling::kBlockN>(slot * 64 + row, col);
          ptx::cp_async_16(dst_k + dst, valid ? key + offset : key, valid);
          ptx::cp_async_16(dst_v + dst, valid ? value + offset : value, valid);
        }
        return true;
      };

      // Each consumer group's valid rows (absolute positions) and query block, computed once per
      // unit: the per-tile test below is integer-division free for the pattern (the producer's
      // instructions share the issue slots with the consumers').
      int group_lo[kSm90ConsumerGroups], group_hi[kSm90ConsumerGroups], group_qb[kSm90ConsumerGroups];
#pragma unroll
      for (int g = 0; g < kSm90ConsumerGroups; ++g) {
        group_lo[g] = max(valid_begin, tile_pos + 64 * g);
        group_hi[g] = min(valid_end, tile_pos + 64 * g + 64) - 1;
        group_qb[g] = group_lo[g] / pattern.block_size;
      }
      const int vertical_off = pattern.has_layout() ? 0 : vertical_offset(pattern, head);
      Sm90KeyTileCursor cursor;
      cursor.init(pattern, head, valid_begin, valid_end - 1);
      const bool band_start_vertical =
          !pattern.has_layout() && (cursor.band_start + vertical_off) % pattern.vert_stride == 0;
      // The next key tile some consumer group sees, with the groups' flags; false at the end.
      auto next_tile = [&](int& key_tile, uint8_t (&flags)[kSm90ConsumerGroups]) {
        while (cursor.next(key_tile)) {
          const int key_first = key_tile * 64, key_last = key_first + 63;
          const int j = cursor.current;  // the tile's key block
          // The cursor reaches blocks below the band only through the vertical columns; inside the
          // band every block is local to the first query block, and only the band's first block
          // can be out of the second one's window (local_blocks behind it).
          const bool vertical = j < cursor.band_start || (j == cursor.band_start && band_start_vertical);
          bool any = false;
#pragma unroll
          for (int g = 0; g < kSm90ConsumerGroups; ++g) {
            flags[g] = 0;
            const int qb = group_qb[g];
            if (group_lo[g] > group_hi[g] || key_first > group_hi[g] || j > qb) continue;
            const bool visible = pattern.has_layout() ? block_visible(pattern, head, qb, j)
                                                      : qb - j < pattern.local_blocks || vertical;
            if (!visible) continue;
            flags[g] = kTileVisible | (key_last > group_lo[g] || key_last >= k_len ? kTileMasked : 0);
            any = true;
          }
          if (any) return true;
        }
        key_tile = -1;
        return false;
      };

      // The unit's fills, the last one its end record (first slot empty).
      bool more = true;
      bool copies = !maps.query_enabled;  // the first fill carries the unit's Q
      bool query_pending = maps.query_enabled;
      for (;; ++n) {
        const Sm90Fill fill = begin_fill();
        const int key_slot = fill.key_slot;  // the fill's full barrier and record
        if (query_pending) {
          query_pending = false;
          if (tid == 0) {
            ptx::mbarrier_expect_tx(&full[key_slot], kPrefillSm90BlockM * kHeadDim * sizeof(Element));
#pragma unroll
            for (int g = 0; g < kSm90ConsumerGroups; ++g)
#pragma unroll
              for (int block = 0; block < kHeadDim / 64; ++block)
                ptx::tma_load_3d(s_q_buf + g * Smem::kQTileBytes + block * 64 * 128, &maps.query, block * 64, head,
                                 it.q_begin + tile_pos + 64 * g - it.first_pos, &full[key_slot]);
          }
        }
        int first_tile = -1;
#pragma unroll
        for (int slot = 0; slot < kSlots; ++slot) {
          int key_tile = -1;
          uint8_t flags[kSm90ConsumerGroups] = {};
          if (more) more = next_tile(key_tile, flags);
          if (slot == 0) first_tile = key_tile;
          if (key_tile >= 0 || (slot > 0 && first_tile >= 0)) copies |= load_kv(key_tile, fill, slot);  // empty: zeros
          if (tid == 0) {
            records[key_slot].key_tile[slot] = key_tile;
#pragma unroll
            for (int g = 0; g < kSm90ConsumerGroups; ++g) records[key_slot].flags[g][slot] = flags[g];
          }
        }
        if (tid == 0) records[key_slot].unit = unit;
        ptx::cp_async_commit();
        if (!copies) {
          ptx::mbarrier_arrive(&full[key_slot]);
          early |= 1u << (n % kKeySlots);
        }
        copies = false;
        if (first_tile < 0) {
          ++n;
          break;
        }
      }
    }
  } else {
    // ---------------------------------------------------------------- consumer warp groups
    ptx::setmaxnreg_inc<kSm90ConsumerRegisters>();
    using MmaS = ptx::Wgmma<Element, Tiling::kBlockN>;
    using MmaO = ptx::Wgmma<Element, kHeadDim>;
    constexpr int kSRegs = Tiling::kBlockN / 2;  // S accumulators per thread: 64 rows x kBlockN keys / 128
    constexpr int kORegs = kHeadDim / 2;
    // Values the compiler can prove warp-uniform (a lane-0 broadcast) keep the slot indices and the
    // wgmma descriptors in uniform registers: otherwise every wgmma is preceded by register-to-
    // uniform moves and address arithmetic (SASS: ~70 instructions per tile).
    auto uniform = [](int x) { return __shfl_sync(0xffffffffu, x, 0); };
    const int group = uniform(tid / 128) - 1;
    const int t = tid % 128, warp = t / 32, lane = t % 32;
    const int quad_row = lane / 4, tig = lane % 4;
    // Descriptor steps (16-byte units): K-major operands advance 32 B per 16 columns inside a
    // 64-column block, then a whole block; V (MN-major) advances 16 rows of 128 B per 16 keys.
    auto q_step = [](int ks) { return static_cast<uint32_t>((ks & 3) * 32 + (ks >> 2) * 64 * 128); };
    auto k_step = [](int ks) { return static_cast<uint32_t>((ks & 3) * 32 + (ks >> 2) * Smem::kStageColumnBlockBytes); };

    struct StageInfo {
      Sm90Fill fill;
      int unit;
      int tile[kSlots];
      uint8_t flags[kSlots];
      bool end;
    };
    auto wait_fill = [&](int n) {
      const Sm90Fill fill = Tiling::fill(n);
      ptx::mbarrier_wait(&full[fill.key_slot], (n / kKeySlots) & 1);
      return fill;
    };
    auto read_record = [&](const Sm90Fill& fill) {
      StageInfo info;
      info.fill = fill;
      const StageRecord& record = records[fill.key_slot];
      info.unit = uniform(record.unit);
#pragma unroll
      for (int slot = 0; slot < kSlots; ++slot) {
        info.tile[slot] = uniform(record.key_tile[slot]);
        info.flags[slot] = static_cast<uint8_t>(uniform(record.flags[group][slot]));
      }
      info.end = info.tile[0] < 0;
      return info;
    };
    // Every thread arrives after its own reads of the slot (a key slot's record included): one
    // arrival per warp after __syncwarp is also correct, but compute-sanitizer's racecheck cannot
    // see it. With split rings a key slot is freed once S is done; a value slot (with shared stages,
    // the whole stage) after P.V.
    auto release_key = [&](const Sm90Fill& fill) {
      if constexpr (Tiling::kSplitRings) ptx::mbarrier_arrive(&key_empty[fill.key_slot]);
    };
    auto release_value = [&](const Sm90Fill& fill) { ptx::mbarrier_arrive(&value_empty[fill.value_slot]); };

    int n = 0;
    for (int k = 0;; ++k) {
      StageInfo info = read_record(wait_fill(n));  // the unit's first fill, which also brought its Q
      if (info.unit < 0) break;
      const int buf = k % Tiling::kQBuffers;
      const PrefillItem it = items[buf];
      const int group_pos = it.tile_pos + 64 * group;
      const int row_pos[2] = {group_pos + warp * 16 + quad_row, group_pos + warp * 16 + quad_row + 8};
      const int k_len = it.k_len;
      unsigned char* s_q = smem + Smem::kQOffset + buf * Smem::kQBufferBytes + group * Smem::kQTileBytes;
      const ptx::SmemDescriptor desc_q = ptx::smem_descriptor_sw128(s_q, 16);

      float acc_o[kORegs];
#pragma unroll
      for (int i = 0; i < kORegs; ++i) acc_o[i] = 0.f;
      float row_max[2] = {-INFINITY, -INFINITY};
      float row_sum[2] = {0.f, 0.f};
      uint32_t p_frag[Tiling::kBlockN / 16][4];

      auto issue_s = [&](float (&s)[kSRegs], const Sm90Fill& fill) {
        const unsigned char* s_k = smem + Smem::kKOffset + fill.key_slot * Smem::kStageBytes;
        const ptx::SmemDescriptor desc_k = ptx::smem_descriptor_sw128(s_k, 16);
        ptx::wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kHeadDim / 16; ++ks) MmaS::ss(s, desc_q.at(q_step(ks)), desc_k.at(k_step(ks)), ks > 0);
        ptx::wgmma_commit();
      };
      auto issue_pv = [&](const Sm90Fill& fill) {
        const unsigned char* s_v = smem + Smem::kVOffset + fill.value_slot * Smem::kStageBytes;
        const ptx::SmemDescriptor desc_v = ptx::smem_descriptor_sw128(s_v, Smem::kStageColumnBlockBytes);
        ptx::fence_registers(acc_o);
        ptx::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Tiling::kBlockN / 16; ++kk)
          MmaO::rs_mn_major_b(acc_o, p_frag[kk], desc_v.at(kk * 16 * 128));
        ptx::wgmma_commit();
        ptx::fence_registers(acc_o);
      };
      // Scores -> P with the online softmax (the 4 threads of a quad hold one row's keys), in the
      // log2 domain. s[4j + e]: row row_pos[e / 2], stage column 8j + 2 tig + e % 2 (slot j / 8).
      // Tiles that need no mask (all but the diagonal and the sequence's last) keep S unscaled: the
      // scale folds into the exponent's FFMA. Masked tiles are scaled and masked first (select, never
      // add: garbage K rows may hold NaN). Returns the O rescale factors in row_alpha.
      auto softmax = [&](float (&s)[kSRegs], const StageInfo& stage_info, float (&row_alpha)[2]) {
        bool plain = params.scale_log2 > 0.f;  // max(scale * s) = scale * max(s) needs scale > 0
#pragma unroll
        for (int slot = 0; slot < kSlots; ++slot) plain &= stage_info.flags[slot] == kTileVisible;
        float multiplier = params.scale_log2;
        if (!plain) {
          multiplier = 1.f;
#pragma unroll
          for (int slot = 0; slot < kSlots; ++slot) {
            const uint8_t flags = stage_info.flags[slot];
            const int key_pos0 = stage_info.tile[slot] * 64;
#pragma unroll
            for (int j = slot * 8; j < slot * 8 + 8; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                float x = s[4 * j + e] * params.scale_log2;
                if (!(flags & kTileVisible)) {
                  x = -INFINITY;
                } else if (flags & kTileMasked) {
                  const int key_pos = key_pos0 + 8 * (j - slot * 8) + 2 * tig + (e & 1);
                  if (key_pos > row_pos[e >> 1] || key_pos >= k_len) x = -INFINITY;
                }
                s[4 * j + e] = x;
              }
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          // Row maxima and sums as trees: a chain of 32 dependent operations per row sat on every
          // tile's critical path (8k: 1.467 -> 1.452 ms, interleaved A/B).
          float part[kSRegs / 4];
#pragma unroll
          for (int j = 0; j < kSRegs / 4; ++j) part[j] = fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]);
          float mx = reduce_tree(part, [](float a, float b) { return fmaxf(a, b); });
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
          // The reference moves only when the tile's maximum exceeds it by more than
          // kSm90MaxSlack (FlashAttention-4's conditional rescale): P then stays below
          // 2^kSm90MaxSlack, and O is rescaled a few times per row instead of at most tiles (the
          // sparse rows' tiles are far apart, so their maxima rise often by small steps).
          mx *= multiplier;
          const bool grow = mx > row_max[r] + kSm90MaxSlack;  // a row with nothing seen yet: any finite mx
          const float new_max = grow ? mx : row_max[r];
          const float ref = new_max == -INFINITY ? 0.f : new_max;  // nothing visible yet: avoid inf - inf
          const float alpha = grow ? ptx::exp2_approx(row_max[r] - ref) : 1.f;
          row_max[r] = new_max;
#pragma unroll
          for (int j = 0; j < kSRegs / 4; ++j) {
            s[4 * j + 2 * r] = ptx::exp2_approx(fmaf(s[4 * j + 2 * r], multiplier, -ref));
            s[4 * j + 2 * r + 1] = ptx::exp2_approx(fmaf(s[4 * j + 2 * r + 1], multiplier, -ref));
            part[j] = s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
          }
          const float sum = reduce_tree(part, [](float a, float b) { return a + b; });
          row_sum[r] = row_sum[r] * alpha + sum;
          row_alpha[r] = alpha;
        }
      };
      // P as A fragments (16 keys per P.V k-step; two 8-key accumulator blocks form one fragment),
      // then O scaled by the change of the row maxima (skipped while the maxima hold, the common case).
      auto pack_p_and_rescale_o = [&](const float (&s)[kSRegs], const float (&row_alpha)[2]) {
#pragma unroll
        for (int kk = 0; kk < Tiling::kBlockN / 16; ++kk) {
          p_frag[kk][0] = ptx::pack2<Element>(s[8 * kk + 0], s[8 * kk + 1]);
          p_frag[kk][1] = ptx::pack2<Element>(s[8 * kk + 2], s[8 * kk + 3]);
          p_frag[kk][2] = ptx::pack2<Element>(s[8 * kk + 4], s[8 * kk + 5]);
          p_frag[kk][3] = ptx::pack2<Element>(s[8 * kk + 6], s[8 * kk + 7]);
        }
        if (__any_sync(0xffffffffu, row_alpha[0] != 1.f || row_alpha[1] != 1.f)) {
#pragma unroll
          for (int i = 0; i < kORegs; i += 4) {
            acc_o[i] *= row_alpha[0];
            acc_o[i + 1] *= row_alpha[0];
            acc_o[i + 2] *= row_alpha[1];
            acc_o[i + 3] *= row_alpha[1];
          }
        }
      };

      // Software pipeline (FA3's intra-warpgroup overlap): issue S_n = Q K_n, issue O += P_{n-1}
      // V_{n-1}, wait for S_n, free K_n, softmax, wait for P.V, free V_{n-1}, rescale O. ptxas moves
      // the P.V wait up to the top of the softmax's basic block (SASS: before the row maxima's
      // shuffles), so P.V overlaps the masking only. Pinned after the exponentials (a barrier wait
      // there, or a shared store of the row sums, which ptxas keeps ahead of the wgmma wait) it
      // measured slower: 2 % at 8k x 4, 5-8 % on dense layouts.
      // Every tile of the list goes through both groups (one a group does not see is fully masked):
      // skipping it would put the wgmma issue in data-dependent branches, where ptxas serialises
      // them.
      if (!info.end) {
        {
          float s[kSRegs], row_alpha[2];
          issue_s(s, info.fill);
          ptx::wgmma_wait<0>();
          ptx::fence_registers(s);
          release_key(info.fill);
          softmax(s, info, row_alpha);
          pack_p_and_rescale_o(s, row_alpha);
        }
        Sm90Fill pending = info.fill;
        while (true) {
          // Both products are issued before the fill's record is read (its load and broadcast
          // would delay them): an end record's key slot holds stale keys, whose scores are dropped.
          const Sm90Fill fill = wait_fill(++n);
          float s[kSRegs], row_alpha[2];
          issue_s(s, fill);
          issue_pv(pending);
          info = read_record(fill);
          ptx::wgmma_wait<1>();  // S is done; P.V may still run
          ptx::fence_registers(s);
          release_key(fill);
          if (info.end) {
            ptx::wgmma_wait<0>();
            ptx::fence_registers(acc_o);
            release_value(pending);
            break;
          }
          softmax(s, info, row_alpha);
          ptx::wgmma_wait<0>();
          ptx::fence_registers(acc_o);
          release_value(pending);
          pack_p_and_rescale_o(s, row_alpha);
          pending = fill;
        }
      } else {
        release_key(info.fill);  // a unit without key tiles: its first fill is the end record
      }
      release_value(info.fill);  // the end record's value slot (it carries no values)
      ++n;

      // Epilogue: normalise, write lse, stage O through this group's Q tile for 16-byte stores.
      float inv_sum[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) inv_sum[r] = finish_prefill_row(params, it, row_sum[r], row_max[r], row_pos[r], tig);
      ptx::named_barrier_sync(kSm90EpilogueBarrier + group, 128);  // the group's wgmma reads of s_q are over
#pragma unroll
      for (int j = 0; j < kORegs / 4; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t packed =
              ptx::pack2<Element>(acc_o[4 * j + 2 * r] * inv_sum[r], acc_o[4 * j + 2 * r + 1] * inv_sum[r]);
          *reinterpret_cast<uint32_t*>(s_q + sm90_tile_offset<64>(warp * 16 + quad_row + 8 * r, 8 * j + 2 * tig)) = packed;
        }
      ptx::named_barrier_sync(kSm90EpilogueBarrier + group, 128);
      Element* out = static_cast<Element*>(params.out);
      constexpr int kChunksPerRow = kHeadDim / 8;
      for (int c = t; c < 64 * kChunksPerRow; c += 128) {
        const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
        const int pos = group_pos + row;
        if (pos < it.valid_begin || pos >= it.valid_end || col >= head_size) continue;
        *reinterpret_cast<uint4*>(out + static_cast<int64_t>(it.q_begin + pos - it.first_pos) * params.out_row_stride +
                                  it.head * params.out_head_stride + col) =
            *reinterpret_cast<const uint4*>(s_q + sm90_tile_offset<64>(row, col));
      }
      ptx::mbarrier_arrive(&q_empty[buf]);  // this thread's reads of the Q buffer are over
    }
  }
#else
  __trap();  // built for a target without wgmma: the host never launches it there
#endif
}

// The driver's tensor-map encoder, fetched once through the runtime (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 sm90_tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// Builds the maps where the TMA can read the tensors (16-byte aligned base and strides); leaves
// them disabled otherwise. BSA_SM90_TMA=0 disables them (experiments).
template <typename Element>
Sm90TensorMaps sm90_tensor_maps(const PrefillParams& params, bool use_tma) {
  Sm90TensorMaps maps{};
  if (!use_tma) return maps;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = sm90_tensor_map_encoder();
  if (encode == nullptr) return maps;
  const CUtensorMapDataType type =
      std::is_same<Element, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  constexpr int64_t kElement = sizeof(Element);
  // (head dim, heads, rows) with element strides between heads and between rows.
  auto make = [&](CUtensorMap* map, const void* base, int64_t heads, int64_t rows, int64_t head_stride,
                  int64_t row_stride) {
    auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };
    if (rows <= 0 || !aligned(static_cast<int64_t>(reinterpret_cast<uintptr_t>(base))) ||
        !aligned(head_stride * kElement) || !aligned(row_stride * kElement))
      return false;
    const cuuint64_t dims[3] = {static_cast<cuuint64_t>(params.head_size), static_cast<cuuint64_t>(heads),
                                static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_stride * kElement),
                                   static_cast<cuuint64_t>(row_stride * kElement)};
    const cuuint32_t box[3] = {64, 1, 64};
    const cuuint32_t element_strides[3] = {1, 1, 1};
    return encode(map, type, 3, const_cast<void*>(base), dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  maps.query_enabled = make(&maps.query, params.q, params.num_q_heads, params.num_q_tokens, params.q_head_stride,
                            params.q_row_stride);
  const KeyValueSource& kv = params.kv;
  maps.kv_enabled =
      !kv.paged() && make(&maps.key, kv.key, params.num_kv_heads, kv.num_rows, kv.head_stride, kv.row_stride) &&
      make(&maps.value, kv.value, params.num_kv_heads, kv.num_rows, kv.head_stride, kv.row_stride);
  return maps;
}

// Persistent grid of num_ctas CTAs (one per SM: the ring and the Q buffers take most of the shared
// memory), at most one per work unit; fills of kStageKeys keys (64 or 128, see Sm90Tiling).
template <typename Element, int kHeadDim, int kStageKeys>
void launch_prefill_sm90(const PrefillParams& params, const Sm90Launch& launch, cudaStream_t stream) {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the Hopper prefill kernel takes padded head dims 64 and 128");
  using Tiling = Sm90Tiling<kStageKeys>;
  constexpr int kSmemBytes = Sm90Smem<kHeadDim, Tiling>::kBytes;
  auto kernel = prefill_sm90_kernel<Element, kHeadDim, Tiling>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  const int64_t max_units = static_cast<int64_t>(launch.max_tiles) * params.num_q_heads;
  const int grid = static_cast<int>(std::min<int64_t>(launch.num_ctas, max_units));
  kernel<<<grid, kSm90Threads, kSmemBytes, stream>>>(params, sm90_tensor_maps<Element>(params, launch.use_tma));
}

}  // namespace blocksparse_attn
