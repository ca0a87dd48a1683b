// CUDA host glue of the attention ops: checks -> params -> plan -> dispatch -> launch.
//
// Nothing here reads device data, so every call can be captured in a CUDA graph. Checks that need
// values (cu_seqlens monotone, block ids in range, layout well formed) run only with
// BSA_CHECK_INPUTS=1 (common/settings.h), at the cost of a device->host copy; without them a bad block id reads
// zeros and a sequence with more queries than keys is skipped, but memory is never touched out of
// bounds.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "common/attention_args.h"
#include "common/settings.h"
#include "cuda/dispatch.h"
#include "cuda/kv_cache_launch.h"

namespace blocksparse_attn {

void launch_plan_prefill(const PlanParams& params, cudaStream_t stream);

namespace {

void check_cuda_dtype(const at::Tensor& q) {
  BSA_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "on CUDA, q must be float16 or bfloat16, got ", q.scalar_type(), " (float32 runs on the CPU only)");
}

// The kernels store out in 16-byte chunks. A contiguous out whose storage starts off a 16-byte
// boundary (a view into a flat buffer at an odd offset) would fault there: an error instead.
void check_cuda_out(const at::Tensor& out) {
  const auto misalignment = reinterpret_cast<uintptr_t>(out.data_ptr()) % 16;
  BSA_CHECK(misalignment == 0, "on CUDA, out must start on a 16-byte boundary (the kernels store it in 16-byte ",
            "chunks), got a data pointer ", misalignment, " bytes past one");
}

void check_cuda_cache(const at::Tensor& key_cache) {
  BSA_CHECK(!is_fp8(key_cache.scalar_type()) || key_cache.size(3) % 16 == 0,
            "an fp8 key_cache on CUDA needs a head size that is a multiple of 16, got ", key_cache.size(3));
}

// 16-byte cp.async needs 16-byte aligned rows: views that are not (odd strides) are copied.
at::Tensor aligned_rows(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) * t.element_size()) % 16 == 0;
  return ok ? t : t.contiguous();
}

// Which prefill kernel runs: the Hopper kernel (wgmma) where the GPU, the build and the shapes allow
// it, the sm80 kernel otherwise. BSA_PREFILL_KERNEL=sm80 or =sm90 forces one (tests, benchmarks);
// forcing sm90 where it cannot run is an error, never a silent fallback.
enum class PrefillKernel { kSm80, kSm90 };

PrefillKernel choose_prefill_kernel(const PrefillParams& params, const Settings& settings) {
  if (settings.prefill_kernel == PrefillKernelChoice::kSm80) return PrefillKernel::kSm80;
#ifdef BSA_BUILT_SM90A
  const bool built = true;
#else
  const bool built = false;
#endif
  const bool hopper = at::cuda::getCurrentDeviceProperties()->major == 9;
  const int pad = padded_head_dim(params.head_size);
  const bool shapes = (pad == 64 || pad == 128) && params.pattern.block_size % 64 == 0;
  if (built && hopper && shapes) return PrefillKernel::kSm90;
  BSA_CHECK(settings.prefill_kernel != PrefillKernelChoice::kSm90, "BSA_PREFILL_KERNEL=sm90, but the Hopper prefill kernel cannot run here: it needs a ",
            "compute capability 9.x GPU (have ", at::cuda::getCurrentDeviceProperties()->major, ".",
            at::cuda::getCurrentDeviceProperties()->minor, "), an extension built for sm_90a (",
            built ? "yes" : "no", "), head sizes up to 128 (have ", params.head_size,
            ") and a sparse_block_size that is a multiple of 64 (have ", params.pattern.block_size, ")");
  return PrefillKernel::kSm80;
}

// The keys a sequence may hold where every sequence has the same room, from host-known sizes only
// (the host never reads the lengths): the block table's capacity for the paged cache, the rows a
// sequence takes in gathered K/V (BSA_PAGED_PREFILL=gather: the same capacity); 0 for contiguous keys.
int64_t sequence_capacity(const PrefillParams& params) {
  const KeyValueSource& kv = params.kv;
  if (kv.paged()) return kv.block_table_width * kv.kv_block_size;
  return kv.seq_lens != nullptr ? kv.num_rows / std::max(params.num_seqs, 1) : 0;
}

// Keys of a typical sequence: the capacity above, or the mean of the batch for contiguous keys.
int64_t typical_sequence_keys(const PrefillParams& params) {
  const int64_t capacity = sequence_capacity(params);
  return capacity > 0 ? capacity : params.kv.num_rows / std::max(params.num_seqs, 1);
}

