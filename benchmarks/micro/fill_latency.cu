// How fast one SM can fill a ring of K/V stages from pages of different sizes: the paged prefill's
// question (issue 20), measured apart from the attention kernel. Each CTA (one per SM) streams fills
// of 64 keys x 128 dims of K and of V (bf16: 32 KB a fill, as the Hopper prefill kernel's 64-key
// stages) through a ring of 4 stages. A consumer warp waits for each fill and frees its stage after
// a fixed delay (the consumers' compute per fill), so the time per fill shows whether the loads keep
// up. The cache is [pages, page rows, 128] bf16 (one kv head's slabs), pages in shuffled order, each
// fill's page ids read from a table in global memory right before its loads (as the kernel does).
// Three ways to load a fill:
//   tma:      one TMA box per page and 64-column block, issued by one lane each (the kernel's way);
//   tma-one:  the same boxes, all issued by lane 0 (one thread queues them);
//   cp.async: 128 producer threads copy 16-byte chunks, completing on the stage's barrier through
//             cp.async.mbarrier.arrive.noinc (no wait_group in the producer).
// Build and run on an sm_90 GPU (torch-free; the repository's PTX wrappers):
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -Icsrc benchmarks/micro/fill_latency.cu \
//     -o /tmp/fill_latency && /tmp/fill_latency
// Prints, per page size, load mode and consumer delay: ns per fill (median over CTAs) and the SM's
// fill bandwidth.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/kernels/ptx_sm90.cuh"

namespace {

using namespace blocksparse_attn;

constexpr int kStages = 4;
constexpr int kKeys = 64;           // keys per fill
constexpr int kDim = 128;           // head dim (two 64-column blocks of 128 bytes)
constexpr int kBlockBytes = kKeys * 128;           // one 64-column block of a fill, K or V
constexpr int kFillBytes = 2 * 2 * kBlockBytes;    // K and V, two blocks each: 32 KB
constexpr int kProducerThreads = 128;
constexpr int kThreads = kProducerThreads + 32;    // + one consumer warp

enum Mode { kTma = 0, kTmaOne = 1, kCpAsync = 2 };
const char* kModeNames[] = {"tma", "tma-one", "cp.async"};

struct Args {
  const __nv_bfloat16* key;
  const __nv_bfloat16* value;
  const int* table;  // page ids, [pages] (shuffled)
  int page_rows;
  int pages;
  int fills;         // per CTA
  int mode;
  long long delay_cycles;  // the consumer's work per fill
  long long* ns;           // per CTA: the consumer's time for all fills
};

__device__ __forceinline__ long long global_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(ptx::smem_addr(bar)) : "memory");
}

__global__ void __launch_bounds__(kThreads, 1)
fill_kernel(const __grid_constant__ CUtensorMap key_map, const __grid_constant__ CUtensorMap value_map, Args a) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
  const int tid = threadIdx.x;
  const bool cp_async = a.mode == kCpAsync;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(&full[s], cp_async ? kProducerThreads : 1);
      ptx::mbarrier_init(&empty[s], 32);
    }
    ptx::mbarrier_init_fence();
  }
  __syncthreads();
  const int boxes_per_block = kKeys / a.page_rows;  // pages per fill
  const long long start = global_ns();
  if (tid < kProducerThreads) {
    for (int n = 0; n < a.fills; ++n) {
      const int stage = n % kStages;
      if (n >= kStages) ptx::mbarrier_wait(&empty[stage], ((n / kStages) + 1) & 1);
      unsigned char* dst_k = smem + stage * kFillBytes;
      unsigned char* dst_v = dst_k + 2 * kBlockBytes;
      // The fill's keys: 64 consecutive positions of a sequence whose pages are scattered.
      const int first_page_index = (static_cast<long long>(blockIdx.x) * a.fills + n) * boxes_per_block % a.pages;
      if (a.mode == kTma || a.mode == kTmaOne) {
        if (tid < 32) {
          if (tid == 0) ptx::mbarrier_expect_tx(&full[stage], kFillBytes);
          const int box_count = 2 * boxes_per_block;  // (page, column block) pairs
          for (int i = a.mode == kTma ? tid : 0; i < box_count; i += a.mode == kTma ? 32 : 1) {
            if (a.mode == kTmaOne && tid != 0) break;
            const int box = i / 2, block = i % 2;
            const int page = a.table[(first_page_index + box) % a.pages];
            const int dst = block * kBlockBytes + box * a.page_rows * 128;
            ptx::tma_load_3d(dst_k + dst, &key_map, block * 64, 0, page, &full[stage]);
            ptx::tma_load_3d(dst_v + dst, &value_map, block * 64, 0, page, &full[stage]);
          }
          if (tid == 0) ptx::mbarrier_arrive(&full[stage]);
        }
      } else {
        // 16-byte chunks: 64 rows x 16 chunks of K and of V; thread t takes chunk t % 16 of rows
        // t / 16 + 8 u (the page looked up once per row group).
        const int chunk = tid % 16, row0 = tid / 16;
        for (int u = 0; u < kKeys / 8; ++u) {
          const int row = row0 + 8 * u;
          const int page = a.table[(first_page_index + row / a.page_rows) % a.pages];
          const long long offset = (static_cast<long long>(page) * a.page_rows + row % a.page_rows) * kDim + chunk * 8;
          const int dst = (chunk / 8) * kBlockBytes + row * 128 + ((chunk % 8) ^ (row % 8)) * 16;
          ptx::cp_async_16(dst_k + dst, a.key + offset, true);
          ptx::cp_async_16(dst_v + dst, a.value + offset, true);
        }
        cp_async_arrive_noinc(&full[stage]);
      }
    }
  } else {
    const int lane = tid - kProducerThreads;
    float sink = 0.f;
    for (int n = 0; n < a.fills; ++n) {
      const int stage = n % kStages;
      ptx::mbarrier_wait(&full[stage], (n / kStages) & 1);
      sink += reinterpret_cast<const float*>(smem + stage * kFillBytes)[lane];  // touch the fill
      const long long until = clock64() + a.delay_cycles;
      while (clock64() < until) {
      }
      ptx::mbarrier_arrive(&empty[stage]);
    }
    if (sink == 12345.f) a.ns[0] = 0;  // keeps the reads
    if (lane == 0) a.ns[blockIdx.x] = global_ns() - start;
  }
}

