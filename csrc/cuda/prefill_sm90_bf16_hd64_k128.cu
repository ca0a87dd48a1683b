// One instantiation of the Hopper prefill kernel per file, so they compile in parallel.
#include "cuda/kernels/prefill_sm90.cuh"

#if BSA_HEAD_DIM_PAD_64
namespace blocksparse_attn {
template void launch_prefill_sm90<__nv_bfloat16, 64, 128>(const PrefillParams&, const Sm90Launch&, cudaStream_t);
}
#endif