// True when every q head sees every causal key block of every sequence, from host-known sizes only:
// a pattern whose vertical stride is 1, or whose local band spans the longest possible sequence (the
// batch's keys, or the block table's capacity). An explicit layout would need its device data: false.
bool every_causal_block_visible(const PrefillParams& params) {
  const int64_t capacity = sequence_capacity(params);
  const int64_t longest_keys = capacity > 0 ? capacity : params.kv.num_rows;
  const int64_t last_block = (std::max<int64_t>(longest_keys, 1) - 1) >> params.pattern.block_shift;
  return every_block_visible_up_to(params.pattern, last_block);
}

// Keys per fill of the Hopper kernel (see Sm90Tiling). 128-key fills win wherever the sequences are
// not short, sparse patterns included (a fill takes any two visible 64-key tiles, so only a row's
// last odd tile fills half a stage); 64-key fills for short sequences. Dense causal on the H100, ms
// per call with 64- / 128-key fills (32k tokens a batch, processes interleaved, 2026-11-26): 1k
// 0.677 / 0.680, 2k 1.130 / 1.116, 4k 2.046 / 1.990, 8k 4.10 / 4.03, 16k 8.31 / 8.04. Phi-3-small's
// pattern, Nsight Compute cycles on the H100 (2026-12-06, after the turns, the one-warp producer and
// the count): 8k x 4 -2.6 %, 32k x 1 -7.6 %, paged at kv block 16 -4 to -5 %. An explicit layout
// takes 64 (unmeasured: its rows may hold a tile or two). BSA_SM90_STAGE_KEYS=64 or =128 forces one
// (tests, benchmarks).
int choose_sm90_stage_keys(const PrefillParams& params, const Settings& settings) {
  if (settings.sm90_stage_keys != 0) return settings.sm90_stage_keys;
  constexpr int64_t kLongSequence = 2048;  // below it the two shapes measure the same
  return !params.pattern.has_layout() && typical_sequence_keys(params) >= kLongSequence ? 128 : 64;
}

// Packs the q heads of a kv group into one Hopper work unit (PrefillParams::pack_gqa_shift: log2 of
// the heads) where every head sees the same key blocks and the group's size is a power of two up
// to 64 (each consumer group's 64 rows hold whole tokens), and the batch's query runs are short:
// a 128-row tile of one head then holds only q_len rows, of G heads G * q_len. BSA_PREFILL_PACK_GQA=1
// or =0 forces it (tests, benchmarks; forcing it where it cannot run is an error).
int choose_pack_gqa_shift(const PrefillParams& params, PrefillKernel kernel, const Settings& settings) {
  constexpr int64_t kPackGqaMaxQueryRun = 1024;  // mean queries per sequence
  if (settings.pack_gqa == PackGqaChoice::kOff) return 0;
  // Forced choices that exclude packing: the kv-head-major numbering (of unpacked units) and 128-key
  // fills (packed units take 64-key fills, sm90_pack_shift).
  const bool forced_out = settings.unit_order == UnitOrderChoice::kKvHead || settings.sm90_stage_keys == 128;
  const int group = params.pattern.q_heads_per_kv;
  const bool fits = group > 1 && group <= 64 && (group & (group - 1)) == 0;
  const bool allowed = kernel == PrefillKernel::kSm90 && fits && every_causal_block_visible(params);
  if (settings.pack_gqa == PackGqaChoice::kOn) {
    BSA_CHECK(allowed && !forced_out, "BSA_PREFILL_PACK_GQA=1, but the q heads of a kv group cannot share ",
              "work units here: that needs the Hopper prefill kernel (have ",
              kernel == PrefillKernel::kSm90 ? "yes" : "no",
              "), q heads per kv head a power of two from 2 to 64 (have ", group,
              ") and a pattern where every causal key block is visible to every head (have ",
              every_causal_block_visible(params) ? "yes" : "no",
              "), without BSA_PREFILL_UNIT_ORDER=kv_head or BSA_SM90_STAGE_KEYS=128");
  } else if (!allowed || forced_out || params.num_q_tokens > kPackGqaMaxQueryRun * int64_t{params.num_seqs}) {
    return 0;
  }
  return __builtin_ctz(group);
}

// Keys of one kv head's K and V that the L2 holds (PrefillParams::kv_head_l2_keys).
int kv_head_l2_keys(const PrefillParams& params, int64_t kv_element_size) {
  const int64_t bytes_per_key = 2 * int64_t{params.head_size} * kv_element_size;
  const int64_t l2_bytes = at::cuda::getCurrentDeviceProperties()->l2CacheSize;
  return static_cast<int>(std::min<int64_t>(l2_bytes / bytes_per_key, INT_MAX));
}

