"""The end-to-end example (examples/phi3_small_tiny): a Phi-3-small-shaped model served by the backend.

(1) The serving loop (paged blocks, chunked prefill with the chunk shorter than every prompt, mixed and
    batched decode steps, greedy sampling) matches the dense-mask float32 reference model token for
    token and logit for logit; the same check against an all-dense reference fails, so the lengths
    used do exercise the sparse pattern.
(2) Tensor parallelism: two gloo ranks (spawned processes, 127.0.0.1 only) give the tp_size = 1
    logits and tokens; the same ranks with rank 1's pattern offset wrong (tp_rank 0 in its
    BlocksparseParams, i.e. global heads 0..3 instead of 4..7) do not.
(3) serve.py's command line as scripts/device_serve.sh uses it (small sizes): --compare-eager over the
    padded decode path, the warm-up, --num-layers, --dense-all, --init-on-device, and the RESULT line's
    timing split; a forced token stream reproduces the served logits.
CPU, float32.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from blocksparse_attn import BlocksparseFlashAttentionImpl  # noqa: E402
from examples.phi3_small_tiny.engine import Engine, Request  # noqa: E402
from examples.phi3_small_tiny.model import Config, Phi3SmallTiny, init_weights  # noqa: E402
from examples.phi3_small_tiny import serve as serve_cli  # noqa: E402
from examples.phi3_small_tiny.serve import LOGIT_TOL, check_against_reference  # noqa: E402

SEED = 0
# Prompt lengths: every one longer than CHUNK, some not multiples of the 16-token blocks; with blocks of
# 16, a band of 2 blocks and vertical stride 8, prompts past 128 tokens see vertical columns outside the band.
PROMPTS = (70, 133, 190)
NEW_TOKENS = 10
CHUNK = 64
KV_BLOCK = 16
TOL = LOGIT_TOL[torch.float32]


def make_requests(cfg: Config) -> list[Request]:
    g = torch.Generator().manual_seed(SEED + 1)
    return [Request(rid=i, prompt=torch.randint(cfg.vocab_size, (n,), generator=g).tolist(),
                    max_new_tokens=NEW_TOKENS, arrival_step=i) for i, n in enumerate(PROMPTS)]


def serve(cfg, weights, tp_size=1, tp_rank=0, wrong_head_offset=False, history=None, swaps=None,
          **engine_options) -> list[Request]:
    model = Phi3SmallTiny(cfg, weights, tp_size, tp_rank)
    if wrong_head_offset:  # the pattern of global heads 0.. on every rank
        model.impls = [BlocksparseFlashAttentionImpl(model.hq, cfg.head_dim, cfg.scale, model.hkv,
                                                     blocksparse_params={**cfg.blocksparse_params(i, tp_size, tp_rank),
                                                                         "tp_rank": 0})
                       for i in range(cfg.num_layers)]
    requests = make_requests(cfg)
    num_blocks = sum(-(-(n + NEW_TOKENS) // KV_BLOCK) for n in PROMPTS)
    engine = Engine(model, num_blocks, KV_BLOCK, CHUNK, keep_logits=True, seed=SEED, **engine_options)
    engine.run(requests, progress=False)
    if history is not None:
        history += engine.history
    if swaps is not None:
        swaps.append(engine.num_swaps)
    return requests


@pytest.fixture(scope="module")
def setup():
    cfg = Config.tiny()
    weights = init_weights(cfg, SEED)
    history = []
    requests = serve(cfg, weights, history=history)
    return cfg, weights, requests, history


def test_chunked_serving_matches_reference(setup):
    cfg, weights, requests, history = setup
    assert min(PROMPTS) > CHUNK and not cfg.is_dense(0) and cfg.is_dense(1)
    # the schedule covered: prefill chunks with context, prefill and decode in one batch, batched decode
    assert any(r.prefills_with_context for r in history), history
    assert any(r.prefills and r.decodes for r in history), history
    assert any(not r.prefills and r.decodes >= 2 for r in history), history
    for req in requests:
        assert len(req.output) == NEW_TOKENS and len(req.logits) == NEW_TOKENS, f"request {req.rid} incomplete"
    worst = check_against_reference(cfg, weights, requests, torch.float32, per_step=True)
    assert worst <= TOL
    # The same served logits against an all-dense reference must fail: the pattern matters here.
    with pytest.raises(AssertionError, match="logits differ"):
        check_against_reference(cfg, weights, requests, torch.float32, sparse=False, per_step=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = Config.tiny()
        weights = init_weights(cfg, SEED)
        results = {}
        for name, wrong in (("right", False), ("wrong_offset", True)):
            reqs = serve(cfg, weights, world, rank, wrong_head_offset=wrong)
            results[name] = [(r.output, torch.stack(r.logits)) for r in reqs]
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_matches_single_rank(setup, tmp_path):
    cfg, _, single, _ = setup
    out_path = str(tmp_path / "tp2.pt")
    mp.spawn(_tp_worker, args=(2, _free_port(), out_path), nprocs=2, join=True)
    results = torch.load(out_path)
    for req, (tokens, logits) in zip(single, results["right"]):
        want = torch.stack(req.logits)
        err = ((logits - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
        assert err <= TOL, f"request {req.rid}: tp 2 logits differ from tp 1 by {err:.2e} (tol {TOL:.0e})"
        assert tokens == req.output, f"request {req.rid}: tp 2 tokens {tokens}, tp 1 {req.output}"
    # Rank 1 attending with rank 0's head offset must change the logits (beyond any rounding).
    worst = max(((logits - torch.stack(req.logits)).abs().amax(-1) / torch.stack(req.logits).abs().amax(-1)).max().item()
                for req, (_, logits) in zip(single, results["wrong_offset"]))
    assert worst > 100 * TOL, f"a wrong tensor-parallel head offset changed the logits by only {worst:.2e}"


@pytest.mark.parametrize("mode", ["padded", "swap"])
def test_engine_variants_match(setup, mode):
    """padded: the CUDA-graph decode path's static buffers, run eagerly: 3 sequences padded to a batch
    of 4 (slot -1, seq_len 0). swap: every 3rd step a decoding sequence is swapped out to a CPU cache and
    back into other blocks (swap_blocks). Both give the plain engine's tokens and logits."""
    cfg, weights, single, _ = setup
    history, swaps = [], []
    options = dict(pad_decode=True) if mode == "padded" else dict(preempt_every=3)
    other = serve(cfg, weights, history=history, swaps=swaps, **options)
    if mode == "padded":
        assert any(not r.prefills and r.decodes == 3 for r in history), history  # a padded batch was decoded
    else:
        assert swaps[0] >= 3, f"only {swaps[0]} swaps"
    for a, b in zip(single, other):
        assert a.output == b.output, f"[{mode}] request {a.rid}: tokens {b.output}, plain engine {a.output}"
        err = (torch.stack(a.logits) - torch.stack(b.logits)).abs().max() / torch.stack(a.logits).abs().max()
        assert err <= TOL, f"[{mode}] request {a.rid}: logits differ from the plain engine's by {err:.2e}"


