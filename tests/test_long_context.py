"""Long-context serving at CPU size (issue 21): LongRoPE (Phi-3-small-128k's rotary) and the engine path
past the original context length.

LongRoPE rotates positions below the original length with the short factors and the others with the long
ones, every cos / sin scaled by sqrt(1 + ln(max / original) / ln(original)). The tiny model with LongRoPE
from 64 to 1024 positions, served in chunks through the paged cache with swaps, must match the
dense-mask float32 reference token for token; the same requests checked against a reference with plain
rotary must not (the long factors are in play at these lengths).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from examples.phi3_small_tiny.engine import Engine, Request  # noqa: E402
from examples.phi3_small_tiny.model import Config, Phi3SmallTiny, init_weights, longrope_factors, rotary  # noqa: E402
from examples.phi3_small_tiny.serve import check_against_reference  # noqa: E402

ORIGINAL, MAX = 64, 1024


def plain_rotary(x, positions, base, factors, mscale):
    """Rotary with explicit per-frequency factors, written out (NeoX halves)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) / torch.tensor(factors, dtype=torch.float64)
    angle = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = (angle.cos() * mscale)[:, None, :], (angle.sin() * mscale)[:, None, :]
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_longrope_rotary():
    cfg = Config.tiny().with_longrope(MAX, ORIGINAL)
    short, long = longrope_factors(cfg.head_dim, MAX / ORIGINAL)
    assert cfg.rope_short_factor == tuple(short) and cfg.rope_long_factor == tuple(long)
    assert long[0] == 1.0 and math.isclose(long[-1], MAX / ORIGINAL)
    mscale = math.sqrt(1 + math.log(MAX / ORIGINAL) / math.log(ORIGINAL))
    assert math.isclose(cfg.rope_mscale, mscale) and mscale > 1
    x = torch.randn(200, 3, cfg.head_dim, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(200) * 5  # both sides of the original length
    got = rotary(x, positions, cfg).double()
    early, late = positions < ORIGINAL, positions >= ORIGINAL
    want_short = plain_rotary(x, positions, cfg.rope_base, short, mscale)
    want_long = plain_rotary(x, positions, cfg.rope_base, long, mscale)
    # float32 angles of positions up to 1000 carry ~1e-4 of rounding: compared with float64 at 2e-3
    torch.testing.assert_close(got[early], want_short[early], rtol=0, atol=2e-3)
    torch.testing.assert_close(got[late], want_long[late], rtol=0, atol=2e-3)
    assert (want_short[late] - want_long[late]).abs().max() > 0.5  # the long factors matter there
    # rotation keeps the norm, mscale scales it
    torch.testing.assert_close(got.norm(dim=-1), x.double().norm(dim=-1) * mscale, rtol=1e-5, atol=1e-5)
    # a position's rotation does not depend on its batch
    torch.testing.assert_close(rotary(x[150:], positions[150:], cfg), rotary(x, positions, cfg)[150:])


def test_longrope_factor_file_shape_checked():
    with pytest.raises(ValueError, match="32 short and long factors"):
        Config.tiny().with_longrope(MAX, ORIGINAL, {"short_factor": [1.0] * 31, "long_factor": [1.0] * 32})
    cfg = Config.phi3_small_128k()
    assert (cfg.max_seqlen, cfg.rope_original_max, len(cfg.rope_long_factor)) == (131072, 8192, 64)
    assert math.isclose(cfg.rope_mscale, math.sqrt(1 + math.log(16) / math.log(8192)))


def test_serving_past_the_original_length_matches_reference():
    """Prompts of 300-700 tokens (LongRoPE from 64), chunks of 96, a swap every 4th step."""
    cfg = Config.tiny().with_longrope(MAX, ORIGINAL)
    weights = init_weights(cfg, 0)
    model = Phi3SmallTiny(cfg, weights)
    g = torch.Generator().manual_seed(1)
    requests = [Request(rid=i, prompt=torch.randint(cfg.vocab_size, (n,), generator=g).tolist(), max_new_tokens=6,
                        arrival_step=2 * i) for i, n in enumerate((300, 517, 700))]
    blocks = sum(-(-(len(r.prompt) + 6) // 16) for r in requests)
    stats = Engine(model, blocks, 16, 96, keep_logits=True, preempt_every=4).run(requests, progress=False)
    assert stats["swaps"] > 0, stats
    worst = check_against_reference(cfg, weights, requests, torch.float32, per_step=False)
    assert worst < 1e-4
    plain = dataclasses.replace(cfg, rope_original_max=0)  # the same model with plain rotary
    with pytest.raises(AssertionError, match="logits differ"):
        check_against_reference(plain, weights, requests, torch.float32, per_step=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_longrope_serving_on_cuda_with_graphs():
    """The same past the original length on CUDA in bfloat16, decode replayed from CUDA graphs: the rotary
    runs inside the captured graphs (its factor tables built once on the device, no host copy while
    capturing) and the tokens agree with the float32 reference."""
    cfg = Config.tiny().with_longrope(MAX, ORIGINAL)
    weights = init_weights(cfg, 0)
    model = Phi3SmallTiny(cfg, weights, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    requests = [Request(rid=i, prompt=torch.randint(cfg.vocab_size, (n,), generator=g).tolist(), max_new_tokens=8,
                        arrival_step=2 * i) for i, n in enumerate((120, 333, 650))]
    blocks = sum(-(-(len(r.prompt) + 8) // 16) for r in requests)
    engine = Engine(model, blocks, 16, 96, keep_logits=True, use_cuda_graph=True)
    assert engine.graphs is not None
    engine.run(requests, progress=False)
    check_against_reference(cfg, weights, requests, torch.bfloat16, per_step=False)


def _serve_pressure(cfg, model, num_blocks, swap_blocks):
    g = torch.Generator().manual_seed(3)
    requests = [Request(rid=i, prompt=torch.randint(cfg.vocab_size, (n,), generator=g).tolist(), max_new_tokens=40)
                for i, n in enumerate((30, 45, 20, 90))]
    engine = Engine(model, num_blocks, 16, 64, keep_logits=True, swap_blocks=swap_blocks)
    stats = engine.run(requests, progress=False)
    pool = engine.pools[0]
    assert pool.all_free, f"blocks not all returned: {len(pool.device.free)} of {num_blocks} free, swap space " \
                          f"{len(pool.host.free)} of {engine.swap_blocks}"
    return requests, stats


@pytest.mark.parametrize("swap_blocks", [None, 5, 0], ids=["swap", "swap-then-recompute", "recompute"])
def test_memory_pressure_preempts(swap_blocks):
    """Four requests needing 5-8 blocks each share 12: blocks are taken as chunks and decodes need them,
    so the decodes run out and the newest sequences are preempted, swapped to the CPU (swap space as
    large as the cache), swapped where the 5-block swap space has room and recomputed where not, or all
    recomputed (no swap space). Tokens and logits equal those of a cache large enough for all."""
    cfg = dataclasses.replace(Config.tiny().with_longrope(MAX, ORIGINAL), num_layers=2)
    weights = init_weights(cfg, 0)
    model = Phi3SmallTiny(cfg, weights)
    ample, stats = _serve_pressure(cfg, model, 100, None)
    assert stats["preemptions"] == 0, stats
    tight, stats = _serve_pressure(cfg, model, 12, swap_blocks)
    swapped, recomputed = {None: (True, False), 5: (True, True), 0: (False, True)}[swap_blocks]
    assert (stats["swaps"] > 0, stats["recomputes"] > 0) == (swapped, recomputed), stats
    assert stats["preemptions"] == stats["swaps"] + stats["recomputes"], stats
    for a, b in zip(ample, tight):
        assert a.output == b.output, f"[{swap_blocks}] request {a.rid}: tokens {b.output}, ample cache {a.output}"
        err = ((torch.stack(a.logits) - torch.stack(b.logits)).abs().max() / torch.stack(a.logits).abs().max()).item()
        assert err <= 1e-5, f"[{swap_blocks}] request {a.rid}: logits differ from the ample cache's by {err:.1e}"
    check_against_reference(cfg, weights, tight, torch.float32, per_step=False)


SOAK_ARGS = ["--device", "cpu", "--model", "tiny-longrope", "--num-layers", "2", "--num-requests", "12",
             "--max-prompt", "600", "--chunk-size", "128", "--swap-blocks", "12", "--seed", "1"]


def _soak(capsys, argv):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import soak
    status = soak.main(argv)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return status, json.loads(line.removeprefix("RESULT json "))


@pytest.mark.parametrize("kv_cache_dtype, kv_layout", [("auto", "shared"), ("fp8", "shared"), ("auto", "per-kv-head")])
def test_soak_smoke(capsys, kv_cache_dtype, kv_layout):
    """scripts/soak.py at CPU size: 12 log-uniform prompts up to 600 tokens (LongRoPE from 64), random
    arrivals, a cache of 1.1 x the longest request's blocks, a 12-block swap space: sequences are both
    swapped and recomputed; nothing lost or stuck, every page back in its pool, every request agrees with
    its eager run alone; per-kv-head pages are released on the way."""
    status, result = _soak(capsys, SOAK_ARGS + ["--kv-cache-dtype", kv_cache_dtype, "--kv-layout", kv_layout])
    assert status == 0, result
    assert (result["requests"], result["lost"], result["mismatches"], result["stuck"]) == (12, 0, 0, False), result
    assert result["swaps"] > 0 and result["recomputes"] > 0 and result["longest_prompt"] > ORIGINAL, result
    assert result["pages_returned"] and (result["pages_released"] > 0) == (kv_layout == "per-kv-head"), result


def test_soak_detects_a_broken_swap(capsys, monkeypatch):
    """The soak's comparison can fail: swaps that copy nothing (sequences resume on stale blocks) give
    mismatches and a non-zero exit."""
    from examples.phi3_small_tiny import kv_pools
    monkeypatch.setattr(kv_pools.Backend, "swap_blocks", staticmethod(lambda src, dst, mapping: None))
    status, result = _soak(capsys, SOAK_ARGS)
    assert status == 1 and result["swaps"] > 0 and result["mismatches"] > 0, result
