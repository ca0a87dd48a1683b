"""The vLLM plugin against a stand-in `vllm` module tree (module paths, attribute and the memoized
selector as in vLLM 0.7-0.9, docs/vllm.md), and the packaging metadata in pyproject.toml."""
from __future__ import annotations

import functools
import logging
import os
import sys
import types

import pytest

from blocksparse_attn import BlocksparseFlashAttentionBackend
from blocksparse_attn import vllm_plugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = ["0.7.0", "0.7.3", "0.8.0", "0.8.5.post1", "0.9.0.1", "0.9.2", "0.9.3.dev12+g881e3cbe"]
UNSUPPORTED = ["0.6.6.post1", "0.10.0", "0.10.1.1", "1.0.0", "unknown", ""]


class TheirBackend:  # vLLM's own class, which the plugin replaces
    pass


def install_vllm(monkeypatch, version: str, backend_module: str = "present") -> types.ModuleType | None:
    """A stand-in vllm package; backend_module: "present", "missing" (ImportError) or "broken"."""
    for name in ("vllm", "vllm.attention", "vllm.attention.backends", vllm_plugin.SELECTOR_MODULE):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[name].__path__ = []  # a package, so submodule imports reach the finders
    sys.modules["vllm"].__version__ = version

    @functools.cache  # vLLM 0.7.3-0.9 memoize with functools.cache, 0.7.0 with lru_cache(maxsize=None)
    def _cached_get_attn_backend(is_blocksparse: bool):
        if is_blocksparse:
            from vllm.attention.backends.blocksparse_attn import BlocksparseFlashAttentionBackend as selected
            return selected
        return object

    sys.modules[vllm_plugin.SELECTOR_MODULE]._cached_get_attn_backend = _cached_get_attn_backend
    if backend_module == "missing":
        monkeypatch.setitem(sys.modules, vllm_plugin.VLLM_MODULE, None)  # import raises ImportError
        return None
    if backend_module == "broken":
        monkeypatch.delitem(sys.modules, vllm_plugin.VLLM_MODULE, raising=False)
        finder = BrokenModuleFinder()
        monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
        return None
    module = types.ModuleType(vllm_plugin.VLLM_MODULE)
    module.BlocksparseFlashAttentionBackend = TheirBackend
    monkeypatch.setitem(sys.modules, vllm_plugin.VLLM_MODULE, module)
    return module


class BrokenModuleFinder:
    """Makes importing vLLM's block-sparse module raise something other than ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == vllm_plugin.VLLM_MODULE:
            raise RuntimeError("CUDA driver initialization failed")
        return None


def select_block_sparse():
    """What vLLM's selector returns for a block-sparse layer (a memoized function-local import)."""
    return sys.modules[vllm_plugin.SELECTOR_MODULE]._cached_get_attn_backend(True)


@pytest.mark.parametrize("version", SUPPORTED)
def test_register_replaces_the_backend(monkeypatch, caplog, version):
    module = install_vllm(monkeypatch, version)
    with caplog.at_level(logging.INFO):
        assert vllm_plugin.register() is True, f"vLLM {version}"
    assert module.BlocksparseFlashAttentionBackend is BlocksparseFlashAttentionBackend, f"vLLM {version}"
    from vllm.attention.backends.blocksparse_attn import BlocksparseFlashAttentionBackend as imported
    assert imported is BlocksparseFlashAttentionBackend, f"vLLM {version}"
    assert select_block_sparse() is BlocksparseFlashAttentionBackend, f"vLLM {version}"
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and "now run on blocksparse_attn" in info[0].getMessage(), caplog.text
    # vLLM's handler sits on its "vllm" logger only; the line must come through a child of it.
    assert info[0].name.startswith("vllm."), info[0].name


def test_register_is_idempotent(monkeypatch, caplog):
    module = install_vllm(monkeypatch, "0.9.2")
    assert vllm_plugin.register() is True
    with caplog.at_level(logging.DEBUG):
        assert vllm_plugin.register() is True  # vLLM loads plugins in each process, maybe twice
        assert vllm_plugin.register() is True
    assert module.BlocksparseFlashAttentionBackend is BlocksparseFlashAttentionBackend
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], caplog.text


def test_selection_made_before_register_is_forgotten(monkeypatch):
    install_vllm(monkeypatch, "0.8.5")
    assert select_block_sparse() is TheirBackend  # memoized by the selector's cache
    assert vllm_plugin.register() is True
    assert select_block_sparse() is BlocksparseFlashAttentionBackend


@pytest.mark.parametrize("version", UNSUPPORTED)
def test_other_versions_are_left_alone(monkeypatch, caplog, version):
    module = install_vllm(monkeypatch, version)
    with caplog.at_level(logging.DEBUG):
        assert vllm_plugin.register() is False, f"vLLM {version!r}"
    assert module.BlocksparseFlashAttentionBackend is TheirBackend, f"vLLM {version!r}"
    assert select_block_sparse() is TheirBackend, f"vLLM {version!r}"
    assert [r.levelno for r in caplog.records] == [logging.DEBUG], caplog.text
    assert "outside the supported 0.7-0.9" in caplog.records[0].getMessage()


def test_missing_backend_module(monkeypatch, caplog):
    install_vllm(monkeypatch, "0.9.2", backend_module="missing")
    with caplog.at_level(logging.DEBUG):
        assert vllm_plugin.register() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG], caplog.text
    assert vllm_plugin.VLLM_MODULE in caplog.records[0].getMessage()


def test_backend_module_that_raises_is_reported_not_raised(monkeypatch, caplog):
    install_vllm(monkeypatch, "0.8.0", backend_module="broken")
    with caplog.at_level(logging.DEBUG):
        assert vllm_plugin.register() is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING], caplog.text
    assert "CUDA driver initialization failed" in caplog.records[0].getMessage()


def test_without_vllm(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with caplog.at_level(logging.DEBUG):
        assert vllm_plugin.register() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG], caplog.text
    assert "not installed" in caplog.records[0].getMessage()


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_entry_point_declared():
    plugins = _project()["entry-points"]["vllm.general_plugins"]
    assert plugins == {"blocksparse_attn": "blocksparse_attn.vllm_plugin:register"}
    module, _, function = plugins["blocksparse_attn"].partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is vllm_plugin.register


def test_license_and_extras_declared():
    project = _project()
    assert project["license"] == "Apache-2.0"
    for name in project["license-files"]:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        assert "Apache License" in text and "Version 2.0, January 2004" in text, name
    assert project["optional-dependencies"]["examples"] == ["tqdm"]
    # setuptools >= 77 refuses License :: classifiers next to a license expression (PEP 639).
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
