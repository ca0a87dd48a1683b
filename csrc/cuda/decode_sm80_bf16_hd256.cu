// One instantiation of the sm80 decode kernel per file, so they compile in parallel.
#include "cuda/kernels/decode_sm80.cuh"

#if BSA_HEAD_DIM_PAD_256
namespace blocksparse_attn {
template void launch_decode_sm80<__nv_bfloat16, 256>(const DecodeParams&, cudaStream_t);
}
#endif
