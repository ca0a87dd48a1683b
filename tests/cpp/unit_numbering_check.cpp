// The kv-head-major numbering of a sequence's work units (kv_major_unit, kv_group_size,
// kv_group_for_l2 in csrc/cuda/kernels/params.h): for every kv head count, q heads per kv head,
// requested group size and tile count below, every (q head, tile) exactly once; the units of a group
// of kv heads contiguous and in group order; each group's tiles from the last one back, its q heads
// side by side; groups of one kv head as numbered before groups existed, and a group of all kv heads
// as tile by tile; the tail's tiles (the sequence's first ones) last, tile by tile. The L2's group: the
// largest power of two dividing the kv heads whose K/V fit. Built and run by tests/test_cpp_checks.py;
// prints the first mismatch and exits 1, else the number of checks.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/kernels/params.h"

using blocksparse_attn::FastDivisor;
using blocksparse_attn::kv_group_for_l2;
using blocksparse_attn::kv_group_size;
using blocksparse_attn::kv_major_unit;
using blocksparse_attn::KvMajorUnit;

int main() {
  int64_t checks = 0;
  auto fail = [](const char* what, int hkv, int hpk, int g, int tiles, int local) {
    std::printf("%s: kv heads %d, q heads a kv head %d, group %d, tiles %d, unit %d\n", what, hkv, hpk, g, tiles,
                local);
    return 1;
  };
  const int tile_counts[] = {1, 2, 3, 5, 8, 13, 31, 64, 127, 256, 513};
  for (int hkv = 1; hkv <= 12; ++hkv) {
    for (int requested = -1; requested <= hkv + 2; ++requested) {
      const int g = kv_group_size(requested, hkv);
      int want = 1;  // the largest divisor of hkv not above max(requested, 1)
      for (int d = 1; d <= hkv; ++d)
        if (hkv % d == 0 && d <= (requested < 1 ? 1 : requested)) want = d;
      ++checks;
      if (g != want) return fail("kv_group_size", hkv, 0, requested, 0, 0);
      for (const int hpk : {1, 2, 3, 4, 8}) {
        const int hq = hkv * hpk, group_heads = g * hpk;
        const FastDivisor heads_per_kv(hpk);
        for (const int tiles : tile_counts) {
          for (const int tail : {0, 1, tiles / 3, tiles - 1, tiles}) {
            std::vector<char> seen(static_cast<size_t>(hq) * tiles, 0);
            const int group_tiles = tiles - tail, group_units = group_tiles * group_heads;
            for (int local = 0; local < tiles * hq; ++local) {
              const KvMajorUnit u = kv_major_unit(local, tiles, tail, g, hkv, heads_per_kv);
              ++checks;
              if (u.head < 0 || u.head >= hq || u.tiles_back < 0 || u.tiles_back >= tiles)
                return fail("out of range", hkv, hpk, g, tiles, local);
              char& once = seen[static_cast<size_t>(u.head) * tiles + u.tiles_back];
              if (once++) return fail("a (head, tile) twice", hkv, hpk, g, tiles, local);
              if (local >= group_tiles * hq) {  // the tail: tile by tile, from its last tile back
                const int r = local - group_tiles * hq;
                if (u.tiles_back != group_tiles + r / hq || u.head != r % hq)
                  return fail("the tail tile by tile", hkv, hpk, g, tiles, local);
                continue;
              }
              const int rest = local % group_units;
              if (u.head / hpk / g != local / group_units) return fail("group order", hkv, hpk, g, tiles, local);
              if (u.tiles_back != rest / group_heads || u.head % group_heads != rest % group_heads)
                return fail("tiles from the last, heads side by side", hkv, hpk, g, tiles, local);
              if (g == 1) {  // the numbering before groups: kv head by kv head
                const int kv_head = local / (group_tiles * hpk), r = local - kv_head * group_tiles * hpk;
                if (u.tiles_back != r / hpk || u.head != kv_head * hpk + r % hpk)
                  return fail("groups of one kv head", hkv, hpk, g, tiles, local);
              }
              if (g == hkv && (u.tiles_back != local / hq || u.head != local % hq))  // tile by tile
                return fail("a group of every kv head", hkv, hpk, g, tiles, local);
            }
          }
        }
      }
    }
  }
  // The L2's group: Phi-3-small's layer (8 kv heads, one kv head's K/V 512 bytes a key, a 50 MB L2:
  // 102,400 keys) takes 8 at 8k, 4 at 16k, 2 at 32k and 1 from 64k, as FA4's scheduler does.
  const int l2_keys = 50 * 1024 * 1024 / 512;
  const int phi3[][2] = {{8192, 8}, {16384, 4}, {32768, 2}, {65536, 1}, {131072, 1}, {1, 8}, {0, 8}};
  for (const auto& [k_len, want] : phi3) {
    ++checks;
    if (kv_group_for_l2(l2_keys, k_len, 8) != want) return fail("kv_group_for_l2 (Phi-3-small)", 8, 4, want, 0, k_len);
  }
  for (int hkv = 1; hkv <= 48; ++hkv) {
    for (int k_len = 0; k_len <= 4096; k_len += 7) {
      for (const int l2 : {0, 1, 100, 4096, 100000}) {
        const int g = kv_group_for_l2(l2, k_len, hkv);
        int want = 1;  // the largest power of two dividing hkv with want * k_len <= l2
        for (int p = 1; p <= hkv; p *= 2)
          if (hkv % p == 0 && (k_len == 0 || static_cast<int64_t>(p) * k_len <= l2)) want = p;
        ++checks;
        if (g != want) return fail("kv_group_for_l2", hkv, 0, l2, 0, k_len);
      }
    }
  }
  std::printf("%lld checks\n", static_cast<long long>(checks));
  return 0;
}
