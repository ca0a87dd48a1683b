// Argument checks shared by every backend's host code. Each message names the argument, shows the
// value that was wrong and says what was expected (STYLE rule 3).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace blocksparse_attn {

inline std::string describe_dtypes(std::initializer_list<at::ScalarType> dtypes) {
  std::ostringstream s;
  bool first = true;
  for (auto d : dtypes) {
    s << (first ? "" : ", ") << d;
    first = false;
  }
  return s.str();
}

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed)
    if (t.scalar_type() == d) return;
  TORCH_CHECK(false, name, " must have dtype ", describe_dtypes(allowed), ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, ".size(", dim, ") must be ", expected, " (", what, "), got shape ",
              t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for shape ", t.sizes());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must have a unit stride in its last dimension, got strides ", t.strides());
}

// The head sizes every kernel is instantiated for; the CUDA dispatch switches over the same list.
inline void check_head_size(int64_t head_size, const char* name) {
  switch (head_size) {
    case 64: case 80: case 96: case 112: case 128: case 256:
      return;
    default:
      TORCH_CHECK(false, name, " has head size ", head_size, "; supported head sizes are 64, 80, 96, 112, 128, 256");
  }
}

}  // namespace blocksparse_attn
