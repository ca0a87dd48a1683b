// The online softmax of flash attention, as named device primitives shared by every kernel (the
// sm80 and Hopper prefill kernels and the decode kernel): row maximum, exponentials with the scale
// folded into their FFMA, running sums, the O rescale and the row's finish. Torch-free.
//
// Layout: a thread holds two rows of a 16-row m-tile (quad row g and g + 8), and the 4 threads of a
// quad hold one row's columns. Scores come as s[4j + e]: row e / 2, column 8j + 2 tig + e % 2 — the
// accumulators of m16n8 mma.sync tiles and of wgmma's m64nN tiles alike. Everything is in the log2
// domain: the kernels use exp2 with the softmax scale times log2(e).
#pragma once

#include <cstdint>

#include "cuda/kernels/ptx.cuh"

namespace blocksparse_attn {

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

// m16n8 accumulator tiles kept as float[n][4] (what mma_16816 takes) seen as the flat s[4j + e].
template <int kTiles>
__device__ __forceinline__ float (&flat(float (&tiles)[kTiles][4]))[4 * kTiles] {
  return *reinterpret_cast<float(*)[4 * kTiles]>(&tiles);
}

// One thread's two rows of running softmax state.
struct OnlineSoftmax {
  float row_max[2];  // the reference each row's exponentials were taken against (log2 domain)
  float row_sum[2];  // this thread's share of each row's sum (the quad's shares are added at the end)

  // A fresh row state, and the O accumulators it scales (same layout as the scores) zeroed.
  template <int kORegs>
  __device__ __forceinline__ void init(float (&o)[kORegs]) {
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
#pragma unroll
    for (int i = 0; i < kORegs; ++i) o[i] = 0.f;
  }

  // Turns the scores of one tile into P = 2^(s * multiplier - ref) in place and returns in alpha the
  // factor by which each row's O must be rescaled. Pass multiplier = scale * log2(e) for raw scores
  // (needs scale > 0, so that the maximum of the scaled scores is the scaled maximum), or 1 for scores
  // already scaled (and masked with -inf). A row's reference moves only when the tile's maximum
  // exceeds it by more than `slack` (FlashAttention-4's conditional rescale: P <= 2^slack, exact
  // enough in fp16 / bf16, and O is rescaled a few times per row instead of at most tiles); slack 0
  // keeps the exact running maximum. A row that has seen nothing yet takes any finite maximum; a NaN
  // score leaves the reference alone and propagates through P.
  // Returns whether a row's reference moved (its alpha then at most 2^-slack: with slack > 0 exactly
  // where alpha is not 1; with 0 it may round to 1, a rescale that changes nothing); kVoteFirst:
  // whether a row of the warp's moved, the same in every lane (see new_reference).
  template <bool kVoteFirst = false, int kRegs>
  __device__ __forceinline__ bool update(float (&s)[kRegs], float multiplier, float slack, float (&alpha)[2]) {
    if constexpr (kVoteFirst) {
      const bool moved = new_reference<true>(s, multiplier, slack, alpha);
      exponentiate(s, multiplier, alpha);
      return moved;
    }
    bool moved = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float ref = row_reference(s, r, multiplier, slack, alpha[r], moved);
      row_exponentiate(s, r, multiplier, ref, alpha[r]);
    }
    return moved;
  }

  // update() in two halves, for a caller that waits for something between them (the Hopper
  // consumer waits there for the previous P.V, whose P registers the new P overwrites):
  // new_reference moves each row's reference, returns alpha and whether a reference moved;
  // exponentiate turns the scores into P against the references and adds them to the row sums.
  // kVoteFirst: the quad's shuffles only where the warp's vote says a row may move. No thread's share
  // of its row above the reference + slack means no row moves (the maximum commutes with a positive
  // multiplier, rounding included), which is what the shuffles would find: alpha 1, nothing moved.
  // Returns then whether a row of the warp's moved, the same in every lane: the rescale's vote.
  template <bool kVoteFirst = false, int kRegs>
  __device__ __forceinline__ bool new_reference(const float (&s)[kRegs], float multiplier, float slack,
                                                float (&alpha)[2]) {
    bool moved = false;
    if constexpr (kVoteFirst) {
      const float share[2] = {thread_max(s, 0), thread_max(s, 1)};
      const bool may_move = share[0] * multiplier > row_max[0] + slack || share[1] * multiplier > row_max[1] + slack;
      if (!__any_sync(0xffffffffu, may_move)) {
        alpha[0] = alpha[1] = 1.f;
        return false;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) quad_reference(share[r], r, multiplier, slack, alpha[r], moved);
      return __any_sync(0xffffffffu, moved);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_reference(s, r, multiplier, slack, alpha[r], moved);
    return moved;
  }
  template <int kRegs>
  __device__ __forceinline__ void exponentiate(float (&s)[kRegs], float multiplier, const float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) row_exponentiate(s, r, multiplier, reference(row_max[r]), alpha[r]);
  }