// The length above which a sequence's work units go kv head by kv head
// (PrefillParams::kv_head_major_keys): where its keys and values outgrow the L2, since tile by tile the
// CTAs in flight read all of them. Phi-3-small on the H100 (50 MB L2; a 32k sequence's K/V is 134
// MB), tile by tile against kv head by kv head, processes interleaved (2026-11-26): 32k x 1 3.12 ->
// 2.84 ms; 8k x 4 (34 MB) 1.449 -> 1.449; dense 2k and 8k were 2-4 % slower kv head by kv head. The
// kernels compare each sequence's own length (on the device), so neither a block table wider than
// the batch (an engine's max_model_len columns) nor one long sequence among short ones misleads the
// choice. BSA_PREFILL_UNIT_ORDER=tile or =kv_head forces one (tests, benchmarks).
// l2_keys: kv_head_l2_keys.
int kv_head_major_keys(const PrefillParams& params, int l2_keys, const Settings& settings) {
  if (settings.unit_order == UnitOrderChoice::kTile) return INT_MAX;
  if (settings.unit_order == UnitOrderChoice::kKvHead) return 0;
  return l2_keys / params.num_kv_heads;
}

// Keys below which a sequence numbered kv head by kv head takes its tiles last, tile by tile
// (PrefillParams::kv_tail_keys): by default those whose K and V of every kv head take half the L2
// (params.kv_head_l2_keys set), so that the tail, all kv heads at once, still reads from the L2.
int kv_tail_keys(const PrefillParams& params, const Settings& settings) {
  return settings.kv_tail_keys == kKvTailAuto ? params.kv_head_l2_keys / (2 * params.num_kv_heads)
                                              : settings.kv_tail_keys;
}

