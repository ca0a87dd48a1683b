// The Hopper prefill kernel's shapes and shared-memory layout: the K/V fill rings (Sm90Tiling), the
// register split, the barriers, the stage records and the swizzled operand tiles, and the TMA maps it
// takes. Torch-free (the kernel is cuda/kernels/prefill_sm90.cuh, its launcher cuda/launch_prefill_sm90.cuh).
#pragma once

#include <cuda.h>  // CUtensorMap (the types only: the encoder is fetched through the runtime)

#include <cstdint>

#include "cuda/kernels/params.h"
#include "cuda/kernels/prefill_common.cuh"

namespace blocksparse_attn {

// K and V come in fills of kBlockN keys (kTilesPerStage 64-key tiles of the visible list, not
// necessarily adjacent): fill n takes key slot n % kKeySlots and value slot n % kValueSlots. Two
// shapes; the host picks one per call (choose_sm90_stage_keys):
// - 64-key fills in 4 shared stages (K and V of a fill in slots of the same index, freed together
//   after P.V) and three Q buffers (the producer loads the Q of the unit after next while the
//   consumers finish the current one; 224 KB in all at head dim 128): the shape of short sequences,
//   fp8 pages and packed heads, whose units are short. The third buffer took 256 prompts x 128
//   tokens from 0.210 to 0.203 ms on the H200 (2026-12-04), whose units of one or two fills waited
//   for their first fill's Q and K/V.
// - 128-key fills with rings of their own for K (2 slots, each freed once S is done) and V (3
//   slots, freed after P.V), as FA3 pipelines them: the producer runs as far ahead as with 3 shared
//   stages, and the 64 KB saved hold a second Q buffer (224 KB in all at head dim 128). Half the
//   per-tile bookkeeping and n = 128 wgmmas for S: the better shape for sequences of 2k keys or
//   more (dense 2k x 16: 1.12 ms against 1.15 ms; Phi-3-small's pattern, once the consumers took
//   turns and the producer worked in one warp: 7.6 % fewer cycles at 32k x 1, 2.6 % at 8k x 4,
//   H100, 2026-12-06; with 3 shared stages and one Q buffer it had lost, 1.25 ms and 1.60 ms).
// Build-time knobs for experiments.
#ifndef BSA_SM90_STAGES
#define BSA_SM90_STAGES 4
#endif
#ifndef BSA_SM90_LOADS_IN_FLIGHT
#define BSA_SM90_LOADS_IN_FLIGHT 2
#endif
#ifndef BSA_SM90_Q_BUFFERS
#define BSA_SM90_Q_BUFFERS 3
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
// Build knob BSA_SM90_PRODUCER_WARPS=1|4 (default 1): launches over contiguous K/V with Q and K/V
// through the TMA (one thread's issue a tile) take a kernel whose producer works in one warp, while
// the other three leave once they have given up their registers, as FA3's producer warp group does
// (launch_prefill_sm90 picks it); 4 keeps four working producer warps everywhere. Every working
// producer thread walks the tiles and arrives on the fill barriers: with four, the producer issued
// 0.70e9 of the 2.55e9 warp instructions at dense 16k x 2 (Nsight Compute, H200), and ours issued
// 1.25x FA4's warp instructions there for 1.14x its cycles (H100, locked clocks). One warp: 2.05e9
// warp instructions and 3.9 % fewer cycles at dense 16k x 2, 3.8 % at 32k, 0.4-1.1 % on the pattern
// (H100, locked clocks, 2026-12-05). Paged fills keep four warps (their boxes issue from every warp:
// BSA_SM90_PAGED_BOX_WARPS), and so do fp8 pages (a row per thread pair of 128). Two kernels, not a
// run-time choice inside one: that spilled 52 bytes in the 128-key kernel (ptxas).
#ifndef BSA_SM90_PRODUCER_WARPS
#define BSA_SM90_PRODUCER_WARPS 1
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
  static_assert(kQBuffers >= 1 && kQBuffers <= 3, "one to three Q buffers");
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
// (65536 / threads per thread, in steps of 8): a split beyond it hangs. Build knob
// BSA_SM90_PRODUCER_REGISTERS (a multiple of 8; the consumers take the rest of the pool) for A/Bs:
// FA4's Hopper forward runs a one-warp producer on 24 and its two MMA groups on 240.
#ifndef BSA_SM90_PRODUCER_REGISTERS
#define BSA_SM90_PRODUCER_REGISTERS 104
#endif
constexpr int kSm90RegisterPool = (1 + kSm90ConsumerGroups) * (65536 / kSm90Threads / 8 * 8);
constexpr int kSm90ProducerRegisters = BSA_SM90_PRODUCER_REGISTERS;
constexpr int kSm90ConsumerRegisters = (kSm90RegisterPool - kSm90ProducerRegisters) / kSm90ConsumerGroups / 8 * 8;
static_assert(kSm90ProducerRegisters % 8 == 0 && kSm90ProducerRegisters >= 24 && kSm90ConsumerRegisters <= 256,
              "setmaxnreg takes multiples of 8 from 24 to 256");
// Named barriers (0 is __syncthreads): each consumer group's epilogue, the producer's broadcast of
// a claimed unit.
constexpr int kSm90EpilogueBarrier = 1;   // + group
constexpr int kSm90ClaimBarrier = 3;
constexpr int kSm90TurnBarrier = 4;       // + group: the group's turn to issue its products
// The consumer groups issue their products in turns (FA3's warp-scheduler barrier): group 0 issues a
// fill's S and P.V, then group 1, and so on, so one group's softmax runs while the other group's
// products keep the tensor cores busy, and a group's four warps meet before their first wgmma.
// 128-key fills only by default (BSA_SM90_TURNS: 0 none, 1 128-key fills, 2 both shapes).
#ifndef BSA_SM90_TURNS
#define BSA_SM90_TURNS 1
#endif
// A knob set by fill shape: 0 never, 1 with 128-key fills, 2 with both shapes.
template <typename Tiling>
__host__ __device__ constexpr bool sm90_by_fill_shape(int setting) {
  return setting == 2 || (setting == 1 && Tiling::kTilesPerStage == 2);
}
template <typename Tiling>
__host__ __device__ constexpr bool sm90_turns() {
  return sm90_by_fill_shape<Tiling>(BSA_SM90_TURNS);
}

// How far (log2 units) a row's running maximum may lag the true one: P <= 2^8, exact in fp16 and
// bf16, and O and the row sum stay far from overflow in fp32.
constexpr float kSm90MaxSlack = 8.f;

// Build knob BSA_SM90_PV_WAIT_BEFORE_EXP (0 never, 1 128-key fills, 2 both shapes; default 1): a
// consumer waits for the previous fill's P.V between the row maxima and the exponentials
// (FlashAttention-4's order) instead of after the exponentials. P then packs in the exponentials'
// basic block, where ptxas interleaves its F2FP conversions with the MUFU.EX2s; after the wait they
// ran as a block of 32 behind them (H100, dense 16k x 2: 36k of 688k stall samples on them, FA4's
// 13k of 631k). H100, Nsight Compute cycles (2026-12-06), both shapes: dense 16k x 2 -0.50 %, 32k
// x 1 -0.38 %, 128 x 256 -0.60 %, the pattern 8k x 4 +0.29 %; 128-key fills only (the default):
// dense 16k -0.78 %, 32k -0.54 %. Predicted -3 %: the block was not what sets the pace. Off for
// 64-key fills, which carry the pattern. P.V committed in two halves, the first half of the next P
// packed once the first half of P.V had read it (~250 cycles off each group's chain), measured +0.2
// to +0.5 % (H100, 2026-12-07): the consumers' chain does not set the pace either.
#ifndef BSA_SM90_PV_WAIT_BEFORE_EXP
#define BSA_SM90_PV_WAIT_BEFORE_EXP 1
#endif
// Build knob BSA_SM90_S_HALVES (default 0; an experiment): with 128-key fills in the steady-state
// loop, S is issued as two products of 64 keys (m64n64), the first in a commit group of its own and
// the second in the previous fill's P.V's, and a consumer takes the first half's maxima and
// exponentials while the second half and the P.V run: its softmax starts ~256 tensor cycles after S
// starts instead of ~512, and after the P.V wait half the exponentials are left. Where the second
// half moves a row's reference, the first half's P is rescaled (a warp's vote, rare once the maxima
// settle). Three commit groups (the first half retired by wait_group 2) made ptxas serialise every
// wgmma (C7514) wherever the end record's test sat. SASS (bf16 hd128 k128, one-warp producer): fill
// loop 966 against 861, the turn 22 / 102 instructions to the first HGMMA / BAR.ARV against 21 / 66;
// spills 52 bytes as the default, the four-warp producer's kernel 20 against 12. Not yet run on a GPU.
#ifndef BSA_SM90_S_HALVES
#define BSA_SM90_S_HALVES 0
#endif
// Build knob BSA_SM90_VOTE_ON_GROWTH (default 0; an experiment): a warp's vote on O's rescale takes
// whether its rows' references moved (the maxima's comparison) instead of whether their factors,
// exp2 of the moves, are not 1: the same rows, so the same outputs, but the vote and the P.V wait
// after it no longer wait for two MUFU.EX2 results, whose unit the other group's exponentials may
// hold. Not yet run on a GPU.
#ifndef BSA_SM90_VOTE_ON_GROWTH
#define BSA_SM90_VOTE_ON_GROWTH 0
#endif
// Build knob BSA_SM90_MAX_VOTE (default 0; an experiment): a consumer warp takes its rows' maxima over
// the quad (two rounds of shuffles, ~50-60 cycles of latency before the rescale vote and the P.V
// wait) only where a vote of its threads' own shares says a row's reference may move
// (OnlineSoftmax::new_reference<true>, which then also gives the rescale's vote): the same references
// and factors, and once the maxima settle the common fill skips the shuffles, the factors'
// exponentials, the reference updates and the second vote. Not yet run on a GPU.
#ifndef BSA_SM90_MAX_VOTE
#define BSA_SM90_MAX_VOTE 0
#endif

// Build knob BSA_SM90_VALUE_BARRIERS (default 0; an experiment kept for its diagnosis): with split
// rings and the one-warp producer, a fill's values complete on a barrier of their own (value_full,
// per value slot, one arrival a fill from the producer's thread 0), their TMA issued after the
// fill's keys; a consumer waits for the keys (and the record) before S and for the previous fill's
// values inside its turn, just before its P.V, as FlashAttention-4's Hopper forward does. Predicted
// -1.5 to -3 % (our wait for a fill's keys and values: 36k of the consumers' 607k loop samples at
// dense 16k x 2, FA4's for K and for V 8k and 11k of 549k). Measured +13.8 % cycles at dense 16k and
// 32k, with 4.9 % more warp instructions (H100, Nsight Compute, 2026-12-06; read then as the
// consumers spinning on the value wait, which the profile below does not bear out). A trace build
// records when each group sees the values land (kTraceValuesSeen).
// Traced (H100, dense 16k x 2, 2026-12-07): the trace build's fill period is main's (3,185 cycles
// against 3,174; the trace build is slower than the default, ~2,560): the cost does not show there.
// It showed group 0 waiting for keys in 77 % of the fills, their barrier completing only after
// thread 0 had also waited for the value slot and issued the values. Two fixes, measured in Nsight
// Compute cycles at dense 16k x 2 against main in the same call, and dropped (the first is commit
// a541813): keys first (arrive before the values' issue, wait for the value slot after the keys)
// +13.9 % (1 in that call: +10.6 %; 32k x 1 +14.1 %), and with it the values' phase tested before
// the turn (mbarrier.test_wait, so no phase check between S's wgmmas and P.V's)
// +13.4 % (1 with the test: +9.8 %). Warp instructions +1-1.5 %: the cost is stall, not spinning.
// Why (source-level profile, same card and shape): the consumers' wait for the fill grew from 6.4k to
// 69.3k stall samples, the producer's wait for free slots fell from 25 % of its samples to 7.6 %:
// the producer holds the pace. Its chain from free slots to arrival (~1,400 cycles for four TMA
// loads from one thread in main's trace) grows by ~740 with the values apart. Worth another try
// only once that chain is shorter.
#ifndef BSA_SM90_VALUE_BARRIERS
#define BSA_SM90_VALUE_BARRIERS 0
#endif
template <typename Tiling, int kProducerThreads>
__host__ __device__ constexpr bool sm90_value_barriers() {
  return BSA_SM90_VALUE_BARRIERS && Tiling::kSplitRings && kProducerThreads == 32;
}
template <typename Tiling>
__host__ __device__ constexpr bool sm90_pv_wait_before_exp() {
  return sm90_by_fill_shape<Tiling>(BSA_SM90_PV_WAIT_BEFORE_EXP);
}
template <typename Tiling>
__host__ __device__ constexpr bool sm90_s_halves() {
  return BSA_SM90_S_HALVES && Tiling::kTilesPerStage == 2 && sm90_pv_wait_before_exp<Tiling>();
}

// Diagnostic knobs that make the one-warp producer late (their results: at their use in
// prefill_sm90.cuh). Default off.
#ifndef BSA_SM90_PRODUCER_PAD
#define BSA_SM90_PRODUCER_PAD 0
#endif
#ifndef BSA_SM90_PRODUCER_PAD_ALU
#define BSA_SM90_PRODUCER_PAD_ALU 0
#endif
#ifndef BSA_SM90_PRODUCER_SLEEP_NS
#define BSA_SM90_PRODUCER_SLEEP_NS 0
#endif
// Diagnostic knob BSA_SM90_SKIP_SOFTMAX (default 0; its outputs are wrong, for timing only): the
// consumers' fill loop with P = the raw scores. 1: no mask, maxima or exponentials (the loop's
// floor without its softmax: products, fills, turns); 2: the exponentials (and row sums) only
// skipped. Against main and FA4 in the same call, it says how much of the gap the softmax's
// overlap with the products holds. H100, Nsight Compute cycles, dense 16k x 2 (2026-12-07): main
// 10.28M, =1 8.50M (-17.4 %), =2 8.58M (-16.5 %); FA4 9.83M: the exponentials hold the gap.
#ifndef BSA_SM90_SKIP_SOFTMAX
#define BSA_SM90_SKIP_SOFTMAX 0
#endif
// Diagnostic knob BSA_SM90_CONSUMER_SLEEP_NS=t (default 0): each consumer warp sleeps t ns after it
// packs a fill's P, before its next turn: its own chain made longer by a known time, taking no issue
// slots. If a group's chain (S done, softmax, turn) sets the pace, the cycles grow by about that much
// a fill; if the products or the fills do, they do not. H100, Nsight Compute cycles, dense 16k x 2
// (2026-12-07): 100 ns (~145 cycles at the locked clock) +3.97 %, ~102 cycles a fill: the chain
// sets most of the pace (+2.66 % in a later call; the same sleep at the start of the turn, with the
// turn held, +2.92 %: the hand-over is no more on the pace than the rest of the chain).
#ifndef BSA_SM90_CONSUMER_SLEEP_NS
#define BSA_SM90_CONSUMER_SLEEP_NS 0
#endif

// Per-stage flags for one consumer warp group.
constexpr uint8_t kTileVisible = 1;  // the group's query block sees this key tile
constexpr uint8_t kTileMasked = 2;   // ... and some (row, key) pairs are causal or past the keys
// The unit's last fill (both groups' flags of its first slot): no end record follows
// (sm90_marks_last_fill).
constexpr uint8_t kFillLast = 4;
// Build knob BSA_SM90_MARK_LAST (default 1; 0: end records everywhere): the one-warp producer's
// 64-key fills (contiguous K/V through the TMA, BSA_SM90_PRODUCER_WARPS) mark a unit's last fill
// (kFillLast) instead of following it with an end record, a fill that carries no values and whose S
// product the consumers issue on stale keys (at 128 x 256 one S product in three). H100, Nsight
// Compute cycles (2026-12-06): 128 x 256 -4.8 %, 512 x 64 -5.2 % (wall time 0.359 -> 0.341 ms), the
// pattern 8k x 4 +0.1 %. Not elsewhere: the fp8 producer marking it took 5.9 % more cycles on an
// e4m3 chunk (the same consumers; the twenty-sixth session's first build measured -3.5 % there: not
// understood), the paged producer that looks page ids up ahead 4.9 % more and the consumers' test of
// the mark alone cost paged fills 0.4 %, and 128-key fills 4.7-5.4 % more (their producer's slot
// arithmetic left the uniform datapath). A compile-time choice per kernel: the other kernels' code
// is what it was without it.
#ifndef BSA_SM90_MARK_LAST
#define BSA_SM90_MARK_LAST 1
#endif
// Build knob BSA_SM90_COUNT_TILES (0 never, 1 128-key fills, 2 both shapes; default 2):
// the one-warp producer counts a unit's key tiles (0, 1, ... up to its last key, each group's flags
// by arithmetic) where every causal block up to the unit's last row is visible
// (every_block_visible_up_to: dense layers, and a sparse pattern's first local_blocks blocks),
// instead of walking the pattern. At dense 16k x 2 the producer warp issued 385 instructions a fill
// and waited for free slots in 3.5 % of its samples (FA4's producer in most of its own): it sets the
// fills' pace. The walk (BlockKeyTiles::next and each group's flags) was ~150 of those instructions
// (H100, Nsight Compute, 2026-12-06). A uniform branch a tile picks the count or the walk. Counted,
// Nsight Compute cycles (H100, 2026-12-06, 2 rounds; predicted -1 to -4 % dense, +-0.5 % pattern):
// dense 16k x 2 -2.37 %, 32k x 1 -2.17 % (128-key fills alone: -2.34 %, -2.08 %), 128 x 256 -1.84 %,
// the pattern 8k x 4 -0.20 %; 2.4 % fewer warp instructions on dense layers.
#ifndef BSA_SM90_COUNT_TILES
#define BSA_SM90_COUNT_TILES 2
#endif
// Build knob BSA_SM90_LANE_WALK (default 1; 0: the walk tile by tile): where the producer would walk
// a parametric pattern (sparse units; dense ones under the four-warp producer), each warp finds 32 of
// the unit's tiles at once, one a lane in closed form (ClosedKeyTiles), with each group's flags, and
// hands out those some group sees from a ballot: a few instructions a tile instead of the walk's ~50
// dependent ones. Nsight Compute cycles (H100, 2026-12-06, 2 rounds; predicted -1 to -3 % contiguous,
// -3 to -6 % paged): the pattern 8k x 4 -1.57 %, 32k x 1 -2.57 %, 2k chunks of 8k x 4 -1.56 %; over
// TMA pages at kv block 16 5.5 % fewer warp instructions but the same cycles (chunks -0.10 %, whole
// prompts -0.20 %): there the walk is not what sets the fills' pace. Not in the producer that looks
// page ids up a fill ahead (64-key fills over TMA pages): there ptxas spilled 24-40 bytes.
#ifndef BSA_SM90_LANE_WALK
#define BSA_SM90_LANE_WALK 1
#endif
// Build knob BSA_SM90_PAGED_FILL_BOXES (default 3; 0 restores the walk below): 128-key fills over TMA
// pages give each producer lane one box of the whole fill and look the fill's page ids up in one load
// a warp (sm90_producer). The trace (BSA_SM90_TRACE, H100, 2k chunks of 8k x 4) had each warp looking
// its two tiles' page ids up one after the other, and at kv block 64 the first warp alone issuing
// both tiles' boxes and looking both up: its chain set the fills' pace (a fill every ~3,520 cycles,
// against ~3,000 for contiguous K/V issued by the first of four warps). With 2, thread 0 expects each
// tile's bytes once, as over contiguous K/V, and the box lanes only issue (with 1, each box lane
// expects its own boxes' bytes first): a box landing before that expectation takes the tx-count below
// zero, and the phase cannot complete before thread 0 has expected and arrived. Nsight Compute cycles
// (H100, 2026-12-06, 2 rounds each, against 0): paged 2k chunks of 8k x 4 at kv block 16 -4.30 % with
// 1 and -5.81 % with 2 (2 against 1 again in a second run: -1.66 %), at kv block 64 -10.95 % and
// -10.37 %, whole 8k x 4 prompts at kv block 16 -2.62 % with 1; the head dim 64 and 128 paged and
// chunk tests, racecheck and synccheck passed on 1 and 2 alike. At kv block 16 (16 TMA loads a
// fill, chunks 1.11x contiguous in wall time; kv blocks 32 and 64: 8 and 4 loads, 1.04x) the values
// through cp.async from the four producer warps, the keys one box a page, were measured three ways
// and dropped (H100, Nsight Compute cycles on those chunks, 2 rounds; each form passed the paged and
// chunk tests, racecheck and synccheck, the last two without a proxy fence): published like other
// cp.async fills, at the top of the fill two later, +85 % (2026-12-06); each thread's copies arriving
// on the fill's barrier as they land (cp.async.mbarrier.arrive.noinc), a thread half a row, +32 %
// (1.46x contiguous in wall time); the same with a warp's copy two whole rows (four 128-byte lines a
// copy, not 32) and each thread looking up all four page ids of a tile, +46 % (2026-12-07). Neither
// the publication nor the reads' coalescing is the whole cost; not traced. With 3, each box lane
// issues its box once a fill, after the fill's tiles, instead of in one pass a tile (H100, Nsight
// Compute, 2026-12-07: paged chunks at kv block 16 -1.18 %, whole prompts -0.96 %, 3 % fewer warp
// instructions; predicted -1 to -4 %); the fills' pace then came from the warp pairs
// (BSA_SM90_PAGED_PAIRS, prefill_sm90.cuh), measured on top of it.
#ifndef BSA_SM90_PAGED_FILL_BOXES
#define BSA_SM90_PAGED_FILL_BOXES 3
#endif
template <typename Tiling, int kProducerThreads>
__host__ __device__ constexpr bool sm90_marks_last_fill() {
  return BSA_SM90_MARK_LAST && Tiling::kTilesPerStage == 1 && kProducerThreads == 32;
}
// The consumers advance their slots' K and V wgmma descriptors with the fill cursor (one add a fill)
// instead of building them from the slot index after the turn's barrier (five dependent uniform
// instructions each). H100, Nsight Compute cycles (2026-12-07): under the one-warp producer dense
// 16k x 2 -0.6 and -1.0 % (two calls), the pattern 8k x 4 -0.1 %; over pages (four producer warps,
// 2k chunks at kv block 16) +1.2 %, so those kernels keep the slot index.
template <int kProducerThreads>
__host__ __device__ constexpr bool sm90_descriptor_cursor() {
  return kProducerThreads == 32;
}
template <typename Tiling, int kProducerThreads>
__host__ __device__ constexpr bool sm90_counts_tiles() {
  return sm90_by_fill_shape<Tiling>(BSA_SM90_COUNT_TILES) && kProducerThreads == 32;
}

// Shared memory: operand tiles of kRows rows x kHeadDim, stored as 64-column blocks of kRows rows x
// 128 B with the 128-byte swizzle (the layout wgmma reads), every tile 1024-byte aligned. Q has
// Tiling::kQBuffers buffers (consecutive work units of a CTA take them in turn), each one 64-row
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
  // q_empty[Q buffers], value_full[value slots] (sm90_value_barriers); then the producer's claimed
  // units (two slots), each Q buffer's resolved work unit, the fill records (one per key slot)
  static constexpr int kKeyEmptyBarriers = Tiling::kSplitRings ? Tiling::kKeySlots : 0;
  static constexpr int kValueFullBarriers = BSA_SM90_VALUE_BARRIERS && Tiling::kSplitRings ? Tiling::kValueSlots : 0;
  static constexpr int kClaimOffset =
      kBarrierOffset +
      8 * (Tiling::kKeySlots + Tiling::kValueSlots + kKeyEmptyBarriers + Tiling::kQBuffers + kValueFullBarriers);
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
// How a K or V stage stores its rows: in atoms of 8 rows x 128 bytes (one 64-column block), the 8-row
// groups `row_group_bytes` apart and the column blocks `column_block_bytes` apart. Two layouts:
// - by column block, [column block][kBlockN rows][64]: a 64-column block of contiguous rows is one
//   TMA box of a row-major tensor;
// - by row group, [row group][column block][8 rows][64] (row_groups): an 8-row group holds every
//   column of its rows, so one TMA box brings whole rows (both column blocks of a page at head dim
//   128: one box a page instead of two). The wgmma descriptors take the same two strides.
struct Sm90KvLayout {
  int row_group_bytes;
  int column_block_bytes;
};
template <int kRows, int kHeadDim>
__device__ __forceinline__ Sm90KvLayout sm90_kv_layout(bool row_groups) {
  return row_groups ? Sm90KvLayout{kHeadDim * 16, 8 * 128} : Sm90KvLayout{8 * 128, kRows * 128};
}
// Byte offset of (row, col) in a K or V stage.
__device__ __forceinline__ int sm90_kv_offset(const Sm90KvLayout& layout, int row, int col) {
  return (row >> 3) * layout.row_group_bytes + (col >> 6) * layout.column_block_bytes + (row & 7) * 128 +
         ((((col & 63) >> 3) ^ (row & 7)) << 4) + (col & 7) * 2;
}


// TMA descriptors of Q ([T, Hq, D]) and of K and V, with the 128-byte swizzle wgmma reads.
// Q: a 3-D map (head dim, head, token) read in boxes of 64 x 1 x 64, one 64-column block of a 64-row
// tile (with packed heads 64 x 2^s x 64 >> s).
// K and V, staged by column block (kv_row_groups = 0): contiguous ([Tk, Hkv, D], any row and head
// strides) as 3-D maps (head dim, head, token) in boxes of 64 x 1 x 64; a paged cache in the model's
// dtype ([NB, Hc, kvbs, D], Hc = Hkv or 1 kv heads per page) as 3-D maps (head dim, row in the page,
// slab = block * Hc + kv head in the page) in boxes of 64 x kv_page_rows x 1, kv_page_rows =
// min(kvbs, 64) rows of one page, so a 64-key tile takes 64 / kv_page_rows <= 4 boxes a column block.
// Staged by row group (kv_row_groups = 1, head dim 128 = the padded one): 5-D maps (64 columns, row
// in an 8-row group, column block, row group, outer) with the column blocks 128 bytes apart inside a
// row (strides need not grow with the dims), one box of (64, 8, 2, rows / 8, 1) per page of a paged
// cache (outer: the slab) or per 64-key tile of contiguous K/V (outer: the kv head; the row and
// group dimensions both step through the tokens, so a tile may start at any token). Boxes start at a
// multiple of 8 rows of the stage (the swizzle pattern lines up). A flag is 0 where the host could
// not build a map (fp8 pages, pages of fewer than 16 rows, strides the TMA cannot express): the
// producer then copies with cp.async.
struct Sm90TensorMaps {
  CUtensorMap query;
  CUtensorMap key;
  CUtensorMap value;
  CUtensorMap out;  // O ([T, Hq, D]) in Q's boxes, written from the consumer groups' staged tiles
  int query_enabled;
  int out_enabled;
  int kv_enabled;
  int kv_page_rows;   // paged maps: rows per box; 0 for contiguous K/V
  int kv_page_heads;  // paged maps: kv heads per page (Hkv, or 1 for per-kv-head pages)
  int kv_row_groups;  // K and V stages by row group (Sm90KvLayout), read by the 5-D maps
};

}  // namespace blocksparse_attn