def _result(capsys, argv: list[str]) -> dict:
    assert serve_cli.main(argv + ["--device", "cpu", "--no-progress"]) == 0, capsys.readouterr().err
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT json "), last
    return json.loads(last[len("RESULT json "):])


@pytest.mark.parametrize("variant", ["alternating", "dense_all"])
def test_serve_cli_result_line(capsys, variant):
    """The flags the GPU throughput and check runs use, at CPU size: 3 requests arriving together, a
    warm-up, compare-eager over the padded decode path; --dense-all makes every layer dense."""
    argv = ["--num-layers", "2", "--num-requests", "3", "--min-prompt", "70", "--max-prompt", "70",
            "--max-new-tokens", "5", "--arrival-every", "0", "--chunk-size", "160", "--warmup-requests", "1",
            "--init-on-device", "--pad-decode", "--compare-eager"]
    res = _result(capsys, argv + (["--dense-all"] if variant == "dense_all" else []))
    want_layers = "dense/dense" if variant == "dense_all" else "sparse/dense"
    assert (res["num_layers"], res["layers"], res["compare_eager"]) == (2, want_layers, "ok"), res
    assert res["prompt_tokens"] == 210 and res["generated_tokens"] == 15 and res["warmup_requests"] == 1, res
    # every generated token is a decode-only step's, a decode batched into a prefill step, or the first
    # token of a prompt (sampled by the step that finishes it)
    assert res["generated_tokens"] == res["decode_tokens"] + res["decodes_in_prefill_steps"] + 3, res
    assert res["prefill_steps"] + res["decode_steps"] == res["steps"], res
    assert res["decode_steps"] >= 3 and res["wall_s"] >= res["prefill_s"] + res["decode_s"] > 0, res


