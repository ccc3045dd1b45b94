"""The paged path of the vLLM backend, without vLLM: ``minikv::paged_decode_attention`` (decode) and
``minikv::paged_attention`` (new queries over a prefix of the stored tokens, with log-sum-exps: a
prefill chunk's context) read each sequence's tokens from the pages in place through its block table.

- The reference and the CPU kernel (the pages copied for the C++ decode) equal fp64 attention over the stored tokens (rebuilt from the pages by another route,
  :func:`minikv.vllm.paged.dense`) for random block tables and page orders, partial last pages, open key
  groups and padded rows (``seq_len`` 0).
- The Triton kernel (interpreted) equals the reference on every named shape: mixed key/value widths,
  G 16/32/64, head_dim 64/128/256, GQA and MQA, soft-capped logits, chunks of queries over context
  prefixes (outputs and log-sum-exps); ``opcheck`` passes.
- A prefill chunk's attention (:func:`minikv.vllm.paged.extend`: context from the pages, the chunk's own
  tokens in full precision, merged) equals attention over ``[stored context ; new tokens]`` in fp64.
- The decode write (:func:`minikv.vllm.paged.write_decode`) stores the same codes as the general write,
  never touches a block other than its own and block 0 (vLLM's null block), and neither it nor the
  decode reads anything back to the host (every host-sync API raises while they run).
"""

import itertools
import os

import pytest
import torch
from torch.library import opcheck
from vllm_engine.host_reads import no_host_reads

