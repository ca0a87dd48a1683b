// The sm80 prefill kernel of one (element, padded head dim), in its own file so that the
// instantiations compile in parallel.
#include "cuda/kernels/prefill_sm80.cuh"

#if BSA_HEAD_DIM_PAD_256
namespace blocksparse_attn {
template void launch_prefill_sm80<__half, 256, 1>(const PrefillParams&, int, cudaStream_t);
}
#endif
