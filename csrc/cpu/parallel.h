// at::parallel_for for kernels whose work units call ATen ops.
//
// at::parallel_for runs chunks on OpenMP worker threads that keep their own thread-local state: no
// InferenceMode, grad mode on, none of the caller's dispatch-key exclusions (pytorch/pytorch#56794).
// A tensor op in such a worker then behaves differently from the same op on the calling thread; under
// torch.inference_mode() an in-place write into a view of an inference tensor fails outright ("Inplace
// update to inference tensor outside InferenceMode"). Every chunk here runs under the caller's
// thread-local state (at::ThreadLocalState: autograd and inference modes, dispatch keys, record
// function, Python modes), so the result cannot depend on which thread computed a unit.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace blocksparse_attn {

template <typename F>
void parallel_for_with_caller_state(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(begin, end, grain_size, [&](int64_t chunk_begin, int64_t chunk_end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    f(chunk_begin, chunk_end);
  });
}

}  // namespace blocksparse_attn