// CTAs of the persistent Hopper kernel: one per SM; BSA_SM90_GRID=<n> sets another count (experiments:
// a count at least the number of work units gives one CTA per unit).
int sm90_ctas(const Settings& settings) {
  return settings.sm90_grid > 0 ? settings.sm90_grid : at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Plans the work list on the device, then runs the prefill kernel over it.
// cache_dtype: what K/V are stored as (q's dtype, or fp8 for the paged cache).
void run_prefill(PrefillParams& params, const at::Tensor& q, at::ScalarType cache_dtype, const Settings& settings) {
  if (params.num_q_tokens == 0 || params.num_seqs == 0) return;
  const PrefillKernel kernel = choose_prefill_kernel(params, settings);
  params.pack_gqa_shift = choose_pack_gqa_shift(params, kernel, settings);
  params.units_per_item = FastDivisor(params.num_q_heads >> params.pack_gqa_shift);
  const int block_m = kernel == PrefillKernel::kSm90 ? kPrefillSm90BlockM >> params.pack_gqa_shift : kPrefillBlockM;
  const int max_tiles = static_cast<int>(params.num_q_tokens / block_m + 2 * params.num_seqs + 1);
  constexpr int kItemInts = sizeof(PlanItem) / sizeof(int32_t);
  at::Tensor workspace = at::empty({kItemInts * max_tiles + 2}, q.options().dtype(at::kInt));
  int32_t* ws = workspace.data_ptr<int32_t>();  // the allocator's blocks are aligned far beyond 16 bytes
  PlanParams plan{};
  plan.cu_seqlens_q = params.cu_seqlens_q;
  plan.cu_seqlens_k = params.kv.cu_seqlens_k;
  plan.seq_lens = params.kv.seq_lens;  // paged, or gathered (BSA_PAGED_PREFILL=gather); null: cu_seqlens_k
  const int64_t capacity = sequence_capacity(params);
  plan.max_k_len = capacity > 0 ? static_cast<int>(std::min<int64_t>(capacity, INT_MAX)) : INT_MAX;
  plan.num_seqs = params.num_seqs;
  plan.block_m = block_m;
  plan.items = reinterpret_cast<PlanItem*>(ws);
  plan.num_tiles = ws + kItemInts * max_tiles;
  plan.work_counter = ws + kItemInts * max_tiles + 1;
  params.items = plan.items;
  params.max_items = max_tiles;
  params.num_tiles = plan.num_tiles;
  params.work_counter = plan.work_counter;
  params.kv_head_l2_keys = kv_head_l2_keys(params, c10::elementSize(cache_dtype));
  params.kv_head_major_keys =
      params.pack_gqa_shift == 0 ? kv_head_major_keys(params, params.kv_head_l2_keys, settings) : INT_MAX;
  params.kv_group = settings.kv_group == kKvGroupByL2 ? 0 : kv_group_size(settings.kv_group, params.num_kv_heads);
  params.kv_tail_keys = kv_tail_keys(params, settings);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_plan_prefill(plan, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch_element_and_head_dim(q.scalar_type(), params.head_size, [&](auto element, auto pad) {
    using Element = decltype(element);
    constexpr int kPad = decltype(pad)::value;
    dispatch_cache_format<Element>(cache_dtype, [&](auto cache) {
      using Cache = decltype(cache);
      if constexpr (kPad == 64 || kPad == 128) {
        if (kernel == PrefillKernel::kSm90) {
          const Sm90Launch launch{max_tiles, sm90_ctas(settings), settings.sm90_tma};
          // fp8 caches take 64-key fills only (their producer converts each tile in registers).
          const bool fp8 = !std::is_same_v<Cache, Element>;
          BSA_CHECK(!fp8 || settings.sm90_stage_keys != 128, "BSA_SM90_STAGE_KEYS=128, but the Hopper kernel reads ",
                    "fp8 caches with 64-key fills only");
          // So do packed heads (sm90_pack_shift; choose_pack_gqa_shift never packs with 128 forced).
          const bool packed = params.pack_gqa_shift > 0;
          switch (const int stage_keys = fp8 || packed ? 64 : choose_sm90_stage_keys(params, settings)) {
            case 64: return launch_prefill_sm90<Element, kPad, 64, Cache>(params, launch, stream);
            case 128:
              if constexpr (std::is_same_v<Cache, Element>)
                return launch_prefill_sm90<Element, kPad, 128, Cache>(params, launch, stream);
              [[fallthrough]];
            default: BSA_CHECK(false, "no Hopper prefill kernel with ", stage_keys, "-key stages for this cache");
          }
        }
      }
      launch_prefill_sm80<Element, kPad, Cache>(params, max_tiles, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The query-side fields that PrefillParams and DecodeParams share.
template <typename Params>
void fill_query_fields(Params& params, const at::Tensor& out, const at::Tensor& q, const CheckedArgs& args,
                       double scale, const std::optional<at::Tensor>& lse) {
  params.q = q.data_ptr();
  params.out = out.data_ptr();
  params.lse = lse ? lse->data_ptr<float>() : nullptr;
  params.q_row_stride = q.stride(0);
  params.q_head_stride = q.stride(1);
  params.out_row_stride = out.stride(0);
  params.out_head_stride = out.stride(1);
  params.num_q_heads = static_cast<int>(args.shape.num_q_heads);
  params.num_kv_heads = static_cast<int>(args.shape.num_kv_heads);
  params.head_size = static_cast<int>(args.shape.head_size);
  params.num_seqs = static_cast<int>(args.shape.num_seqs);
  params.scale_log2 = static_cast<float>(scale * M_LOG2E);
  params.pattern = args.pattern;
}

PrefillParams query_params(const at::Tensor& out, const at::Tensor& q, const CheckedArgs& args, double scale,
                           const std::optional<at::Tensor>& lse) {
  PrefillParams params{};
  fill_query_fields(params, out, q, args, scale, lse);
  params.num_q_tokens = static_cast<int>(args.shape.num_q_tokens);
  return params;
}

// The paged cache as the kernels read it; the scales only where the cache is fp8 (a cache in the
// model's dtype ignores them).
KeyValueSource paged_source(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale) {
  KeyValueSource kv{};
  if (is_fp8(key_cache.scalar_type())) {
    kv.k_scale = k_scale ? k_scale->data_ptr<float>() : nullptr;
    kv.v_scale = v_scale ? v_scale->data_ptr<float>() : nullptr;
  }
  kv.key = key_cache.data_ptr();
  kv.value = value_cache.data_ptr();
  kv.block_tables = block_tables.data_ptr<int32_t>();
  kv.block_table_stride = block_tables.stride(0);
  kv.block_table_width = block_tables.size(-1);
  kv.seq_lens = seq_lens.data_ptr<int32_t>();
  kv.cache_block_stride = key_cache.stride(0);
  // The kernels form a page's offset as one 32 x 32-bit product (KeyValueSource::page_offset).
  TORCH_CHECK(key_cache.stride(0) <= INT32_MAX && key_cache.stride(1) <= INT32_MAX,
              "key_cache: a cache block's stride must be below 2^31 elements, got strides ", key_cache.strides());
  if (per_kv_head_tables(block_tables)) {  // a row per (sequence, kv head), one kv head per page
    kv.block_table_head_stride = block_tables.stride(1);
    kv.cache_head_stride = 0;
  } else {
    kv.block_table_head_stride = 0;
    kv.cache_head_stride = key_cache.stride(1);
  }
  kv.kv_block_size = static_cast<int>(key_cache.size(2));
  const bool power_of_two = kv.kv_block_size > 0 && (kv.kv_block_size & (kv.kv_block_size - 1)) == 0;
  kv.kv_block_shift = power_of_two ? __builtin_ctz(kv.kv_block_size) : -1;
  kv.num_cache_blocks = static_cast<int>(key_cache.size(0));
  return kv;
}

// The table values on host copies (BSA_CHECK_INPUTS): common/attention_args.h's check, with an
// explicit layout's pointers aimed at host copies too.
void check_paged_values_on_host(const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& key_cache,
                                const at::Tensor* cu_seqlens_q, const SparsePattern& pattern,
                                const std::optional<at::Tensor>& layout_crow, const std::optional<at::Tensor>& layout_col) {
  const at::Tensor lens = seq_lens.cpu(), tables = block_tables.cpu().contiguous();
  at::Tensor cu, crow, col;
  if (cu_seqlens_q) cu = cu_seqlens_q->cpu();
  SparsePattern host = pattern;
  if (pattern.has_layout()) {
    crow = layout_crow->cpu();
    col = layout_col->cpu();
    host.layout_crow = crow.data_ptr<int32_t>();
    host.layout_col = col.data_ptr<int32_t>();
  }
  check_paged_table_values(tables, lens, cu.defined() ? cu.data_ptr<int32_t>() : nullptr, key_cache.size(0),
                           key_cache.size(2), host);
}

void varlen_prefill_cuda(const at::Tensor& out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, double scale,
                         c10::IntArrayRef pattern, const std::optional<at::Tensor>& layout_crow,
                         const std::optional<at::Tensor>& layout_col, const std::optional<at::Tensor>& lse) {
  const Settings settings = read_settings();
  CheckedArgs args = check_varlen_prefill_args(out, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k,
                                               {pattern, layout_crow, layout_col}, lse, settings.check_inputs);
  check_cuda_dtype(q_in);
  check_cuda_out(out);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  BSA_CHECK(k.strides() == v.strides(), "k and v must have the same strides, got ", k.strides(), " and ",
              v.strides());
  if (settings.check_inputs) {
    check_cu_seqlens_values(cu_seqlens_q.cpu(), "cu_seqlens_q", args.shape.num_q_tokens);
    check_cu_seqlens_values(cu_seqlens_k.cpu(), "cu_seqlens_k", k.size(0));
  }
  PrefillParams params = query_params(out, q, args, scale, lse);
  params.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  params.kv.key = k.data_ptr();
  params.kv.value = v.data_ptr();
  params.kv.row_stride = k.stride(0);
  params.kv.head_stride = k.stride(1);
  params.kv.num_rows = k.size(0);
  params.kv.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  run_prefill(params, q, q.scalar_type(), settings);
}

// BSA_PAGED_PREFILL=gather|auto: the sequences' keys and values copied out of the pages into
// contiguous tensors in the model's dtype (fp8 pages widened, exactly), sequence s's at rows
// s * capacity ..., capacity the block table's width times kvbs (known on the host: no device-to-host
// copy of seq_lens), and params.kv pointed at them, so that the prefill runs the contiguous path. An
// fp8 cache's scales go with them: both prefill kernels fold k_scale into the softmax scale and
// v_scale into O wherever they are given, as for the pages. The tensors are freed stream-ordered when
// the caller drops them. Leaves params.kv (the pages) where the gather does not apply.
struct GatheredKeyValues {
  at::Tensor key, value, starts;
};
GatheredKeyValues gather_paged_source(PrefillParams& params, const at::Tensor& q, const at::Tensor& key_cache,
                                      const at::Tensor& seq_lens, const AttentionShape& shape) {
  const int64_t capacity = sequence_capacity(params);  // params.kv: the pages
  // (gridDim.y of the gather takes the sequences: at most 65,535)
  if (shape.num_q_tokens == 0 || capacity == 0 || shape.num_seqs * capacity > INT_MAX || shape.num_seqs > 65535)
    return {};
  const int64_t rows = shape.num_seqs * capacity;
  GatheredKeyValues g;
  g.key = at::empty({rows, params.num_kv_heads, params.head_size}, key_cache.options().dtype(q.scalar_type()));
  g.value = at::empty_like(g.key);
  g.starts = at::arange(0, rows + 1, capacity, seq_lens.options());
  GatherParams gather{};
  gather.kv = params.kv;
  gather.key_out = g.key.data_ptr();
  gather.value_out = g.value.data_ptr();
  gather.capacity = static_cast<int>(capacity);
  gather.head_size = params.head_size;
  gather.chunks_per_token = FastDivisor(params.num_kv_heads * params.head_size / 8);
  gather.chunks_per_row = FastDivisor(params.head_size / 8);
  const at::ScalarType stored = key_cache.scalar_type();
  const GatherCache cache = stored == at::kFloat8_e4m3fn ? GatherCache::kE4m3
                            : stored == at::kFloat8_e5m2 ? GatherCache::kE5m2
                                                         : GatherCache::kModelDtype;
  launch_gather_paged_kv(gather, static_cast<int>(shape.num_seqs), cache, q.scalar_type() == at::kBFloat16,
                         at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  KeyValueSource kv{};
  kv.key = g.key.data_ptr();
  kv.value = g.value.data_ptr();
  kv.row_stride = g.key.stride(0);
  kv.head_stride = g.key.stride(1);
  kv.num_rows = rows;
  kv.cu_seqlens_k = g.starts.data_ptr<int32_t>();
  kv.seq_lens = params.kv.seq_lens;  // each sequence's length (its rows start at cu_seqlens_k)
  kv.k_scale = params.kv.k_scale;    // an fp8 cache's, else null
  kv.v_scale = params.kv.v_scale;
  params.kv = kv;
  return g;
}

// BSA_PAGED_PREFILL: whether this paged prefill gathers, from host-known sizes only. auto never gathers
// where the Hopper kernel reads the pages with 128-key fills through the TMA in the model's dtype (the
// two warp pairs of BSA_SM90_PAGED_PAIRS): there the pages cost about what contiguous K/V do, and the
// gather only adds its copy and its transient. As x the contiguous time, direct against gathered, bf16
// pages at kv block 16 (H200, 2026-12-07): whole prompts 1.05x against 1.06x at 8k x 4, 1.03x against
// 1.03x at 32k x 1; 2k chunks 1.05x against 1.18x and 1.27x. Elsewhere it gathers where the queries
// cover at least half of the rows it would gather (whole prompts, or chunks that are most of their
// context), or a quarter of them where the direct path reads pages dearly (an fp8 cache, or the
// portable kernel): 2k chunks of 8k prompts (a quarter), direct against gathered, Hopper kernel, e4m3
// pages 1.33x against 1.05x (their widening is in the direct path's 64-key fills); portable kernel,
// bf16 pages 1.12x against 1.07x (H200, 2026-12-05; 1.13x against 1.10x on an H100). The transient is
// at most two (four) times the queries' rows of K and V, no larger than q itself (twice q) with 4 or
// more q heads a kv head. A chunk over a longer context keeps the direct path, which reads only the
// tiles the pattern shows it where the gather would copy the whole context (2k chunks of 32k, portable
// kernel: 1.06x direct, 1.27x gathered, H100).
bool choose_paged_gather(const PrefillParams& params, bool fp8_cache, const Settings& settings) {
  switch (settings.paged_prefill) {
    case PagedPrefillChoice::kDirect: return false;
    case PagedPrefillChoice::kGather: return true;
    case PagedPrefillChoice::kAuto: break;
  }
  const PrefillKernel kernel = choose_prefill_kernel(params, settings);
  const bool hopper_page_fills = kernel == PrefillKernel::kSm90 && !fp8_cache && settings.sm90_tma &&
                                 params.kv.sm90_tma_pages() && choose_pack_gqa_shift(params, kernel, settings) == 0 &&
                                 choose_sm90_stage_keys(params, settings) == 128;
  if (hopper_page_fills) return false;
  const bool dear_pages = fp8_cache || kernel == PrefillKernel::kSm80;
  const int64_t covered_share = dear_pages ? 4 : 2;  // the queries cover 1 / covered_share of the rows or more
  return covered_share * params.num_q_tokens >= params.num_seqs * sequence_capacity(params);
}

void paged_prefill_cuda(const at::Tensor& out, const at::Tensor& q_in, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                        const at::Tensor& seq_lens, double scale, c10::IntArrayRef pattern,
                        const std::optional<at::Tensor>& layout_crow, const std::optional<at::Tensor>& layout_col,
                        const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale) {
  const Settings settings = read_settings();
  CheckedArgs args = check_paged_prefill_args(out, q_in, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens,
                                              {pattern, layout_crow, layout_col}, lse, {k_scale, v_scale},
                                              settings.check_inputs);
  check_cuda_dtype(q_in);
  check_cuda_out(out);
  check_cuda_cache(key_cache);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_rows(q_in);
  if (settings.check_inputs) {
    check_cu_seqlens_values(cu_seqlens_q.cpu(), "cu_seqlens_q", args.shape.num_q_tokens);
    check_paged_values_on_host(block_tables, seq_lens, key_cache, &cu_seqlens_q, args.pattern, layout_crow,
                               layout_col);
  }
  PrefillParams params = query_params(out, q, args, scale, lse);
  params.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  params.kv = paged_source(key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale);
  GatheredKeyValues gathered;  // BSA_PAGED_PREFILL=gather|auto: lives until the stream has used it
  if (choose_paged_gather(params, is_fp8(key_cache.scalar_type()), settings))
    gathered = gather_paged_source(params, q, key_cache, seq_lens, args.shape);
  run_prefill(params, q, params.kv.paged() ? key_cache.scalar_type() : q.scalar_type(), settings);
}

// How many CTAs share one sequence's key blocks. Host-known integers only (batch size, kv heads,
// the block table's capacity, the kernel's occupancy), never device data, so the choice is fixed for a
// captured CUDA graph. Sequences of equal length make CTAs of equal work that run in waves of `slots`,
// so a last wave mostly empty costs nearly a whole one (512 units on 396 slots run as 2 waves, 65 %
// full): split into the fewest parts whose waves are >= 90 % full, or the fullest the work allows,
// keeping each split at least 4 slices per warp so the ring is worth filling. Several waves' worth of
// units need no split.
int choose_decode_splits(int64_t units, int64_t ctas_per_sm, int64_t max_seq_len, const Settings& settings) {
  if (settings.decode_splits > 0)  // tests and benchmarks; the merge takes at most kMaxDecodeSplits
    return static_cast<int>(std::min<int64_t>(settings.decode_splits, kMaxDecodeSplits));
  const int64_t slots = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * ctas_per_sm;
  if (units >= 4 * slots) return 1;
  const int64_t max_slices = (max_seq_len + kDecodeSliceTokens - 1) / kDecodeSliceTokens;
  const int64_t limit = std::min<int64_t>(std::max<int64_t>(1, max_slices / (4 * kDecodeWarpsPerCta)), kMaxDecodeSplits);
  int64_t best = 1, best_filled = 0;  // fullness in 1/1000 of the waves' slots
  for (int64_t splits = 1; splits <= limit; ++splits) {
    const int64_t ctas = units * splits, waves = (ctas + slots - 1) / slots;
    const int64_t filled = ctas * 1000 / (waves * slots);
    if (filled > best_filled) best = splits, best_filled = filled;
    if (filled >= 900) break;
  }
  return static_cast<int>(best);
}

// Whether a decode's splits merge on chip, each group's splits one thread-block cluster that combines
// them through distributed shared memory (sm_90, up to the cluster size the device holds), or through
// partials in global memory and a merge kernel (a second kernel on a small decode's path).
// `auto` takes the cluster only while the whole grid fits one CTA per SM. Measured on the H200
// (2026-12-04, graph-replayed, Phi-3-small layer): the cluster took 1 x 2k from 7.7 to 7.2 us (64 CTAs),
// but grids of 256-512 CTAs in clusters of 4-16 ran 1.3-1.6x slower than with the merge kernel
// (4 x 2k: 9.4 -> 15.2 us), as if a cluster's CTAs were packed onto fewer SMs than the spread launch.
// BSA_DECODE_MERGE=kernel or =cluster forces one (tests, benchmarks); forcing `cluster` where the
// splits cannot form a cluster is an error.
bool choose_decode_cluster_merge(int64_t units, int splits, int max_cluster_splits, const Settings& settings) {
  if (splits < 2 || settings.decode_merge == DecodeMergeChoice::kKernel) return false;
  const bool fits = splits <= max_cluster_splits;
  BSA_CHECK(fits || settings.decode_merge != DecodeMergeChoice::kCluster, "BSA_DECODE_MERGE=cluster, but ", splits,
            " decode splits do not fit one thread-block cluster on this GPU (at most ", max_cluster_splits,
            "; 0: no clusters below compute capability 9.0)");
  if (settings.decode_merge == DecodeMergeChoice::kCluster) return true;
  return fits && units * splits <= at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

void paged_decode_cuda(const at::Tensor& out, const at::Tensor& q_in, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       double scale, c10::IntArrayRef pattern, const std::optional<at::Tensor>& layout_crow,
                       const std::optional<at::Tensor>& layout_col, const std::optional<at::Tensor>& lse,
                       const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const Settings settings = read_settings();
  CheckedArgs args = check_paged_decode_args(out, q_in, key_cache, value_cache, block_tables, seq_lens,
                                             {pattern, layout_crow, layout_col}, lse, {k_scale, v_scale},
                                             settings.check_inputs);
  check_cuda_dtype(q_in);
  check_cuda_out(out);
  check_cuda_cache(key_cache);
  BSA_CHECK(args.pattern.block_size % kDecodeSliceTokens == 0, "on CUDA, sparse_block_size must be a multiple of ",
            kDecodeSliceTokens, ", got ", args.pattern.block_size);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_rows(q_in);
  if (settings.check_inputs)
    check_paged_values_on_host(block_tables, seq_lens, key_cache, nullptr, args.pattern, layout_crow, layout_col);
  if (args.shape.num_seqs == 0) return;
  BSA_CHECK(args.shape.num_seqs <= 65535, "paged_decode on CUDA takes at most 65535 sequences per call (one grid "
            "dimension), got ", args.shape.num_seqs);

  DecodeParams params{};
  fill_query_fields(params, out, q, args, scale, lse);
  params.kv = paged_source(key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale);
  params.head_chunks = static_cast<int>((args.pattern.q_heads_per_kv + kDecodeHeadsPerCta - 1) / kDecodeHeadsPerCta);
  int ctas_per_sm = 1, small_grid_ctas_per_sm = 0, max_cluster_splits = 0;
  dispatch_element_and_head_dim(q.scalar_type(), params.head_size, [&](auto element, auto pad) {
    using Element = decltype(element);
    dispatch_cache_format<Element>(key_cache.scalar_type(), [&](auto cache) {
      ctas_per_sm = decode_sm80_ctas_per_sm<Element, decltype(pad)::value, decltype(cache)>();
      small_grid_ctas_per_sm = decode_sm80_small_grid_ctas_per_sm<Element, decltype(pad)::value, decltype(cache)>();
      max_cluster_splits = decode_sm80_max_cluster_splits<Element, decltype(pad)::value, decltype(cache)>();
    });
  });
  const int64_t units = int64_t{params.num_seqs} * params.num_kv_heads * params.head_chunks;
  const int64_t max_seq_len = block_tables.size(-1) * key_cache.size(2);
  params.num_splits = choose_decode_splits(units, ctas_per_sm, max_seq_len, settings);
  // An fp8 cache's small-grid build runs a grid that fits one wave of it, with the splits planned at
  // its own occupancy where those fit: fewer CTAs with more registers each (H200, graph-replayed, e4m3
  // 4 x 8k: 8 splits of the 2-CTA build 16.1 us against 16 splits of the 4-CTA build 18.2).
  if (small_grid_ctas_per_sm > 0) {
    const int64_t one_wave = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * small_grid_ctas_per_sm;
    const int splits = choose_decode_splits(units, small_grid_ctas_per_sm, max_seq_len, settings);
    if (units * splits <= one_wave) params.num_splits = splits;
    params.small_grid_build = units * params.num_splits <= one_wave;
  }
  params.cluster_merge = choose_decode_cluster_merge(units, params.num_splits, max_cluster_splits, settings);
  // Split partials come from the caching allocator: no device sync, and stable inside a CUDA graph's
  // private pool, so capture and replay work; no split or a cluster merge, no workspace.
  at::Tensor partial_out, partial_lse;
  if (params.num_splits > 1 && !params.cluster_merge) {
    partial_out = at::empty({args.shape.num_seqs, args.shape.num_q_heads, params.num_splits, args.shape.head_size},
                            q.options().dtype(at::kFloat));
    partial_lse = at::empty({args.shape.num_seqs, args.shape.num_q_heads, params.num_splits},
                            q.options().dtype(at::kFloat));
    params.partial_out = partial_out.data_ptr<float>();
    params.partial_lse = partial_lse.data_ptr<float>();
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_element_and_head_dim(q.scalar_type(), params.head_size, [&](auto element, auto pad) {
    using Element = decltype(element);
    dispatch_cache_format<Element>(key_cache.scalar_type(), [&](auto cache) {
      launch_decode_sm80<Element, decltype(pad)::value, decltype(cache)>(params, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace blocksparse_attn

TORCH_LIBRARY_IMPL(blocksparse_attn, CUDA, m) {
  m.impl("varlen_prefill", &blocksparse_attn::varlen_prefill_cuda);
  m.impl("paged_prefill", &blocksparse_attn::paged_prefill_cuda);
  m.impl("paged_decode", &blocksparse_attn::paged_decode_cuda);
}
