// Build knob BSA_SM90_TRACE=k (default 0: nothing is compiled in): the Hopper prefill kernel's k-th
// launch in the process records, in CTA 0, when each of its first kSm90TraceFills fills passed each
// step of the ring, on the SM's clock, and the launcher prints the table to stderr
// (launch_prefill_sm90.cuh; scripts/sm90_trace_summary.py reads it). Nsight Compute's samples say
// where warps wait on average; the trace says, fill by fill, how long after a slot was freed its fill
// was issued and how long after that it landed, which the averages could not separate (the paged
// producer's late fills, issue 20). The recording stores from lane 0 of each recording warp perturb
// the timing a little; compare traces of one build.
#pragma once

#include <cstdint>

#ifndef BSA_SM90_TRACE
#define BSA_SM90_TRACE 0
#endif

namespace blocksparse_attn {

constexpr int kSm90TraceFills = 1024;
// Events of fill n: producer warp w (up to 4) starts waiting for the fill's free slots, has them,
// and has issued the fill and arrived on its barrier; consumer group g starts waiting for the fill,
// sees it landed, and frees its key slot (S done). Within warp w's issue: its lane 0 about to look
// its first page id of the fill up and that id loaded (TMA pages), its boxes of the first tile
// issued and its last box issued (TMA fills). Within consumer group g's fill: its turn taken (its
// products about to issue), the previous fill's values seen landed (value barriers), the previous
// fill's P.V about to be waited for and seen done, and P packed (the fill's softmax done).
enum Sm90TraceEvent : int {
  kTraceSlotWait = 0,      // + producer warp
  kTraceSlotFree = 4,      // + producer warp
  kTraceIssued = 8,        // + producer warp
  kTraceFillWait = 12,     // + consumer group
  kTraceFillLanded = 14,   // + consumer group
  kTraceKeyReleased = 16,  // + consumer group
  kTracePageKnown = 18,    // + producer warp: its first page id of the fill loaded (TMA pages)
  kTraceBoxesIssued = 22,  // + producer warp: its last TMA box of the fill issued
  kTraceFirstTileIssued = 26,  // + producer warp: its boxes of the fill's first tile issued (128-key fills)
  kTraceLookupStart = 30,      // + producer warp: about to look its first page id of the fill up (TMA pages)
  kTraceTurn = 34,             // + consumer group: its turn taken, S and the previous P.V about to issue
  kTracePvDone = 36,           // + consumer group: the previous fill's P.V seen done
  kTraceReady = 38,            // + consumer group: the fill's P packed
  kTraceValuesSeen = 40,       // + consumer group: in its turn, the previous fill's values seen landed
                               // (BSA_SM90_VALUE_BARRIERS only: their own barrier, waited for before P.V)
  kTraceVoted = 42,            // + consumer group: about to wait for the previous fill's P.V, the
                               // work before that wait done (128-key fills: the maxima and the vote)
  kSm90TraceEvents = 44,
};

#if BSA_SM90_TRACE
__device__ long long sm90_trace_clock[kSm90TraceFills * kSm90TraceEvents];
#endif

// The SM's clock, read in program order with the memory operations around it (clock64() may move
// past an independent load, which would blur "about to look up" against "looked up").
__device__ __forceinline__ long long sm90_trace_now() {
  long long now;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(now)::"memory");
  return now;
}

// Records event `event` of fill `fill` (lane 0 of a warp; CTA 0 only).
__device__ __forceinline__ void sm90_trace(int fill, int event) {
#if BSA_SM90_TRACE
  if (blockIdx.x == 0 && fill < kSm90TraceFills && (threadIdx.x & 31) == 0)
    sm90_trace_clock[fill * kSm90TraceEvents + event] = sm90_trace_now();
#endif
}

}  // namespace blocksparse_attn
