// Every run-time environment knob, read and validated in one place (docs/settings.md is the table).
//
// Read per op call, not cached: tests and benchmarks flip them between calls. One pass over the
// environment finds every BSA_ variable: seven getenv calls, each a scan of its own, cost ~2 us per
// call, which showed in the host-bound small-batch decode (1 x 16k: 28.4 -> 30.1 us, H200). An
// unknown value is an error naming the variable and the values it takes, never a silent default. The
// build-time knobs are setup.py's (docs/settings.md).
#pragma once

#include <cstring>
#include <string>
#include <string_view>

extern char** environ;  // POSIX

#include "checks.h"

namespace blocksparse_attn {

enum class PrefillKernelChoice { kAuto, kSm80, kSm90 };
enum class UnitOrderChoice { kAuto, kTile, kKvHead };
enum class PackGqaChoice { kAuto, kOff, kOn };
enum class DecodeMergeChoice { kAuto, kKernel, kCluster };
enum class PagedPrefillChoice { kDirect, kGather, kAuto };
constexpr int kKvGroupByL2 = -1;  // Settings::kv_group of BSA_PREFILL_KV_GROUP=l2
constexpr int kKvTailAuto = -1;   // Settings::kv_tail_keys of BSA_PREFILL_KV_TAIL=auto (unset)

struct Settings {
  bool check_inputs = false;  // BSA_CHECK_INPUTS=0|1: value checks on CUDA calls (a device->host copy)
  int decode_splits = 0;      // BSA_DECODE_SPLITS=auto|n: CTAs per decode sequence (0 = auto)
  DecodeMergeChoice decode_merge = DecodeMergeChoice::kAuto;        // BSA_DECODE_MERGE=auto|kernel|cluster
  PrefillKernelChoice prefill_kernel = PrefillKernelChoice::kAuto;  // BSA_PREFILL_KERNEL=auto|sm80|sm90
  UnitOrderChoice unit_order = UnitOrderChoice::kAuto;              // BSA_PREFILL_UNIT_ORDER=auto|tile|kv_head
  int kv_group = 0;  // BSA_PREFILL_KV_GROUP=auto|l2|n: kv heads numbered together kv head by kv head
                     // (0 = auto: 1; kKvGroupByL2: per sequence, as many as the L2 holds)
  // BSA_PREFILL_KV_TAIL=auto|off|n: numbered kv head by kv head, a sequence's tiles below n keys go last,
  // tile by tile (kKvTailAuto: those whose K/V of every kv head take half the L2; off: 0, none)
  int kv_tail_keys = kKvTailAuto;
  PackGqaChoice pack_gqa = PackGqaChoice::kAuto;                    // BSA_PREFILL_PACK_GQA=auto|0|1
  int sm90_grid = 0;          // BSA_SM90_GRID=auto|n: the Hopper kernel's persistent CTAs (0 = one per SM)
  bool sm90_tma = true;       // BSA_SM90_TMA=0|1: the Hopper kernel's loads through the TMA where possible
  int sm90_stage_keys = 0;    // BSA_SM90_STAGE_KEYS=auto|64|128: its K/V fill shape (0 = auto)
  // BSA_PAGED_PREFILL=direct|gather|auto: a CUDA paged prefill reads the pages (direct), or copies the
  // sequences' keys and values into contiguous tensors in the model's dtype first (fp8 pages widened)
  // and runs the contiguous path (gather), or gathers where the queries cover at least half of the gathered
  // rows (auto, the default: whole prompts gather, chunks over a longer context read the pages, so the
  // transient stays bounded by the batch). H100, kv block 16, paged/varlen of whole prompts at 8k x 4:
  // e4m3 pages 1.01-1.07x gathered against 1.52-1.62x direct; bf16 pages 1.11-1.18x against 1.21-1.30x
  // (methods interleaved; until 2026-12-05 `direct` fell through to auto, so earlier "direct" whole
  // prompts were gathered).
  PagedPrefillChoice paged_prefill = PagedPrefillChoice::kAuto;
};

namespace detail {
// The run-time knobs' raw values ("" when unset), from one pass over the environment.
struct RawSettings {
  std::string_view check_inputs, decode_splits, decode_merge, prefill_kernel, unit_order, kv_group, kv_tail, pack_gqa,
      sm90_grid, sm90_tma, sm90_stage_keys, paged_prefill;
};

inline RawSettings raw_settings() {
  RawSettings raw;
  const std::pair<std::string_view, std::string_view RawSettings::*> knobs[] = {
      {"BSA_CHECK_INPUTS", &RawSettings::check_inputs},   {"BSA_DECODE_SPLITS", &RawSettings::decode_splits},
      {"BSA_DECODE_MERGE", &RawSettings::decode_merge},
      {"BSA_PREFILL_KERNEL", &RawSettings::prefill_kernel}, {"BSA_PREFILL_UNIT_ORDER", &RawSettings::unit_order},
      {"BSA_PREFILL_KV_GROUP", &RawSettings::kv_group},     {"BSA_PREFILL_KV_TAIL", &RawSettings::kv_tail},
      {"BSA_PREFILL_PACK_GQA", &RawSettings::pack_gqa},
      {"BSA_SM90_GRID", &RawSettings::sm90_grid},         {"BSA_SM90_TMA", &RawSettings::sm90_tma},
      {"BSA_SM90_STAGE_KEYS", &RawSettings::sm90_stage_keys}, {"BSA_PAGED_PREFILL", &RawSettings::paged_prefill}};
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    if (std::strncmp(*entry, "BSA_", 4) != 0) continue;
    const std::string_view text(*entry);
    const size_t eq = text.find('=');
    if (eq == std::string_view::npos) continue;
    for (const auto& [name, field] : knobs)
      if (text.substr(0, eq) == name) raw.*field = text.substr(eq + 1);
  }
  return raw;
}

inline bool parse_flag(const char* name, std::string_view v, bool unset) {
  if (v.empty()) return unset;
  BSA_CHECK(v == "0" || v == "1", name, " must be 0 or 1, got '", std::string(v), "'");
  return v == "1";
}

// auto (or unset) -> 0; otherwise a positive integer (`expected` names the values the knob takes).
inline int parse_count(const char* name, std::string_view v, const char* expected = "auto or a positive integer") {
  if (v.empty() || v == "auto") return 0;
  long n = 0;
  bool digits = v.size() <= 9;  // at most 9 digits: n stays far inside a long
  for (size_t i = 0; digits && i < v.size(); ++i) {
    digits = v[i] >= '0' && v[i] <= '9';
    n = n * 10 + (v[i] - '0');
  }
  BSA_CHECK(digits && n > 0, name, " must be ", expected, ", got '", std::string(v), "'");
  return static_cast<int>(n);
}
}  // namespace detail

