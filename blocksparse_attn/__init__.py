"""blocksparse_attn: block-sparse flash attention (Phi-3-small pattern, paged KV cache) for PyTorch.

Ops: torch.ops.blocksparse_attn.* (typed wrappers in blocksparse_attn.ops); the vLLM-style backend
classes are importable from here.
"""
from . import ops
from .layout import BlockLayout, SparsePattern
from .backend import BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionImpl
from .kv_cache import allocate_kv_cache, split_kv_cache
from .metadata import BlocksparseFlashAttentionMetadata, BlocksparseParams

__all__ = ["ops", "SparsePattern", "BlockLayout"]
__all__ += ["BlocksparseParams", "BlocksparseFlashAttentionMetadata", "BlocksparseFlashAttentionBackend",
            "BlocksparseFlashAttentionImpl", "allocate_kv_cache", "split_kv_cache"]
