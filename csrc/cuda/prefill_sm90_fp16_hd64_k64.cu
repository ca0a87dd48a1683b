// One instantiation of the Hopper prefill kernel per file, so they compile in parallel.
#include "cuda/kernels/prefill_sm90.cuh"

#if BSA_HEAD_DIM_PAD_64
namespace blocksparse_attn {
template void launch_prefill_sm90<__half, 64, 64>(const PrefillParams&, const Sm90Launch&, cudaStream_t);
}
#endif