def test_forced_tokens_reproduce_logits(setup):
    """Request.forced_output (what --compare-eager feeds the second run): an engine emitting the first
    run's tokens computes the first run's logits, here on a different schedule (all requests at once)."""
    cfg, weights, single, _ = setup
    model = Phi3SmallTiny(cfg, weights)
    again = [Request(rid=r.rid, prompt=r.prompt, max_new_tokens=NEW_TOKENS, forced_output=list(reversed(r.output)))
             for r in single]
    num_blocks = sum(-(-(n + NEW_TOKENS) // KV_BLOCK) for n in PROMPTS)
    Engine(model, num_blocks, KV_BLOCK, CHUNK, keep_logits=True, seed=SEED).run(again, progress=False)
    for a, b in zip(single, again):
        assert b.output == list(reversed(a.output)), f"request {a.rid}: forced tokens not emitted"
        # the first token's logits depend only on the prompt; later ones on the (reversed) forced tokens
        err = (a.logits[0] - b.logits[0]).abs().max() / a.logits[0].abs().max()
        assert err <= TOL, f"request {a.rid}: first-token logits differ by {err:.2e}"


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_serve_cli_fp8_cache(capsys, kv_cache_dtype):
    """--kv-cache-dtype fp8*: chunked serving with swaps checks against a reference that quantizes K/V
    the same way, and the same run is far from the unquantized reference (the check can tell)."""
    argv = ["--num-layers", "2", "--num-requests", "3", "--min-prompt", "70", "--max-prompt", "140",
            "--max-new-tokens", "5", "--chunk-size", "48", "--kv-cache-dtype", kv_cache_dtype, "--kv-scale", "0.5",
            "--preempt-every", "3", "--pad-decode", "--check", "--compare-eager"]
    res = _result(capsys, argv)
    assert (res["check"], res["compare_eager"], res["kv_cache_dtype"], res["kv_scale"]) == \
        ("ok", "ok", kv_cache_dtype, 0.5), res
    cfg = dataclasses.replace(Config.tiny(), num_layers=2)
    weights = init_weights(cfg, SEED)
    model = Phi3SmallTiny(cfg, weights, kv_cache_dtype=kv_cache_dtype, kv_scale=0.5)
    assert model.cache_dtype == {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
    requests = [Request(rid=i, prompt=list(range(3 * i + 1, 3 * i + 90)), max_new_tokens=4) for i in range(2)]
    Engine(model, 32, KV_BLOCK, 48, keep_logits=True, seed=SEED).run(requests, progress=False)
    check_against_reference(cfg, weights, requests, torch.float32, kv_cache_dtype=kv_cache_dtype, kv_scale=0.5)
    with pytest.raises(AssertionError, match="logits differ"):
        check_against_reference(cfg, weights, requests, torch.float32)
