"""The vLLM plugin against a stand-in `vllm` module tree (module path and attribute as in vLLM 0.7-0.9),
and its entry point in pyproject.toml."""
from __future__ import annotations

import logging
import os
import sys
import types

import pytest

from blocksparse_attn import BlocksparseFlashAttentionBackend
from blocksparse_attn import vllm_plugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TheirBackend:  # vLLM's own class, which the plugin replaces
    pass


def install_vllm(monkeypatch, version: str, with_module: bool = True) -> types.ModuleType | None:
    names = ["vllm", "vllm.attention", "vllm.attention.backends"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["vllm"].__version__ = version
    if not with_module:
        monkeypatch.setitem(sys.modules, vllm_plugin.VLLM_MODULE, None)  # import raises ImportError
        return None
    module = types.ModuleType(vllm_plugin.VLLM_MODULE)
    module.BlocksparseFlashAttentionBackend = TheirBackend
    monkeypatch.setitem(sys.modules, vllm_plugin.VLLM_MODULE, module)
    return module


def selected_backend():
    """What vLLM's selector does for a block-sparse layer."""
    from vllm.attention.backends.blocksparse_attn import BlocksparseFlashAttentionBackend as selected
    return selected


@pytest.mark.parametrize("version", ["0.7.0", "0.8.5.post1", "0.9.2", "0.9.3.dev12+g881e3cbe"])
def test_register_replaces_the_backend(monkeypatch, caplog, version):
    module = install_vllm(monkeypatch, version)
    with caplog.at_level(logging.INFO, logger=vllm_plugin.__name__):
        assert vllm_plugin.register() is True
    assert module.BlocksparseFlashAttentionBackend is BlocksparseFlashAttentionBackend
    assert selected_backend() is BlocksparseFlashAttentionBackend
    assert any("now run on blocksparse_attn" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=vllm_plugin.__name__):
        assert vllm_plugin.register() is True  # loaded again in another process step: nothing changes
    assert module.BlocksparseFlashAttentionBackend is BlocksparseFlashAttentionBackend
    assert not caplog.records


@pytest.mark.parametrize("version", ["0.6.6", "0.10.0", "1.0.0", "unknown"])
def test_other_versions_are_left_alone(monkeypatch, caplog, version):
    module = install_vllm(monkeypatch, version)
    with caplog.at_level(logging.DEBUG, logger=vllm_plugin.__name__):
        assert vllm_plugin.register() is False
    assert module.BlocksparseFlashAttentionBackend is TheirBackend
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "outside the supported" in caplog.records[0].message


def test_missing_backend_module(monkeypatch, caplog):
    install_vllm(monkeypatch, "0.9.2", with_module=False)
    with caplog.at_level(logging.DEBUG, logger=vllm_plugin.__name__):
        assert vllm_plugin.register() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_without_vllm(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with caplog.at_level(logging.DEBUG, logger=vllm_plugin.__name__):
        assert vllm_plugin.register() is False
    assert "not installed" in caplog.records[0].message


def test_entry_point_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"blocksparse_attn": "blocksparse_attn.vllm_plugin:register"}
    module, _, function = project["entry-points"]["vllm.general_plugins"]["blocksparse_attn"].partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is vllm_plugin.register
