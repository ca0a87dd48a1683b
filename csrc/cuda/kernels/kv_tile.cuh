// Where a sequence's keys and values live (contiguous tensors or the paged cache) and the one
// cp.async loader of K/V rows that the prefill kernels and the decode kernel's general path share.
// Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "cuda/kernels/params.h"
#include "cuda/kernels/ptx.cuh"

namespace blocksparse_attn {

// What a K/V source stores: the model's element type (Cache = Element) or an fp8 format, read as
// float(stored) * scale (KeyValueSource::k_scale / v_scale).
template <typename Cache>
struct CacheFormat {
  static constexpr bool kFp8 = false;
};
template <>
struct CacheFormat<__nv_fp8_e4m3> {
  static constexpr bool kFp8 = true;
  static constexpr __nv_fp8_interpretation_t kKind = __NV_E4M3;
};
template <>
struct CacheFormat<__nv_fp8_e5m2> {
  static constexpr bool kFp8 = true;
  static constexpr __nv_fp8_interpretation_t kKind = __NV_E5M2;
};

// A bf16 Q for fp16 tensor-core steps over fp8 K/V (both kernels: fp8 widens to fp16 in one
// instruction a pair): Q is multiplied by a power of two that puts the largest finite |q| of the rows
// sharing it in [2^14, 2^15), so fp16 holds each value to bf16's precision down to 2^-24 of that
// maximum, and S is divided by it (exact). Non-finite values stay what they are and do not set it.
// The running maximum of the finite magnitudes of a word's two bf16 values, as bf16 bits per half.
__device__ __forceinline__ unsigned bf16x2_finite_magnitude_max(unsigned running, uint32_t word) {
  const unsigned magnitude = word & 0x7fff7fffu;
  return __vmaxu2(running, magnitude & __vcmpltu2(magnitude, 0x7f807f80u));
}
// The factor's exponent for a largest finite |q| given as bf16 bits (0 where it is 0: Q is all zeros).
__device__ __forceinline__ int fp16_range_exponent(unsigned bf16_amax) {
  return bf16_amax == 0 ? 0 : min(141 - static_cast<int>(bf16_amax >> 7), 120);  // >> 7: the exponent field
}
// Two bf16 values (low half first) times the factor, as two fp16 values.
__device__ __forceinline__ uint32_t bf16x2_to_half2(uint32_t pair, float factor) {
  return ptx::pack2<__half>(__uint_as_float(pair << 16) * factor, __uint_as_float(pair & 0xffff0000u) * factor);
}

// A per-tensor scale from its device pointer (null: 1).
__device__ __forceinline__ float cache_scale(const float* scale) { return scale != nullptr ? *scale : 1.f; }

// Two stored fp8 values (low byte first) as two Elements in one 32-bit word. Exact: both fp8
// formats are subsets of fp16 and of bf16 (the scale is applied in float32 by the kernels).
template <typename Element, typename Cache>
__device__ __forceinline__ uint32_t fp8x2_to_elements(__nv_fp8x2_storage_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, CacheFormat<Cache>::kKind);
  if constexpr (std::is_same_v<Element, __half>) {
    return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
  } else {
    const __nv_bfloat162 b = __float22bfloat162_rn(__half22float2(__half2(h)));
    return *reinterpret_cast<const uint32_t*>(&b);
  }
}

// 16 stored fp8 values (one 16-byte chunk) as 16 Elements (two 16-byte chunks, in order).
template <typename Element, typename Cache>
__device__ __forceinline__ void fp8_chunk_to_elements(const uint4& in, uint4 (&out)[2]) {
  const auto* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&in);
  auto* words = reinterpret_cast<uint32_t*>(out);
#pragma unroll
  for (int i = 0; i < 8; ++i) words[i] = fp8x2_to_elements<Element, Cache>(pairs[i]);
}

// A [kRows][kCols] fp8 tile as Elements: src_offset(row, col) and dst_offset(row, col) are the byte
// offsets of a 16-byte chunk in the landed fp8 tile and of an 8-Element chunk in the converted one
// (each kernel's layouts), by kThreads threads, thread t taking 16-byte chunks t, t + kThreads, ...
template <typename Element, typename Cache, int kRows, int kCols, int kThreads, typename SrcOffset, typename DstOffset>
__device__ __forceinline__ void convert_fp8_tile(const unsigned char* src, void* dst, int t, SrcOffset src_offset,
                                                 DstOffset dst_offset) {
  constexpr int kChunksPerRow = kCols / 16;
  unsigned char* to = static_cast<unsigned char*>(dst);
#pragma unroll
  for (int c = t; c < kRows * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 16;
    uint4 out[2];
    fp8_chunk_to_elements<Element, Cache>(*reinterpret_cast<const uint4*>(src + src_offset(row, col)), out);
    *reinterpret_cast<uint4*>(to + dst_offset(row, col)) = out[0];
    *reinterpret_cast<uint4*>(to + dst_offset(row, col + 8)) = out[1];
  }
}