from minikv.kernels import ops, paged_reference, triton_paged, use_triton_on_cpu
from minikv.kernels.triton_paged import page_tile
from minikv.vllm import paged
from minikv.vllm.layout import PageLayout

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _pages(lay: PageLayout, blocks: int, H: int, seed: int) -> dict:
    """Region views of a cache ``[blocks, H, N, C]`` filled with random bytes (a page never written holds
    anything), then random codes, sane scales and residual keys (what a write could leave)."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randint(-(2**31), 2**31 - 1, (blocks, H, lay.block_size * lay.slot_bytes // 4), generator=g)
    views = lay.views(cache.to(torch.int32).view(lay.dtype))
    for name in ("k_codes", "v_codes"):
        views[name].copy_(torch.randint(-(2**31), 2**31 - 1, views[name].shape, generator=g))
    for name in ("k_scale", "v_scale"):
        views[name].copy_(torch.rand(views[name].shape, generator=g) * 0.5 + 0.01)
    for name in ("k_mn", "v_mn"):
        views[name].copy_(torch.randn(views[name].shape, generator=g))
    if "k_res" in views:
        views["k_res"].copy_(torch.randn(views["k_res"].shape, generator=g) * 2)
    return views


def _tables(lens: list[int], N: int, seed: int) -> tuple[torch.Tensor, int]:
    """Random distinct blocks (never block 0) per sequence, padded with 0 past each sequence's pages;
    and the number of blocks of a cache that holds them (a few left unused)."""
    g = torch.Generator().manual_seed(seed)
    nb = max(1, max(-(-n // N) for n in lens))
    blocks = len(lens) * nb + 4
    ids = (torch.randperm(blocks - 1, generator=g) + 1)[: len(lens) * nb].view(len(lens), nb)
    used = torch.arange(nb)[None] < torch.tensor([-(-n // N) for n in lens])[:, None]
    return torch.where(used, ids, 0).to(torch.int32), blocks


def _fp64(q, views, lay, table, lens, scale, softcap, ctx=None):
    """Attention in fp64 of ``q [B, Hq, (M,) D]`` over the first ``ctx`` (default: all) stored tokens, rebuilt
    by gather + dense (the store's own layout) -> out, and the log-sum-exp ``[B, Hq, M]``."""
    store = paged.gather(views, lay, table, lens)
    keys, vals = paged.dense(store, lay, table.shape[1] * lay.block_size)
    decode = q.dim() == 3
    q = q[:, :, None] if decode else q
    B, Hq, M, D = q.shape
    H = keys.shape[1]
    out = torch.zeros(B, Hq, M, D, dtype=torch.float64)
    lse = torch.full((B, Hq, M), float("-inf"), dtype=torch.float64)
    for b, n in enumerate((lens if ctx is None else ctx).tolist()):
        if n == 0:
            continue
        k, v = keys[b, :, :n].double(), vals[b, :, :n].double()
        s = torch.einsum("hgmd,hnd->hgmn", q[b].double().view(H, Hq // H, M, D), k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        out[b] = torch.einsum("hgmn,hnd->hgmd", torch.softmax(s, -1), v).reshape(Hq, M, D)
        lse[b] = torch.logsumexp(s, -1).reshape(Hq, M)
    return (out[:, :, 0] if decode else out), lse


@pytest.mark.parametrize("k_bits,v_bits", [(4, 2), (2, 2), (2, 4), (4, 4)])
@pytest.mark.parametrize("G,N", [(16, 16), (32, 64), (64, 128)])
def test_the_reference_equals_fp64_attention_over_the_stored_tokens(k_bits, v_bits, G, N):
    H, Hq, D = 2, 6, 64
    lay = PageLayout(D, N, torch.float16, k_bits, v_bits, G)
    lens = torch.tensor([3 * N - 5, 0, N, G + 1, 1], dtype=torch.int32)  # partial pages, padded row, open groups
    table, blocks = _tables(lens.tolist(), N, seed=N)
    views = _pages(lay, blocks, H, seed=k_bits + G)
    q = torch.randn(len(lens), Hq, D, generator=torch.Generator().manual_seed(3)).half()
    regions = [views[n] for n in paged.REGIONS]
    for softcap, fn in itertools.product(
        (0.0, 8.0), (paged_reference.paged_decode_attention, ops.paged_decode_attention)
    ):
        got = fn(q, *regions, table, lens, D**-0.5, softcap, k_bits, v_bits, G)  # the reference, the CPU kernel
        want = _fp64(q, views, lay, table, lens, D**-0.5, softcap)[0]
        err = (got.double() - want).abs().max()
        assert err <= 2e-3 * want.abs().max(), float(err)  # fp16 output of fp32 math
        assert torch.equal(got[1], torch.zeros_like(got[1]))  # the padded row


NAMED = [  # (Hq, Hkv, D, G, N, k_bits, v_bits)
    (8, 2, 64, 16, 16, 4, 2),
    (8, 2, 64, 32, 64, 2, 2),
    (4, 1, 128, 32, 128, 4, 2),  # MQA
    (16, 4, 128, 64, 128, 2, 4),
    (8, 8, 256, 32, 32, 4, 4),  # MHA, head_dim 256
    (6, 2, 256, 64, 64, 2, 2),
]


@pytest.fixture
def triton_on_cpu():
    use_triton_on_cpu(True)
    yield
    use_triton_on_cpu(False)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("Hq,Hkv,D,G,N,k_bits,v_bits", NAMED)
def test_the_triton_kernel_equals_the_reference(triton_on_cpu, Hq, Hkv, D, G, N, k_bits, v_bits):
    lay = PageLayout(D, N, torch.float32, k_bits, v_bits, G)
    lens = torch.tensor([2 * N + G // 2 + 3, 0, N, 1], dtype=torch.int32)
    table, blocks = _tables(lens.tolist(), N, seed=Hq)
    views = _pages(lay, blocks, Hkv, seed=D + G)
    q = torch.randn(len(lens), Hq, D, generator=torch.Generator().manual_seed(D))
    args = (*(views[n] for n in paged.REGIONS), table, lens, D**-0.5)
    softcap = 30.0 if D == 256 else 0.0
    got = ops.paged_decode_attention(q, *args, softcap, k_bits, v_bits, G)
    want = paged_reference.paged_decode_attention(q, *args, softcap, k_bits, v_bits, G)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert page_tile(D, G, N)[0] <= N


def _chunk_case(Hq, Hkv, D, G, N, k_bits, v_bits, M, seed):
    lay = PageLayout(D, N, torch.float32, k_bits, v_bits, G)
    lens = torch.tensor([2 * N + G // 2 + 3, 0, N + 5, G + 3], dtype=torch.int32)
    ctx = torch.tensor([2 * N + 1, 0, N, 0], dtype=torch.int32)  # mid open group, padded, a page's end, empty
    table, blocks = _tables(lens.tolist(), N, seed=seed)
    views = _pages(lay, blocks, Hkv, seed=seed)
    q = torch.randn(len(lens), Hq, M, D, generator=torch.Generator().manual_seed(seed))
    return lay, views, table, lens, ctx, q


def test_paged_attention_over_a_context_prefix_equals_fp64():
    """The reference and the CPU kernel (the pages dequantized, then PyTorch's flash attention for CPU)."""
    lay, views, table, lens, ctx, q = _chunk_case(6, 2, 64, 32, 64, 4, 2, M=7, seed=5)
    want, want_lse = _fp64(q, views, lay, table, lens, 0.125, 0.0, ctx)
    for fn in (paged_reference.paged_attention, ops.paged_attention):
        out, lse = fn(q, *paged.regions(views), table, lens, ctx, 0.125, 0.0, 4, 2, 32)
        assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()
        finite = ctx > 0
        assert torch.allclose(lse[finite].double(), want_lse[finite], atol=1e-5)
        assert torch.isneginf(lse[~finite]).all() and not out[~finite].any()  # an empty context: nothing, -inf


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("Hq,Hkv,D,G,N,k_bits,v_bits,M", [(8, 2, 64, 32, 64, 4, 2, 24), (4, 1, 128, 16, 32, 2, 4, 5)])
def test_the_triton_kernel_over_chunks_of_queries_equals_the_reference(
    triton_on_cpu, Hq, Hkv, D, G, N, k_bits, v_bits, M
):
    """96 rows per KV head take two programs of 64; 20 rows one."""
    lay, views, table, lens, ctx, q = _chunk_case(Hq, Hkv, D, G, N, k_bits, v_bits, M, seed=D)
    args = (*(views[n] for n in paged.REGIONS), table, lens, ctx, D**-0.5, 0.0, k_bits, v_bits, G)
    out, lse = ops.paged_attention(q, *args)
    want, want_lse = paged_reference.paged_attention(q, *args)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = ~torch.isneginf(want_lse)
    assert torch.allclose(lse[finite], want_lse[finite], atol=1e-5)


@pytest.mark.parametrize("softcap", [0.0, 20.0])
def test_a_prefill_chunk_attends_over_the_stored_context_and_itself(softcap):
    """Written as vLLM does (the chunk first), then attended: context as stored, new tokens as given."""
    Hq, H, D, G, N, ctx, Lq = 6, 2, 32, 16, 32, 75, 150  # the context ends inside a group; 150 > QUERY_BLOCK
    lay = PageLayout(D, N, torch.float32, 4, 2, G)
    g = torch.Generator().manual_seed(7)
    table, blocks = _tables([ctx + Lq], N, seed=7)
    cache = torch.zeros(blocks, H, N, lay.slot_bytes // 4)
    views = lay.views(cache)
    k, v = torch.randn(ctx + Lq, H, D, generator=g), torch.randn(ctx + Lq, H, D, generator=g)
    slots = table[0].long()[torch.arange(ctx + Lq) // N] * N + torch.arange(ctx + Lq) % N
    paged.write(views, lay, k[:ctx], v[:ctx], slots[:ctx])
    paged.write(views, lay, k[ctx:], v[ctx:], slots[ctx:])  # the chunk, written before its attention
    # the context as stored now: the chunk completed the context's open group, whose keys are now codes
    stored = paged.dense(paged.gather(views, lay, table, torch.tensor([ctx + Lq])), lay, ctx)
    q = torch.randn(Lq, Hq, D, generator=g)
    out = paged.extend(
        q, k[ctx:], v[ctx:], views, lay, table, torch.tensor([ctx + Lq], dtype=torch.int32), 0.2, softcap
    )
    keys = torch.cat([stored[0][0].transpose(0, 1), k[ctx:]]).double()  # [ctx + Lq, H, D]
    vals = torch.cat([stored[1][0].transpose(0, 1), v[ctx:]]).double()
    s = torch.einsum("mhgd,nhd->mhgn", q.double().view(Lq, H, Hq // H, D), keys) * 0.2
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    causal = torch.arange(ctx + Lq)[None] <= ctx + torch.arange(Lq)[:, None]
    s = s.masked_fill(~causal[:, None, None], float("-inf"))
    want = torch.einsum("mhgn,nhd->mhgd", torch.softmax(s, -1), vals).reshape(Lq, Hq, D)
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
def test_the_split_partials_live_in_a_workspace_reserved_once(triton_on_cpu):
    """The builder reserves the workspace for its largest batch before capture: later calls of any batch up
    to it reuse the same memory (a CUDA graph replays the same addresses); the merge kernel writes the output."""
    lay = PageLayout(64, 32, torch.float32, 4, 2, 32)
    triton_paged.reserve(8, 2, 8, 64, "cpu")
    buf = triton_paged._WORKSPACE["cpu"]
    assert buf.numel() >= triton_paged.workspace_floats(8, 2, 8, 64, 1, "cpu")  # earlier calls may have grown it
    for B in (1, 4, 8):
        lens = torch.full((B,), 40, dtype=torch.int32)
        table, blocks = _tables(lens.tolist(), 32, seed=B)
        views = _pages(lay, blocks, 2, seed=B)
        q = torch.randn(B, 8, 64)
        args = (*paged.regions(views), table, lens, 0.125, 0.0, 4, 2, 32)
        out = ops.paged_decode_attention(q, *args)
        assert triton_paged._WORKSPACE["cpu"] is buf
        assert (out - paged_reference.paged_decode_attention(q, *args)).abs().max() <= 1e-5 * out.abs().max()


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
def test_opcheck(triton_on_cpu):
    lay = PageLayout(64, 32, torch.float32, 4, 2, 32)
    lens = torch.tensor([40, 0], dtype=torch.int32)
    table, blocks = _tables(lens.tolist(), 32, seed=0)
    views = _pages(lay, blocks, 2, seed=0)
    q = torch.randn(2, 4, 64)
    regions = [views[n] for n in paged.REGIONS]
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    opcheck(ops.paged_decode_attention, (q, *regions, table, lens, 0.125, 0.0, 4, 2, 32), test_utils=utils)
    opcheck(
        ops.paged_attention, (q[:, :, None], *regions, table, lens, lens - 1, 0.125, 0.0, 4, 2, 32), test_utils=utils
    )


@pytest.mark.parametrize("k_bits,v_bits,G,N", [(4, 2, 32, 64), (2, 2, 16, 16)])
def test_the_decode_write_stores_what_the_general_write_does_and_reads_nothing_back(k_bits, v_bits, G, N):
    H, D = 2, 64
    lay = PageLayout(D, N, torch.float32, k_bits, v_bits, G)
    g = torch.Generator().manual_seed(G)
    lens = [2 * N + 7, N - 1]
    table, blocks = _tables([n + 40 for n in lens], N, seed=1)
    K = [torch.randn(n + 40, H, D, generator=g) for n in lens]
    V = [torch.randn(n + 40, H, D, generator=g) for n in lens]
    caches = [torch.zeros(blocks, H, N, lay.slot_bytes // 4) for _ in range(2)]
    general, decoded = (lay.views(c) for c in caches)

    def slots(b, a, e):
        p = torch.arange(a, e)
        return table[b].long()[p // N] * N + p % N

    for views in (general, decoded):  # the prompts, written alike
        for b, n in enumerate(lens):
            paged.write(views, lay, K[b][:n], V[b][:n], slots(b, 0, n), clip=True)
    for step in range(40):  # then 40 decode steps of both sequences and a padding slot
        key = torch.cat([K[0][lens[0] + step : lens[0] + step + 1], K[1][lens[1] + step : lens[1] + step + 1]])
        val = torch.cat([V[0][lens[0] + step : lens[0] + step + 1], V[1][lens[1] + step : lens[1] + step + 1]])
        slot = torch.cat([slots(0, lens[0] + step, lens[0] + step + 1), slots(1, lens[1] + step, lens[1] + step + 1)])
        key, val = torch.cat([key, torch.full((1, H, D), float("nan"))]), torch.cat([val, torch.zeros(1, H, D)])
        slot = torch.cat([slot, torch.tensor([-1])])
        paged.write(general, lay, key, val, slot, clip=True)
        with no_host_reads():
            paged.write_decode(decoded, lay, key, val, slot, clip=True)
    lens_now = torch.tensor([n + 40 for n in lens], dtype=torch.int32)
    a, b = (paged.gather(v, lay, table, lens_now) for v in (general, decoded))
    assert torch.equal(a["n_packed"], b["n_packed"]) and torch.equal(a["res_len"], b["res_len"])
    for s, n in enumerate(lens_now.tolist()):  # each sequence's tokens (its table's padding is block 0)
        groups = n // G
        for name in ("v_codes", "v_scale", "v_mn"):
            assert torch.equal(a[name][s, :, :n], b[name][s, :, :n]), name
        for name in ("k_scale", "k_mn"):
            assert torch.equal(a[name][s, :, :, :groups], b[name][s, :, :, :groups]), name
        words = groups * G * k_bits // 32  # the complete groups' codes (the open group is in the residual)
        assert torch.equal(a["k_codes"][s, :, :, :words], b["k_codes"][s, :, :, :words])
        assert torch.equal(a["res_k"][s, :, : n - groups * G], b["res_k"][s, :, : n - groups * G])
    used = torch.zeros(blocks, dtype=torch.bool)
    used[table.long().flatten()] = True
    used[0] = True  # the null block takes what has no target
    assert not caches[1][~used].any()  # nothing written anywhere else

    q = torch.randn(2, 4, D, generator=g)
    with no_host_reads():
        out = paged.decode(q, decoded, lay, table, lens_now, D**-0.5, 0.0)
    want = _fp64(q, decoded, lay, table, lens_now, D**-0.5, 0.0)[0]
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


# ---- per-token keys: no open group, no residual in the page -------------------------------------


@pytest.mark.parametrize("k_bits,v_bits,G,N", [(4, 2, 32, 16), (2, 2, 16, 64), (4, 4, 32, 32)])
def test_per_token_keys_store_quantize_pack_codes_and_decode_equals_fp64(k_bits, v_bits, G, N):
    """Keys quantized per token over G channels, as values, in any block size (16: vLLM's default): the pages
    hold ``quantize_pack`` of each token, the decode write stores what the general write does without host
    reads, and decode over the pages equals fp64 attention over the dequantized codes."""
    H, Hq, D = 2, 8, 64
    lay = PageLayout(D, N, torch.float32, k_bits, v_bits, G, keys_per_token=True)
    assert (
        "k_res" not in lay.regions() and lay.slot_bytes < PageLayout(D, N, torch.float32, k_bits, v_bits, 16).slot_bytes
    )
    lens = [3 * N + 5, 7]
    table, blocks = _tables(lens, N, seed=G)
    g = torch.Generator().manual_seed(N)
    K = [torch.randn(n, H, D, generator=g) for n in lens]
    V = [torch.randn(n, H, D, generator=g) for n in lens]
    caches = [torch.zeros(blocks, H, N, lay.slot_bytes // 4) for _ in range(2)]
    general, decoded = (lay.views(c) for c in caches)
    for b, n in enumerate(lens):
        p = torch.arange(n)
        slots = table[b].long()[p // N] * N + p % N
        paged.write(general, lay, K[b], V[b], slots, clip=True)
        paged.write(decoded, lay, K[b][:-1], V[b][:-1], slots[:-1], clip=True)  # all but the last token, then:
        with no_host_reads():
            paged.write_decode(decoded, lay, K[b][-1:], V[b][-1:], slots[-1:], clip=True)
        for kind, x, bits in (("k", K[b], k_bits), ("v", V[b], v_bits)):
            codes, scale, mn = ops.quantize_pack(x, bits, G, True)
            blk, off = slots // N, slots % N
            assert torch.equal(general[f"{kind}_codes"][blk, :, off], codes)
            assert torch.equal(general[f"{kind}_scale"][blk, :, off], scale)
    for name in general:
        assert torch.equal(general[name], decoded[name]), (
            name,
            (general[name] != decoded[name]).nonzero()[:4].tolist(),
        )
    q = torch.randn(len(lens), Hq, D, generator=g)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = ops.paged_decode_attention(q, *paged.regions(general), table, lens_t, D**-0.5, 0.0, k_bits, v_bits, G, True)
    for b, n in enumerate(lens):
        k, v = (
            ops.unpack_dequantize(*ops.quantize_pack(x, bits, G, True), bits, G, torch.float64).transpose(0, 1)
            for x, bits in ((K[b], k_bits), (V[b], v_bits))
        )  # [H, n, D]
        p = torch.softmax(torch.einsum("hgd,hnd->hgn", q[b].double().view(H, Hq // H, D), k) * D**-0.5, -1)
        want = torch.einsum("hgn,hnd->hgd", p, v).reshape(Hq, D)
        assert (out[b].double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("D,G,N,M", [(64, 32, 16, 1), (128, 16, 64, 1), (64, 32, 32, 6)])
def test_the_triton_kernel_with_per_token_keys_equals_the_reference(triton_on_cpu, D, G, N, M):
    lay = PageLayout(D, N, torch.float32, 4, 2, G, keys_per_token=True)
    lens = torch.tensor([3 * N + 5, 0, N, 1], dtype=torch.int32)
    ctx = torch.tensor([3 * N + 1, 0, N, 1], dtype=torch.int32)
    table, blocks = _tables(lens.tolist(), N, seed=D)
    views = _pages(lay, blocks, 2, seed=G)
    q = torch.randn(len(lens), 8, M, D, generator=torch.Generator().manual_seed(N))
    args = (*paged.regions(views), table, lens, ctx, D**-0.5, 0.0, 4, 2, G, True)
    out, lse = ops.paged_attention(q, *args)
    want, want_lse = paged_reference.paged_attention(q, *args)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    finite = ~torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), ~finite) and torch.allclose(lse[finite], want_lse[finite], atol=1e-5)
