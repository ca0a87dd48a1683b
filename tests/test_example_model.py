"""The end-to-end example (examples/phi3_small_tiny): a Phi-3-small-shaped model served by the backend.

(1) The serving loop (paged blocks, chunked prefill with the chunk shorter than every prompt, mixed and
    batched decode steps, greedy sampling) matches the dense-mask float32 reference model token for
    token and logit for logit; the same check against an all-dense reference fails, so the lengths
    used do exercise the sparse pattern.
(2) Tensor parallelism: two gloo ranks (spawned processes, 127.0.0.1 only) give the tp_size = 1
    logits and tokens; the same ranks with rank 1's pattern offset wrong (tp_rank 0 in its
    BlocksparseParams, i.e. global heads 0..3 instead of 4..7) do not.
CPU, float32.
"""
from __future__ import annotations

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
    assert any(with_ctx for _, with_ctx, _ in history), history
    assert any(pre and dec for pre, _, dec in history), history
    assert any(not pre and dec >= 2 for pre, _, dec in history), history
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
        assert any(not pre and dec == 3 for pre, _, dec in history), history  # a padded batch was decoded
    else:
        assert swaps[0] >= 3, f"only {swaps[0]} swaps"
    for a, b in zip(single, other):
        assert a.output == b.output, f"[{mode}] request {a.rid}: tokens {b.output}, plain engine {a.output}"
        err = (torch.stack(a.logits) - torch.stack(b.logits)).abs().max() / torch.stack(a.logits).abs().max()
        assert err <= TOL, f"[{mode}] request {a.rid}: logits differ from the plain engine's by {err:.2e}"