inline Settings read_settings() {
  const detail::RawSettings raw = detail::raw_settings();
  Settings s;
  s.check_inputs = detail::parse_flag("BSA_CHECK_INPUTS", raw.check_inputs, false);
  s.decode_splits = detail::parse_count("BSA_DECODE_SPLITS", raw.decode_splits);
  s.kv_group = raw.kv_group == "l2" ? kKvGroupByL2
                                     : detail::parse_count("BSA_PREFILL_KV_GROUP", raw.kv_group,
                                                           "auto, l2 or a positive integer");
  if (raw.kv_tail == "off") s.kv_tail_keys = 0;
  else if (const int keys = detail::parse_count("BSA_PREFILL_KV_TAIL", raw.kv_tail, "auto, off or a positive integer"))
    s.kv_tail_keys = keys;
  s.sm90_grid = detail::parse_count("BSA_SM90_GRID", raw.sm90_grid);
  s.sm90_tma = detail::parse_flag("BSA_SM90_TMA", raw.sm90_tma, true);

  const std::string_view merge = raw.decode_merge;
  if (merge == "kernel") s.decode_merge = DecodeMergeChoice::kKernel;
  else if (merge == "cluster") s.decode_merge = DecodeMergeChoice::kCluster;
  else BSA_CHECK(merge.empty() || merge == "auto", "BSA_DECODE_MERGE must be auto, kernel or cluster, got '",
                 std::string(merge), "'");

  const std::string_view kernel = raw.prefill_kernel;
  if (kernel == "sm80") s.prefill_kernel = PrefillKernelChoice::kSm80;
  else if (kernel == "sm90") s.prefill_kernel = PrefillKernelChoice::kSm90;
  else BSA_CHECK(kernel.empty() || kernel == "auto", "BSA_PREFILL_KERNEL must be auto, sm80 or sm90, got '",
                 std::string(kernel), "'");

  const std::string_view order = raw.unit_order;
  if (order == "tile") s.unit_order = UnitOrderChoice::kTile;
  else if (order == "kv_head") s.unit_order = UnitOrderChoice::kKvHead;
  else BSA_CHECK(order.empty() || order == "auto", "BSA_PREFILL_UNIT_ORDER must be auto, tile or kv_head, got '",
                 std::string(order), "'");

  const std::string_view pack = raw.pack_gqa;
  if (pack == "0" || pack == "1") s.pack_gqa = pack == "1" ? PackGqaChoice::kOn : PackGqaChoice::kOff;
  else BSA_CHECK(pack.empty() || pack == "auto", "BSA_PREFILL_PACK_GQA must be auto, 0 or 1, got '", std::string(pack),
                 "'");

  const std::string_view paged = raw.paged_prefill;
  if (paged == "gather") s.paged_prefill = PagedPrefillChoice::kGather;
  else if (paged == "direct") s.paged_prefill = PagedPrefillChoice::kDirect;
  else BSA_CHECK(paged.empty() || paged == "auto", "BSA_PAGED_PREFILL must be direct, gather or auto, got '",
                 std::string(paged), "'");

  const std::string_view keys = raw.sm90_stage_keys;
  if (keys == "64" || keys == "128") s.sm90_stage_keys = keys == "64" ? 64 : 128;
  else BSA_CHECK(keys.empty() || keys == "auto", "BSA_SM90_STAGE_KEYS must be auto, 64 or 128, got '",
                 std::string(keys), "'");
  return s;
}

}  // namespace blocksparse_attn