  // One row (r: the thread's first or second) of new_reference, which returns the row's reference
  // (moved |= whether it moved), and of exponentiate.
  template <int kRegs>
  __device__ __forceinline__ float row_reference(const float (&s)[kRegs], int r, float multiplier, float slack,
                                                float& alpha, bool& moved) {
    return quad_reference(thread_max(s, r), r, multiplier, slack, alpha, moved);
  }
  // This thread's share of row r's maximum (its columns, unscaled).
  template <int kRegs>
  __device__ __forceinline__ static float thread_max(const float (&s)[kRegs], int r) {
    static_assert(kRegs % 8 == 0, "two or more 8-column tiles");
    float part[kRegs / 4];
#pragma unroll
    for (int j = 0; j < kRegs / 4; ++j) part[j] = fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]);
    return reduce_tree(part, [](float a, float b) { return fmaxf(a, b); });
  }
  // row_reference from the thread's share: the quad's maximum, then the reference.
  __device__ __forceinline__ float quad_reference(float mx, int r, float multiplier, float slack, float& alpha,
                                                 bool& moved) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx *= multiplier;
    const bool grow = mx > row_max[r] + slack;
    const float new_max = grow ? mx : row_max[r];
    const float ref = reference(new_max);
    alpha = grow ? ptx::exp2_approx(row_max[r] - ref) : 1.f;
    moved |= grow;
    row_max[r] = new_max;
    return ref;
  }
  template <int kRegs>
  __device__ __forceinline__ void row_exponentiate(float (&s)[kRegs], int r, float multiplier, float ref,
                                                   float alpha) {
    float part[kRegs / 4];
#pragma unroll
    for (int j = 0; j < kRegs / 4; ++j) {
      exponentiate_pair(s, r, j, multiplier, ref);
      part[j] = s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
    }
    row_sum[r] = row_sum[r] * alpha + reduce_tree(part, [](float a, float b) { return a + b; });
  }
  // Row r's pair j (columns 8j + 2 tig and + 1) of scores turned into P against ref.
  template <int kRegs>
  __device__ __forceinline__ static void exponentiate_pair(float (&s)[kRegs], int r, int j, float multiplier,
                                                           float ref) {
    s[4 * j + 2 * r] = ptx::exp2_approx(fmaf(s[4 * j + 2 * r], multiplier, -ref));
    s[4 * j + 2 * r + 1] = ptx::exp2_approx(fmaf(s[4 * j + 2 * r + 1], multiplier, -ref));
  }

  // What a row's exponentials are taken against: its maximum, or 0 while it has seen nothing
  // (avoids inf - inf).
  __device__ __forceinline__ static float reference(float row_maximum) {
    return row_maximum == -INFINITY ? 0.f : row_maximum;
  }

  // Each row's sum over the quad (every thread of the quad gets it).
  __device__ __forceinline__ float quad_sum(int r) const {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    return l;
  }
};

// O *= alpha, row by row (o in the same layout as the scores: o[4j + e] is row e / 2).
template <int kRegs>
__device__ __forceinline__ void scale_rows(float (&o)[kRegs], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < kRegs; i += 4) {
    o[i] *= alpha[0];
    o[i + 1] *= alpha[0];
    o[i + 2] *= alpha[1];
    o[i + 3] *= alpha[1];
  }
}

// The same, skipped when no row of the warp changed its reference, the common case once the maxima
// settle.
template <int kRegs>
__device__ __forceinline__ void rescale_rows(float (&o)[kRegs], const float (&alpha)[2]) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) scale_rows(o, alpha);
}

// A finished row's natural-log log-sum-exp from its reference (log2 domain) and full sum l; l = 0
// only for a row that saw no key (-inf). A NaN l (a non-finite input) stays NaN, as in dense
// attention: test == 0, not > 0. inverse_sum gives the factor that normalises O (0 for such rows).
__device__ __forceinline__ float row_lse(float row_max, float l) {
  return l == 0.f ? -INFINITY : (row_max + __log2f(l)) * 0.69314718055994531f;
}
// A visible row's sum holds its reference's term, exp2(0) = 1 or more (the slack only lowers the
// reference), so an approximate reciprocal never meets a denormal.
__device__ __forceinline__ float inverse_sum(float l) { return l == 0.f ? 0.f : ptx::reciprocal_approx(l); }

// A score as the softmax takes it after masking: scaled into the log2 domain where visible, -inf
// elsewhere (a select, never an added bias: garbage K rows may hold NaN).
__device__ __forceinline__ float masked_score(float s, bool visible, float scale_log2) {
  return visible ? s * scale_log2 : -INFINITY;
}

}  // namespace blocksparse_attn
