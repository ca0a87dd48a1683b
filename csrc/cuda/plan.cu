// Launches the plan kernel (device code in cuda/kernels/plan.cuh).
#include "cuda/kernels/plan.cuh"

namespace blocksparse_attn {

void launch_plan_prefill(const PlanParams& params, cudaStream_t stream) {
  plan_prefill_kernel<<<1, kPlanThreads, 0, stream>>>(params);
}

}  // namespace blocksparse_attn
