"""What the kernels are built for: the one list of head sizes, sparse block sizes and CUDA dtypes.

Everything else reads these lists: setup.py (which head-size families to compile), the backend and
the pattern classes (argument checks), and scripts/gen_kernels.py, which writes the C++ side of the
same facts (csrc/common/supported.h, the per-instantiation .cu files). Change a list here, run
`python3 scripts/gen_kernels.py` and commit what it writes; CI fails while a generated file is stale.

This module imports nothing, so setup.py can read it before the package is built.
"""

# Head sizes every op accepts. The CUDA kernels pad them to a multiple of 64 in shared memory, so one
# compiled family serves several sizes (64 | 80-128 | 256).
HEAD_SIZES = (64, 80, 96, 112, 128, 256)

# Tokens per sparse block (the pattern's B), and the element types of the CUDA kernels (float32
# attention runs on the CPU only).
SPARSE_BLOCK_SIZES = (16, 32, 64, 128)
CUDA_DTYPES = ("fp16", "bf16")


def head_dim_pad(head_size: int) -> int:
    """The padded head dim of the CUDA kernel family that serves head_size."""
    return (head_size + 63) // 64 * 64


HEAD_DIM_PADS = tuple(sorted({head_dim_pad(d) for d in HEAD_SIZES}))  # (64, 128, 256)
# The Hopper prefill kernel's families (wgmma tiles of 64 columns; 256 stays on the portable kernel).
SM90_HEAD_DIM_PADS = (64, 128)
