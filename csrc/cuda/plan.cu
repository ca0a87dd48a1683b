// Launches the plan kernel (device code in cuda/kernels/plan.cuh).
#include "cuda/kernels/plan.cuh"

namespace blocksparse_attn {

void launch_plan_prefill(const PlanParams& params, cudaStream_t stream) {
  plan_prefill_kernel<<<1, kPlanThreads, 0, stream>>>(params);
}

// The Hopper kernel's query rows per work unit, from a file nvcc compiles: a build knob set through
// NVCC_APPEND_FLAGS (BSA_SM90_BLOCK_M) reaches the kernels and this, not the host compiler's files,
// so the host plans its units from here.
int prefill_sm90_block_m() { return kPrefillSm90BlockM; }

}  // namespace blocksparse_attn