// Copies a paged tile's rows whose pages `rows` holds (looked up for the same pos0, row0 and
// kRowStep; a row without a page reads zeros) into shared memory with 16-byte cp.async, as
// copy_kv_rows below does.
template <typename Cache, int kCopies, int kRowStep, typename DstOffset, typename ValueOffset>
__device__ __forceinline__ void copy_paged_kv_rows(const KeyValueSource& kv, const PagedRows<kCopies, kRowStep>& rows,
                                                   int kv_head, int pos0, int row0, int col, int head_size,
                                                   void* dst_k, void* dst_v, DstOffset dst_offset,
                                                   ValueOffset value_offset) {
  const Cache* key = static_cast<const Cache*>(kv.key);
  const Cache* value = static_cast<const Cache*>(kv.value);
  unsigned char* to_k = static_cast<unsigned char*>(dst_k);
  unsigned char* to_v = static_cast<unsigned char*>(dst_v);
  rows.for_each_row(kv, kv_head, pos0, row0, col, head_size, [&](int u, int64_t offset, bool valid) {
    const int row = row0 + u * kRowStep;
    ptx::cp_async_16(to_k + dst_offset(row, col), key + offset, valid);
    ptx::cp_async_16(to_v + value_offset(row, col), value + offset, valid);
  });
}

// Copies rows of contiguous keys and values into shared memory, as copy_kv_rows below does (col_valid:
// the tile and the column read at all): one base offset per tile, then fixed steps (a 64-bit product
// per copy costs more issue slots than the copy itself). An invalid row reads nothing (source size
// 0), so its address needs no clamp.
template <typename Cache, int kCopies, int kRowStep, typename DstOffset, typename ValueOffset>
__device__ __forceinline__ void copy_contiguous_kv_rows(const KeyValueSource& kv, int seq, int kv_head, int pos0,
                                                        int row0, int col, int k_len, bool col_valid, void* dst_k,
                                                        void* dst_v, DstOffset dst_offset, ValueOffset value_offset) {
  const Cache* key = static_cast<const Cache*>(kv.key);
  const Cache* value = static_cast<const Cache*>(kv.value);
  unsigned char* to_k = static_cast<unsigned char*>(dst_k);
  unsigned char* to_v = static_cast<unsigned char*>(dst_v);
  const int64_t base =
      static_cast<int64_t>(kv.cu_seqlens_k[seq] + pos0 + row0) * kv.row_stride + kv_head * kv.head_stride + col;
  const int64_t step = kRowStep * kv.row_stride;
#pragma unroll
  for (int u = 0; u < kCopies; ++u) {
    const int row = row0 + u * kRowStep;
    const bool valid = col_valid && pos0 + row < k_len;
    const int64_t offset = base + u * step;
    ptx::cp_async_16(to_k + dst_offset(row, col), key + offset, valid);
    ptx::cp_async_16(to_v + value_offset(row, col), value + offset, valid);
  }
}

// Copies rows of one kv head's keys and values (stored as Cache) into shared memory with 16-byte
// cp.async: this thread's rows are row0 + u * kRowStep (u < kCopies) of the tile starting at key
// position pos0, its 16-byte chunk starts at column col, and dst_offset(row, col) is the byte offset
// of (row, col) in both destination tiles (each kernel's own swizzle). Rows past k_len, rows in a page
// whose id is out of range, columns past head_size and a whole invalid tile (tile_valid false) read as
// zeros, which keeps unwritten (possibly NaN) cache slots out of P.V and never touches memory out of
// bounds. value_offset(row, col), where given, places V's elements apart from K's layout.
template <typename Cache, int kCopies, int kRowStep, typename DstOffset, typename ValueOffset>
__device__ __forceinline__ void copy_kv_rows(const KeyValueSource& kv, int seq, int kv_head, int pos0, int row0,
                                             int col, int k_len, int head_size, bool tile_valid, void* dst_k,
                                             void* dst_v, DstOffset dst_offset, ValueOffset value_offset) {
  const bool col_valid = tile_valid && col < head_size;
  if (!kv.paged()) {
    copy_contiguous_kv_rows<Cache, kCopies, kRowStep>(kv, seq, kv_head, pos0, row0, col, k_len, col_valid, dst_k, dst_v,
                                                      dst_offset, value_offset);
    return;
  }
  const Cache* key = static_cast<const Cache*>(kv.key);
  const Cache* value = static_cast<const Cache*>(kv.value);
  unsigned char* to_k = static_cast<unsigned char*>(dst_k);
  unsigned char* to_v = static_cast<unsigned char*>(dst_v);
  // Paged cache [NB, Hkv, kvbs, D]: a page lookup per row, each row copied as it comes (holding every
  // row's page, as the sm80 prefill does with PagedRows, spilled the decode kernel's main loop at
  // head dim 256).
#pragma unroll
  for (int u = 0; u < kCopies; ++u) {
    const int row = row0 + u * kRowStep;
    bool valid = col_valid;
    const int64_t offset = kv.paged_row_offset(seq, kv_head, pos0 + row, k_len, col, head_size, valid);
    ptx::cp_async_16(to_k + dst_offset(row, col), valid ? key + offset : key, valid);
    ptx::cp_async_16(to_v + value_offset(row, col), valid ? value + offset : value, valid);
  }
}
template <typename Cache, int kCopies, int kRowStep, typename DstOffset>
__device__ __forceinline__ void copy_kv_rows(const KeyValueSource& kv, int seq, int kv_head, int pos0, int row0,
                                             int col, int k_len, int head_size, bool tile_valid, void* dst_k,
                                             void* dst_v, DstOffset dst_offset) {
  copy_kv_rows<Cache, kCopies, kRowStep>(kv, seq, kv_head, pos0, row0, col, k_len, head_size, tile_valid, dst_k, dst_v,
                                         dst_offset, dst_offset);
}

}  // namespace blocksparse_attn