#define CHECK(call)                                                                          \
  do {                                                                                       \
    cudaError_t e = (call);                                                                  \
    if (e != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

CUtensorMap page_map(const void* base, int pages, int page_rows) {
  CUtensorMap map{};
  const cuuint64_t dims[3] = {kDim, static_cast<cuuint64_t>(page_rows), static_cast<cuuint64_t>(pages)};
  const cuuint64_t strides[2] = {kDim * 2, static_cast<cuuint64_t>(page_rows) * kDim * 2};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(page_rows), 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  static const auto encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      std::fprintf(stderr, "cuTensorMapEncodeTiled not found\n");
      std::exit(1);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dims,
                                            strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed (%d)\n", static_cast<int>(r));
    std::exit(1);
  }
  return map;
}

}  // namespace

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  // K and V of 256k keys (64 MB each): working sets of 32k keys (16 MB, L2-resident) and of 256k
  // (128 MB, past the 50 MB L2).
  const long long max_rows = 256 * 1024;
  const size_t bytes = max_rows * kDim * 2;
  __nv_bfloat16 *key = nullptr, *value = nullptr;
  CHECK(cudaMalloc(&key, bytes));
  CHECK(cudaMalloc(&value, bytes));
  CHECK(cudaMemset(key, 0, bytes));
  CHECK(cudaMemset(value, 0, bytes));
  long long* ns = nullptr;
  CHECK(cudaMalloc(&ns, sms * sizeof(long long)));
  const int smem = kStages * kFillBytes + 1024;
  CHECK(cudaFuncSetAttribute(fill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  std::printf("%s, %d SMs; one CTA per SM, %d fills each, 4-stage ring of 32 KB fills\n", prop.name, sms, 2000);
  std::printf("%12s %10s %9s %14s %12s %14s\n", "working set", "page rows", "mode", "delay cycles", "ns / fill",
              "GB/s per SM");
  const int fills = 2000;
  for (long long rows : {32LL * 1024, max_rows}) {
    for (int page_rows : {16, 32, 64}) {
      const int pages = static_cast<int>(rows / page_rows);
      std::vector<int> table(pages);
      std::iota(table.begin(), table.end(), 0);
      std::shuffle(table.begin(), table.end(), std::mt19937(1234));
      int* d_table = nullptr;
      CHECK(cudaMalloc(&d_table, pages * sizeof(int)));
      CHECK(cudaMemcpy(d_table, table.data(), pages * sizeof(int), cudaMemcpyHostToDevice));
      const CUtensorMap key_map = page_map(key, pages, page_rows), value_map = page_map(value, pages, page_rows);
      for (int mode : {kTma, kTmaOne, kCpAsync}) {
        for (long long delay : {0LL, 800LL, 1400LL}) {
          Args a{key, value, d_table, page_rows, pages, fills, mode, delay, ns};
          for (int rep = 0; rep < 2; ++rep) fill_kernel<<<sms, kThreads, smem>>>(key_map, value_map, a);  // + warm-up
          CHECK(cudaGetLastError());
          CHECK(cudaDeviceSynchronize());
          std::vector<long long> t(sms);
          CHECK(cudaMemcpy(t.data(), ns, sms * sizeof(long long), cudaMemcpyDeviceToHost));
          std::sort(t.begin(), t.end());
          const double per_fill = static_cast<double>(t[sms / 2]) / fills;
          std::printf("%9lld MB %10d %9s %14lld %12.0f %14.1f\n", rows * kDim * 2 * 2 >> 20, page_rows, kModeNames[mode],
                      delay, per_fill, kFillBytes / per_fill);
        }
      }
      CHECK(cudaFree(d_table));
    }
  }
  return 0;
}
