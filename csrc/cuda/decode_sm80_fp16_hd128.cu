// One instantiation of the sm80 decode kernel per file, so they compile in parallel.
#include "cuda/kernels/decode_sm80.cuh"

#if BSA_HEAD_DIM_PAD_128
namespace blocksparse_attn {
template void launch_decode_sm80<__half, 128>(const DecodeParams&, cudaStream_t);
}
#endif
