"""The serving example with per-kv-head pages (issue 17, the engine part: Engine(kv_layout="per-kv-head"),
serve.py --kv-layout per-kv-head).

(1) PageReleaser, the engine's incremental form of SparsePattern.pages_read_later, has released exactly
    the pages the rule gives up at every length, grown one token or a chunk at a time (sliding, homo,
    kv-sliding, a tensor-parallel head offset, MQA, dense; kv blocks smaller and larger than the sparse
    block), and its release lengths (which size a request's peak) say the same.
(2) Per-kv-head serving gives the shared layout's tokens and logits (within 1e-5 of the largest |logit|)
    and the float32 reference's, with chunked prefill mixed with decodes, the padded decode path (whose
    host and device tables must carry every released -1 entry), preemption by swap and by recompute,
    for the sliding and the homo_head pattern; it released pages, and every page of every pool is back
    at the end.
(3) Two gloo ranks, whose heads read other columns and so release different pages, serving per-kv-head
    pages under memory pressure give one rank's shared-layout tokens and logits.
(4) Capacity: with the same cache bytes and long requests, the per-kv-head engine runs more sequences
    at once than the shared one.
(5) The memory split and serve.py's --kv-layout / --homo-head / --sparse-all flags and RESULT fields.
CPU, float32.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from blocksparse_attn import BlocksparseFlashAttentionMetadata as Metadata  # noqa: E402
from blocksparse_attn.layout import SparsePattern  # noqa: E402
from examples.phi3_small_tiny import serve as serve_cli  # noqa: E402
from examples.phi3_small_tiny.engine import Engine, Request  # noqa: E402
from examples.phi3_small_tiny.kv_pools import PageReleaser, make_pools  # noqa: E402
from examples.phi3_small_tiny.model import Config, Phi3SmallTiny, init_weights  # noqa: E402
from examples.phi3_small_tiny.serve import check_against_reference  # noqa: E402

from test_example_model import _free_port  # noqa: E402

SEED = 0
# Longer than CHUNK, most past the band (2 blocks of 16) and the vertical stride (8 blocks), so that pages
# are released while the sequences still run; they arrive one step apart, so prefill chunks and decodes mix.
PROMPTS = (70, 133, 190, 301)
NEW_TOKENS = 10
CHUNK = 64
KV_BLOCK = 16
AMPLE = sum(-(-(n + NEW_TOKENS) // KV_BLOCK) for n in PROMPTS)  # shared blocks for all at once
TIGHT = 24  # shared blocks' bytes that force preemptions in both layouts and both patterns
LONGEST = max(PROMPTS) + NEW_TOKENS
REL_TOL = 1e-5  # two float32 runs of the same kernels, other batches and page ids

# (name, pattern, Hq, Hkv): the head modes of test_per_kv_head_cache.py's cases
RULE_CASES = [
    ("qslide", SparsePattern(16, 2, 8, 1, False, 0), 8, 2),
    ("homo", SparsePattern(16, 2, 8, 0, False, 0), 8, 2),
    ("kvslide", SparsePattern(64, 3, 4, 2, True, 0), 8, 4),
    ("qslide-tp2r1", SparsePattern(16, 1, 8, 1, False, 4), 4, 1),
    ("dense", SparsePattern(16, 2, 1, 1, False, 0), 8, 2),
]


@pytest.mark.parametrize("kvbs", [4, 16, 32, 128])
@pytest.mark.parametrize("case", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_incremental_release_equals_the_rule(case, kvbs):
    name, pattern, hq, hkv = case
    releaser = PageReleaser(pattern, hq, hkv, kvbs)
    rng = random.Random(f"{name}-{kvbs}")
    for grow in ("token", "chunk"):
        released, n = set(), 0
        while n < 1200:
            after = n + (1 if grow == "token" else rng.randint(1, 150))
            new = set(releaser.unread_between(n, after))
            assert not new & released, f"[{name} kvbs {kvbs}] pages released twice at {after}: {new & released}"
            released |= new
            n = after
            keep = pattern.pages_read_later(hq, hkv, n, kvbs)
            want = {(g, p) for g, p in (~keep).nonzero().tolist()}
            assert released == want, (f"[{name} kvbs {kvbs}, by {grow}] at {n} tokens: released but read later "
                                      f"{sorted(released - want)[:4]}, unread but kept {sorted(want - released)[:4]}")
        lengths = releaser.release_lengths(keep.shape[1])
        assert {(g, p) for g, p in (lengths <= n).nonzero().tolist()} == released, f"[{name} kvbs {kvbs}]"
    assert releaser.releases == bool(released), f"[{name} kvbs {kvbs}] releases={releaser.releases}"


def make_requests(cfg: Config, prompts=PROMPTS, new_tokens=NEW_TOKENS, arrival=1) -> list[Request]:
    g = torch.Generator().manual_seed(SEED + 1)
    return [Request(rid=i, prompt=torch.randint(cfg.vocab_size, (n,), generator=g).tolist(),
                    max_new_tokens=new_tokens, arrival_step=arrival * i) for i, n in enumerate(prompts)]


def serve(model, kv_layout, num_blocks=AMPLE, **options):
    engine = Engine(model, num_blocks, KV_BLOCK, CHUNK, keep_logits=True, seed=SEED, kv_layout=kv_layout,
                    longest_request=LONGEST, **options)
    requests = make_requests(model.cfg)
    stats = engine.run(requests, progress=False)
    return engine, requests, stats


def assert_same(want: list[Request], got: list[Request], what: str) -> None:
    for a, b in zip(want, got):
        assert a.output == b.output, f"[{what}] request {a.rid}: tokens {b.output}, shared layout {a.output}"
        err = ((torch.stack(a.logits) - torch.stack(b.logits)).abs().amax(-1) / torch.stack(a.logits).abs().amax(-1))
        assert err.max() <= REL_TOL, \
            f"[{what}] request {a.rid}: logits differ from the shared layout's by {err.max():.1e}"


@pytest.fixture(scope="module", params=["sliding", "homo"])
def served(request):
    """A tiny model with the sliding or the homo_head pattern, and the shared layout's run with an ample cache."""
    cfg = dataclasses.replace(Config.tiny(), homo_head=request.param == "homo")
    weights = init_weights(cfg, SEED)
    model = Phi3SmallTiny(cfg, weights)
    _, shared, _ = serve(model, "shared")
    return request.param, cfg, weights, model, shared


