// Argument checks shared by every backend's host code. Each message names the argument, shows the
// value that was wrong and says what was expected (STYLE rule 3).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <type_traits>

#include "supported.h"

namespace blocksparse_attn {

// Error messages are assembled here as std::string, never by streaming numbers into an ostream in
// this library: an extension built by a newer g++ than the libstdc++ its Python process loads can
// crash formatting an integer through ostream (seen on the H100 machine: torch 2.11, g++ 13).
// Strings, and the types whose printing lives in libc10 (ScalarType, Device), stream safely.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, double v) { s += std::to_string(v); }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

// TORCH_CHECK with a message built by message(): use it for every check in this library.
#define BSA_CHECK(cond, ...) TORCH_CHECK(cond, ::blocksparse_attn::message(__VA_ARGS__))

inline std::string describe_dtypes(std::initializer_list<at::ScalarType> dtypes) {
  std::string s;
  for (auto d : dtypes) s += (s.empty() ? "" : ", ") + std::string(c10::toString(d));
  return s;
}

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed)
    if (t.scalar_type() == d) return;
  BSA_CHECK(false, name, " must have dtype ", describe_dtypes(allowed), ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  BSA_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  BSA_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  BSA_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what) {
  BSA_CHECK(t.size(dim) == expected, name, ".size(", dim, ") must be ", expected, " (", what, "), got shape ",
              t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  BSA_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for shape ", t.sizes());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  BSA_CHECK(t.stride(-1) == 1, name, " must have a unit stride in its last dimension, got strides ", t.strides());
}

// The head sizes every kernel is instantiated for (blocksparse_attn/supported.py, via supported.h).
inline void check_head_size(int64_t head_size, const char* name) {
  BSA_CHECK(is_listed(kSupportedHeadSizes, head_size), name, " has head size ", head_size,
            "; supported head sizes are ", kSupportedHeadSizesText);
}

}  // namespace blocksparse_attn
