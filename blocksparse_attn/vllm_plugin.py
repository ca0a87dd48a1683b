"""vLLM general plugin: puts this package's backend where vLLM 0.7-0.9 look for the block-sparse one.

vLLM's attention selector, for a layer with `blocksparse_params` (Phi-3-small's sparse layers), runs
`from vllm.attention.backends.blocksparse_attn import BlocksparseFlashAttentionBackend` each time it
selects, so replacing that module attribute is enough: every later selection returns our class. vLLM
calls `register()` through the `vllm.general_plugins` entry point (pyproject.toml) in every process it
starts, before any model is built, possibly more than once: registering again changes nothing.

Where vLLM is absent, outside 0.7-0.9, or without that module (it left vLLM after 0.9), `register()`
does nothing and says so at debug level.
"""
from __future__ import annotations

import importlib
import logging
import re

logger = logging.getLogger(__name__)

VLLM_MODULE = "vllm.attention.backends.blocksparse_attn"
BACKEND_ATTRIBUTE = "BlocksparseFlashAttentionBackend"
SUPPORTED_VERSIONS = ((0, 7), (0, 10))  # [first, end): the releases that shipped a block-sparse backend


def _release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as '0.8.5.post1' or '0.9.3.dev12+g...', or None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def register() -> bool:
    """Installs our backend in vLLM's block-sparse backend module; True when it is in place."""
    from .backend import BlocksparseFlashAttentionBackend

    try:
        import vllm
    except ImportError:
        logger.debug("blocksparse_attn plugin: vLLM is not installed; nothing to register")
        return False
    version = str(getattr(vllm, "__version__", ""))
    release = _release(version)
    first, end = SUPPORTED_VERSIONS
    if release is None or not first <= release < end:
        logger.debug("blocksparse_attn plugin: vLLM %r is outside the supported %d.%d-%d.%d; nothing registered",
                     version, *first, end[0], end[1] - 1)
        return False
    try:
        module = importlib.import_module(VLLM_MODULE)
    except ImportError as e:
        logger.debug("blocksparse_attn plugin: %s does not import (%s); nothing registered", VLLM_MODULE, e)
        return False
    if getattr(module, BACKEND_ATTRIBUTE, None) is not BlocksparseFlashAttentionBackend:
        setattr(module, BACKEND_ATTRIBUTE, BlocksparseFlashAttentionBackend)
        logger.info("blocksparse_attn plugin: vLLM %s's block-sparse layers now run on blocksparse_attn", version)
    return True