class TableWatcher:
    """Wraps the padded decoder: after every decode its host and device tables must hold each sequence's
    rows, released (-1) entries included; counts the -1 entries seen there."""

    def __init__(self, engine: Engine):
        self.decoder, self.decode, self.released_seen, self.decodes = engine.graphs, engine.graphs.decode, 0, 0
        engine.graphs.decode = self

    def __call__(self, reqs):
        out = self.decode(reqs)
        self.decodes += 1
        for i, tables in enumerate(self.decoder.pool_tables):
            for b, req in enumerate(reqs):
                want = torch.tensor(req.tables[i].rows, dtype=torch.int32)
                n = want.shape[1]
                assert torch.equal(tables.host_tables[b, :, :n], want), f"pool {i} row {b}: host table stale"
                assert torch.equal(tables.tables[b, :, :n], want), f"pool {i} row {b}: device table stale"
                self.released_seen += int((want == -1).sum())
        return out


# (engine options, shared blocks, preemptions expected, recomputes expected)
VARIANTS = {
    "plain": (dict(), AMPLE, False, False),
    "padded": (dict(pad_decode=True), AMPLE, False, False),
    "forced-swaps": (dict(preempt_every=3, pad_decode=True), AMPLE, False, False),
    "pressure-swap": (dict(), TIGHT, True, False),
    "pressure-recompute": (dict(swap_blocks=0, pad_decode=True), TIGHT, True, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_per_kv_head_serving_matches_shared(served, variant):
    pattern, cfg, weights, model, shared = served
    options, num_blocks, preempted, recomputed = VARIANTS[variant]
    what = f"{pattern}, {variant}"
    engine = Engine(model, num_blocks, KV_BLOCK, CHUNK, keep_logits=True, seed=SEED, kv_layout="per-kv-head",
                    longest_request=LONGEST, **options)
    watcher = TableWatcher(engine) if engine.graphs is not None else None
    requests = make_requests(cfg)
    stats = engine.run(requests, progress=False)
    assert [p.name for p in engine.pools] == ["sparse", "dense"] and engine.pools[0].releaser is not None, what
    assert_same(shared, requests, what)
    assert stats["pages_released"] > 0, f"[{what}] no page released: {stats}"
    assert all(pool.all_free for pool in engine.pools), f"[{what}] pages not all returned"
    assert any(r.prefills and r.decodes for r in engine.history), f"[{what}] no step mixed prefill and decode"
    assert (stats["preemptions"] > 0, stats["recomputes"] > 0) == (preempted, recomputed), f"[{what}] {stats}"
    if variant == "forced-swaps":
        assert stats["swaps"] >= 3, f"[{what}] {stats}"
    if watcher is not None:
        assert watcher.decodes > 0 and watcher.released_seen > 0, f"[{what}] the padded tables never held a release"
    if variant in ("plain", "pressure-recompute"):
        assert check_against_reference(cfg, weights, requests, torch.float32, per_step=False) <= REL_TOL * 10
    if variant == "plain":  # the reference can tell the two patterns apart at these lengths
        other = dataclasses.replace(cfg, homo_head=pattern != "homo")
        with pytest.raises(AssertionError, match="logits differ"):
            check_against_reference(other, weights, requests, torch.float32, per_step=False)


def test_swapped_tables_keep_released_entries():
    """A sequence swapped out and back keeps its -1 entries where they were and copies only live pages."""
    cfg = Config.tiny()
    model = Phi3SmallTiny(cfg, init_weights(cfg, SEED))
    engine = Engine(model, AMPLE, KV_BLOCK, CHUNK, seed=SEED, kv_layout="per-kv-head", longest_request=LONGEST)
    req = make_requests(cfg, prompts=(300,), new_tokens=4)[0]
    engine.add_request(req)
    while req.num_computed < 300:
        engine.step()
    pool = engine.pools[0]
    before = req.tables[0]
    assert before.live < pool.rows * before.num_pages, "nothing released yet"
    engine.running.remove(req)
    engine._swap_out(req)
    on_host = req.tables[0]
    assert len(pool.host.free) == pool.host.num_pages - before.live
    assert all((a < 0) == (b < 0) for r0, r1 in zip(before.rows, on_host.rows) for a, b in zip(r0, r1))
    assert engine._swap_in(engine.swapped.pop(0))
    assert [[p < 0 for p in row] for row in req.tables[0].rows] == [[p < 0 for p in row] for row in before.rows]
    assert pool.device.in_use == req.tables[0].live == before.live  # only the live pages came back


def test_model_takes_one_metadata_or_one_per_layer():
    cfg = dataclasses.replace(Config.tiny(), num_layers=2)
    model = Phi3SmallTiny(cfg, init_weights(cfg, SEED))
    caches = [torch.zeros(2, 4, KV_BLOCK * model.hkv * cfg.head_dim) for _ in range(2)]
    md = Metadata.build([40], [0], [[0, 1, 2]], KV_BLOCK)
    ids, pos = torch.arange(40) * 7 % cfg.vocab_size, torch.arange(40)
    one = model.forward(ids, pos, caches, md)
    torch.testing.assert_close(model.forward(ids, pos, caches, [md, md]), one, rtol=0, atol=0)


def test_memory_split():
    """The per-kv-head pools hold the shared layout's bytes (to a page per pool), split by layers x kept
    fraction; an all-dense model gets Hkv one-head pages per shared block."""
    cfg = Config.tiny()
    model = Phi3SmallTiny(cfg, init_weights(cfg, SEED))
    num_blocks, longest = 100, 600
    shared_bytes = num_blocks * make_pools(model, "shared", num_blocks, 0, KV_BLOCK, longest, 0)[0].page_bytes * 4
    sparse, dense = make_pools(model, "per-kv-head", num_blocks, 10, KV_BLOCK, longest, 0)
    f = float(model.impls[0].pattern.pages_read_later(model.hq, model.hkv, longest, KV_BLOCK).float().mean())
    assert (sparse.layers, dense.layers, sparse.kept_fraction, dense.kept_fraction) == ([0, 2], [1, 3], f, 1.0)
    assert 0.4 < f < 0.7 and sparse.releaser is not None and dense.releaser is None
    assert sparse.num_pages == int(num_blocks * 4 * model.hkv * f / (2 * f + 2))
    total = sum(p.num_pages * p.page_bytes * len(p.layers) for p in (sparse, dense))
    assert shared_bytes - 2 * 2 * sparse.page_bytes <= total <= shared_bytes
    assert sparse.host.num_pages == int(10 * 4 * model.hkv * f / (2 * f + 2))
    dense_model = Phi3SmallTiny(dataclasses.replace(cfg, dense_every=1), init_weights(cfg, SEED))
    (pool,) = make_pools(dense_model, "per-kv-head", num_blocks, 10, KV_BLOCK, longest, 0)
    assert (pool.name, pool.num_pages, pool.host.num_pages) == ("dense", num_blocks * model.hkv, 10 * model.hkv)


@pytest.mark.parametrize("model_kind", ["sparse-dense", "sparse-all"])
def test_per_kv_head_runs_more_sequences_in_the_same_bytes(model_kind):
    """8 requests of 500-token prompts + 48 new tokens at once, a cache of 2 such requests' shared blocks:
    the per-kv-head engine, giving back the pages its homo_head sparse layers stop reading, runs more
    sequences at once and finishes in fewer steps. Phi-3-small's alternation (half the layers dense, which
    keep everything) caps the gain at 2 / (1 + kept fraction), here ~1.7 (3 -> 4 sequences); with every
    layer sparse it is 1 / kept fraction, ~6: all 8 fit and none is preempted. (Prompts go in chunks: a
    page is released after the step that leaves it behind, so a sequence also holds a chunk's pages.)"""
    cfg = dataclasses.replace(Config.tiny(), num_layers=2, homo_head=True,
                              dense_every=2 if model_kind == "sparse-dense" else 0)
    model = Phi3SmallTiny(cfg, init_weights(cfg, SEED))
    prompts, new = (500,) * 8, 48
    num_blocks = 2 * -(-(500 + new) // KV_BLOCK)
    results = {}
    for layout in ("shared", "per-kv-head"):
        engine = Engine(model, num_blocks, KV_BLOCK, CHUNK, max_batch=8, seed=SEED, kv_layout=layout,
                        longest_request=500 + new)
        stats = engine.run(make_requests(cfg, prompts, new, arrival=0), progress=False)
        assert all(pool.all_free for pool in engine.pools), layout
        results[layout] = {k: stats[k] for k in ("peak_running", "preemptions", "steps", "pages_released")}
    shared, per_head = results["shared"], results["per-kv-head"]
    assert per_head["pages_released"] > 0 and shared["preemptions"] > 0, results
    assert per_head["peak_running"] > shared["peak_running"] and per_head["steps"] < shared["steps"], results
    if model_kind == "sparse-all":
        assert per_head["peak_running"] >= 2 * shared["peak_running"] and per_head["preemptions"] == 0, results


def _tp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = Config.tiny()
        model = Phi3SmallTiny(cfg, init_weights(cfg, SEED), world, rank)
        engine, requests, stats = serve(model, "per-kv-head", TIGHT, pad_decode=True)
        result = dict(outputs=[(r.output, torch.stack(r.logits)) for r in requests], stats=stats,
                      all_free=all(pool.all_free for pool in engine.pools))
        torch.save(result, out_path.format(rank=rank))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_per_kv_head(tmp_path):
    cfg = Config.tiny()
    _, single, _ = serve(Phi3SmallTiny(cfg, init_weights(cfg, SEED)), "shared")
    out_path = str(tmp_path / "tp2_rank{rank}.pt")
    mp.spawn(_tp_worker, args=(2, _free_port(), out_path), nprocs=2, join=True)
    ranks = [torch.load(out_path.format(rank=r)) for r in range(2)]
    for rank, result in enumerate(ranks):
        assert result["all_free"], f"rank {rank}: pages not all returned"
        assert result["stats"]["pages_released"] > 0 and result["stats"]["preemptions"] > 0, result["stats"]
    # the ranks' heads read other columns, so they release different pages: the charges had to agree
    assert ranks[0]["stats"]["pages_released"] != ranks[1]["stats"]["pages_released"], [r["stats"] for r in ranks]
    assert_same(single, [Request(rid=r.rid, prompt=r.prompt, max_new_tokens=r.max_new_tokens, output=out,
                                 logits=list(logits)) for r, (out, logits) in zip(single, ranks[0]["outputs"])],
                "tp 2 per-kv-head")


def _result(capsys, argv: list[str]) -> dict:
    assert serve_cli.main(argv + ["--device", "cpu", "--no-progress"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("RESULT json "), out[-1]
    return json.loads(out[-1][len("RESULT json "):]), out


@pytest.mark.parametrize("layers", ["alternating", "sparse_all"])
def test_serve_cli_per_kv_head(capsys, layers):
    argv = ["--num-layers", "2", "--num-requests", "3", "--min-prompt", "150", "--max-prompt", "300",
            "--max-new-tokens", "6", "--chunk-size", "96", "--kv-layout", "per-kv-head", "--homo-head",
            "--num-blocks", "30", "--pad-decode", "--check"] + (["--sparse-all"] if layers == "sparse_all" else [])
    res, out = _result(capsys, argv)
    assert (res["kv_layout"], res["homo_head"], res["check"]) == ("per-kv-head", True, "ok"), res
    names = ["sparse"] if layers == "sparse_all" else ["sparse", "dense"]
    assert [p["name"] for p in res["kv_pools"]] == names and res["sparse_all"] == (layers == "sparse_all"), res
    assert res["layers"] == ("sparse/sparse" if layers == "sparse_all" else "sparse/dense"), res
    assert res["pages_released"] > 0 and res["peak_running"] >= 1, res
    for pool in res["kv_pools"]:
        assert 0 < pool["peak_pages"] <= pool["pages"] and pool["page_bytes"] == 2 * KV_BLOCK * 64 * 4, pool
    assert any(line.startswith("KV cache: per-kv-head pages") for line in out), out
    with pytest.raises(SystemExit):
        serve_cli.parse_args(["--dense-all", "--sparse-all"])


def test_serve_output_digest_compares_runs(capsys):
    """RESULT's output_digest: the shared and the per-kv-head layouts serve the same tokens (equal
    digests, as the GPU comparison in device_serve.sh KV_LAYOUT=1 reads them); other requests differ."""
    argv = ["--num-layers", "2", "--num-requests", "3", "--min-prompt", "150", "--max-prompt", "300",
            "--max-new-tokens", "6", "--chunk-size", "96", "--num-blocks", "30", "--pad-decode"]
    shared, _ = _result(capsys, argv + ["--kv-layout", "shared"])
    per_head, _ = _result(capsys, argv + ["--kv-layout", "per-kv-head"])
    other, _ = _result(capsys, argv + ["--kv-layout", "shared", "--seed", "1"])
    assert len(shared["output_digest"]) == 16 and shared["generated_tokens"] == 18, shared
    assert per_head["output_digest"] == shared["output_digest"], (per_head["output_digest"], shared["output_digest"])
    assert other["output_digest"] != shared["output_digest"], "a different seed drew the same tokens"
