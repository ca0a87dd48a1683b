"""vLLM general plugin: puts this package's backend where vLLM 0.7-0.9 look for the block-sparse one.

vLLM's attention selector, for a layer with `blocksparse_params` (Phi-3-small's sparse layers), runs
`from vllm.attention.backends.blocksparse_attn import BlocksparseFlashAttentionBackend` inside its
memoized selection function, so replacing that module attribute (and forgetting selections made
before) is enough: every later selection returns our class. vLLM calls `register()` through the
`vllm.general_plugins` entry point (pyproject.toml) in every process it starts, before any model is
built, possibly more than once: registering again changes nothing.

Where vLLM is absent, outside 0.7-0.9, or without that module (it left vLLM in 0.10), `register()`
does nothing and says so at debug level. Facts and versions: docs/vllm.md.
"""
from __future__ import annotations

import importlib
import logging
import re
import sys

logger = logging.getLogger(__name__)

VLLM_MODULE = "vllm.attention.backends.blocksparse_attn"
SELECTOR_MODULE = "vllm.attention.selector"
BACKEND_ATTRIBUTE = "BlocksparseFlashAttentionBackend"
SUPPORTED_VERSIONS = ((0, 7), (0, 10))  # [first, end): the releases that shipped a block-sparse backend


def _release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as '0.8.5.post1' or '0.9.3.dev12+g...', or None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def register() -> bool:
    """Installs our backend in vLLM's block-sparse backend module; True when it is in place."""
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
    except Exception as e:  # vLLM calls register() unguarded: raising would stop vLLM for every model
        logger.warning("blocksparse_attn plugin: importing %s failed (%r); nothing registered", VLLM_MODULE, e)
        return False

    from .backend import BlocksparseFlashAttentionBackend
    if getattr(module, BACKEND_ATTRIBUTE, None) is BlocksparseFlashAttentionBackend:
        return True
    setattr(module, BACKEND_ATTRIBUTE, BlocksparseFlashAttentionBackend)
    # The selector memoizes its answer per argument tuple (functools.cache / lru_cache), so a
    # block-sparse selection made before this call would keep returning vLLM's class. vLLM loads
    # plugins before it builds a model, so the cache is normally empty here; clearing it also makes a
    # late register() (e.g. in a notebook that already built an engine) take effect for new layers.
    selector = sys.modules.get(SELECTOR_MODULE)
    cached = getattr(selector, "_cached_get_attn_backend", None)
    if callable(getattr(cached, "cache_clear", None)):
        cached.cache_clear()
    # vLLM configures only its own "vllm" logger (the root logger stays at WARNING), so the line that
    # says the plugin took effect goes through a child of it, to appear in vLLM's own log.
    logging.getLogger(f"vllm.{__name__}").info(
        "blocksparse_attn plugin: vLLM %s's block-sparse layers now run on blocksparse_attn", version)
    return True
