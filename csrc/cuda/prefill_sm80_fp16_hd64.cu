// The sm80 prefill kernel variants of one (element, padded head dim), in their own file so that
// they compile in parallel (variants: see dispatch_prefill_kernel in cuda/dispatch.h).
#include "cuda/kernels/prefill_sm80.cuh"

#if BSA_HEAD_DIM_PAD_64
namespace blocksparse_attn {
template void launch_prefill_sm80<__half, 64, 1>(const PrefillParams&, int, cudaStream_t);
template void launch_prefill_sm80<__half, 64, 2>(const PrefillParams&, int, cudaStream_t);
}
#endif
