// FastDivisor (csrc/common/pattern.h) against the hardware division, for the divisors and dividends
// where a reciprocal's rounding would show: small divisors, powers of two and their neighbours,
// random ones up to 2^30 (the pattern fields' bound); dividends at 0, around multiples of the
// divisor, around 2^31 - 1 and at random. Built and run by tests/test_cpp_checks.py; prints the
// first mismatch and exits 1, else prints the number of checks.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/pattern.h"

using blocksparse_attn::FastDivisor;

int main() {
  std::vector<int> divisors;
  for (int d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int k = 12; k <= 30; ++k)
    for (int delta = -2; delta <= 2; ++delta) divisors.push_back((1 << k) + delta);
  std::mt19937_64 rng(20261204);
  for (int i = 0; i < 2000; ++i) divisors.push_back(1 + static_cast<int>(rng() % (1u << 30)));
  int64_t checks = 0;
  for (const int d : divisors) {
    const FastDivisor fast(d);
    auto check = [&](int64_t wide) {
      if (wide < 0 || wide > INT32_MAX) return true;
      const int n = static_cast<int>(wide);
      ++checks;
      if (fast.div(n) == n / d && fast.mod(n) == n % d) return true;
      std::printf("FastDivisor(%d): %d / d = %d (want %d), %d %% d = %d (want %d)\n", d, n, fast.div(n), n / d, n,
                  fast.mod(n), n % d);
      return false;
    };
    for (int64_t n = 0; n < 512; ++n)
      if (!check(n)) return 1;
    for (int64_t n = INT32_MAX - 512; n <= INT32_MAX; ++n)
      if (!check(n)) return 1;
    const int64_t top = int64_t{INT32_MAX} / d;
    for (int64_t q : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{1000}, top - 1, top})
      for (int delta = -1; delta <= 1; ++delta)
        if (!check(q * d + delta)) return 1;
    for (int i = 0; i < 256; ++i)
      if (!check(static_cast<int64_t>(rng() % (uint64_t{1} << 31)))) return 1;
  }
  if (FastDivisor(0).div(7) != 7 || FastDivisor(-3).div(7) != 7) {  // below 1: divides by 1
    std::printf("FastDivisor of a divisor below 1 does not divide by 1\n");
    return 1;
  }
  std::printf("%lld checks\n", static_cast<long long>(checks));
  return 0;
}
