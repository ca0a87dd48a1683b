"""Which tensor-parallel rank a layer runs on, when its BlocksparseParams do not say.

The pattern is defined over global heads, so a rank that takes itself for rank 0 of 1 computes the
vertical columns of the wrong heads: a silent wrong answer. vLLM's BlocksparseParams never carried the
tensor-parallel size and rank (its backend read them from its TP group), so they are looked up here,
never guessed: vLLM's TP group when its parallel state is initialized; else an error when
torch.distributed runs more than one process; else one process, which is rank 0 of 1 unless told
otherwise (the defaults BlocksparseParams always had).
"""
from __future__ import annotations

import sys

import torch

# vLLM's module holding its TP group; looked up in sys.modules only: if it was never imported, vLLM's
# parallel state cannot be initialized, and importing vLLM here would cost seconds for nothing.
VLLM_PARALLEL_STATE = "vllm.distributed.parallel_state"


def vllm_tensor_parallel() -> tuple[int, int] | None:
    """(world size, rank) of vLLM's tensor-parallel group, or None where vLLM's parallel state is not
    initialized in this process."""
    state = sys.modules.get(VLLM_PARALLEL_STATE)
    if state is None or not state.model_parallel_is_initialized():
        return None
    return state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()


def resolve_tensor_parallel(tp_size: int | None, tp_rank: int | None) -> tuple[int, int]:
    """(tp_size, tp_rank), filling what is None from vLLM's TP group or the single-process default."""
    if tp_size is not None and tp_rank is not None:
        return tp_size, tp_rank
    found = vllm_tensor_parallel()
    if found is not None:
        for name, given, theirs in (("tp_size", tp_size, found[0]), ("tp_rank", tp_rank, found[1])):
            if given is not None and given != theirs:
                raise ValueError(f"blocksparse_params {name}={given} differs from vLLM's tensor-parallel "
                                 f"group ({name} {theirs})")
        return found
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1
    if world > 1:
        raise ValueError(f"blocksparse_params need tp_size and tp_rank (got tp_size={tp_size}, tp_rank={tp_rank}) "
                         f"when torch.distributed runs {world} processes and vLLM's tensor-parallel group is not "
                         "initialized: the sparsity pattern depends on the global heads each rank holds. Pass "
                         "tp_size=1, tp_rank=0 if the processes do not split heads.")
    return (1 if tp_size is None else tp_size), (0 if tp_rank is None else tp_rank)
