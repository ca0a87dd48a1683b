// Every run-time environment knob, read and validated in one place (docs/settings.md is the table).
//
// Read per op call, not cached: tests and benchmarks flip them between calls, and the cost (a few
// getenv scans) is nothing next to a launch. An unknown value is an error naming the variable and
// the values it takes, never a silent default. The build-time knobs are setup.py's (docs/settings.md).
#pragma once

#include <cstdlib>
#include <string>

#include "checks.h"

namespace blocksparse_attn {

enum class PrefillKernelChoice { kAuto, kSm80, kSm90 };
enum class UnitOrderChoice { kAuto, kTile, kKvHead };

struct Settings {
  bool check_inputs = false;  // BSA_CHECK_INPUTS=0|1: value checks on CUDA calls (a device->host copy)
  int decode_splits = 0;      // BSA_DECODE_SPLITS=auto|n: CTAs per decode sequence (0 = auto)
  PrefillKernelChoice prefill_kernel = PrefillKernelChoice::kAuto;  // BSA_PREFILL_KERNEL=auto|sm80|sm90
  UnitOrderChoice unit_order = UnitOrderChoice::kAuto;              // BSA_PREFILL_UNIT_ORDER=auto|tile|kv_head
  int sm90_grid = 0;          // BSA_SM90_GRID=auto|n: the Hopper kernel's persistent CTAs (0 = one per SM)
  bool sm90_tma = true;       // BSA_SM90_TMA=0|1: the Hopper kernel's loads through the TMA where possible
  int sm90_stage_keys = 0;    // BSA_SM90_STAGE_KEYS=auto|64|128: its K/V fill shape (0 = auto)
};

namespace detail {
// The variable's value, or "" when unset.
inline std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

inline bool env_flag(const char* name, bool unset) {
  const std::string v = env(name);
  if (v.empty()) return unset;
  BSA_CHECK(v == "0" || v == "1", name, " must be 0 or 1, got '", v, "'");
  return v == "1";
}

// auto (or unset) -> 0; otherwise a positive integer.
inline int env_count(const char* name) {
  const std::string v = env(name);
  if (v.empty() || v == "auto") return 0;
  size_t used = 0;
  long n = 0;
  try {
    n = std::stol(v, &used);
  } catch (...) {
    used = 0;
  }
  BSA_CHECK(used == v.size() && n > 0 && n < (1L << 30), name, " must be auto or a positive integer, got '", v, "'");
  return static_cast<int>(n);
}
}  // namespace detail

inline Settings read_settings() {
  Settings s;
  s.check_inputs = detail::env_flag("BSA_CHECK_INPUTS", false);
  s.decode_splits = detail::env_count("BSA_DECODE_SPLITS");
  s.sm90_grid = detail::env_count("BSA_SM90_GRID");
  s.sm90_tma = detail::env_flag("BSA_SM90_TMA", true);

  const std::string kernel = detail::env("BSA_PREFILL_KERNEL");
  if (kernel == "sm80") s.prefill_kernel = PrefillKernelChoice::kSm80;
  else if (kernel == "sm90") s.prefill_kernel = PrefillKernelChoice::kSm90;
  else BSA_CHECK(kernel.empty() || kernel == "auto", "BSA_PREFILL_KERNEL must be auto, sm80 or sm90, got '", kernel, "'");

  const std::string order = detail::env("BSA_PREFILL_UNIT_ORDER");
  if (order == "tile") s.unit_order = UnitOrderChoice::kTile;
  else if (order == "kv_head") s.unit_order = UnitOrderChoice::kKvHead;
  else BSA_CHECK(order.empty() || order == "auto", "BSA_PREFILL_UNIT_ORDER must be auto, tile or kv_head, got '", order, "'");

  const std::string keys = detail::env("BSA_SM90_STAGE_KEYS");
  if (keys == "64" || keys == "128") s.sm90_stage_keys = std::stoi(keys);
  else BSA_CHECK(keys.empty() || keys == "auto", "BSA_SM90_STAGE_KEYS must be auto, 64 or 128, got '", keys, "'");
  return s;
}

}  // namespace blocksparse_attn
