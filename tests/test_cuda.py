"""The Triton kernels compiled for a GPU (not interpreted): codes bit-identical to the reference
(FMA contraction cannot change them), decode attention within the error budget at the named shapes,
patched generation equal to the reference path, and compiled decode with CUDA graphs replaying.
Skipped without a GPU; ``MINIKV_TEST_CUDA=1 pytest tests/test_cuda.py`` (``benchmarks/run_gpu.sh``)."""

import os

import pytest
import torch
from models import tiny_model
from test_kernels import _dense  # attention in a given dtype: the yardstick of the error budget

import minikv
from minikv.kernels import ops, quant, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a GPU and MINIKV_TEST_CUDA=1 (the kernels compiled, not interpreted)",
)
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def device():
    return torch.device("cuda")


@pytest.mark.parametrize("bits,G", [(2, 16), (2, 32), (4, 32), (4, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("clip", [False, True])
def test_quantize_codes_equal_the_reference(device, bits, G, dtype, clip):
    g = torch.Generator().manual_seed(bits + G)
    x = (torch.randn(4, 8, 256, generator=g) * 3 + torch.rand(4, 8, 1, generator=g)).to(dtype)
    x.view(-1)[::5] = x.view(-1)[1]  # ties
    want = quant.quantize_pack(x, bits, G, clip)  # the reference, on CPU
    for keys in (False, True):
        xs = x.transpose(-1, -2).contiguous().transpose(-1, -2) if keys else x  # strided like the keys
        got = ops.quantize_pack(xs.to(device), bits, G, clip)
        for a, b in zip(want, got):
            assert torch.equal(a, b.cpu())


# Llama-3-8B (32/8, D 128), Gemma 3 (4/1 MQA, D 256), SmolLM2 (9/3, D 64); K4V2 and K2V2
SHAPES = [(32, 8, 128, 4, 2), (4, 1, 256, 4, 2), (9, 3, 64, 2, 2), (32, 8, 128, 2, 2)]


@pytest.mark.parametrize("Hq,Hkv,D,k_bits,v_bits", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lq", [1, 4])
def test_decode_attention_error_budget(device, Hq, Hkv, D, k_bits, v_bits, dtype, Lq):
    """err(kernel vs fp64) <= 2 err(same-dtype torch vs fp64) + eps, per sequence of a ragged batch."""
    B, G, R, n_packed, res_len = 3, 32, 128, [4096, 1024, 0], [17, 128, Lq]
    g = torch.Generator().manual_seed(D + Hq)
    C = max(n_packed) + R
    k, v = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
    buf = [
        t.to(device) for t in (*quant.quantize_pack(k.transpose(-1, -2), k_bits, G), *quant.quantize_pack(v, v_bits, G))
    ]
    rk = torch.randn(B, Hkv, R, D, generator=g).to(device, dtype)
    rv = torch.randn(B, Hkv, R, D, generator=g).to(device, dtype)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(device, dtype)
    npk = torch.tensor(n_packed, device=device)[:, None].expand(-1, Hkv).contiguous()
    rl = torch.tensor(res_len, device=device)
    got = ops.decode_attention(q, *buf, npk, rk, rv, rl, D**-0.5, 0.0, k_bits, v_bits, G).double()
    K = quant.unpack_dequantize(*buf[:3], k_bits, G, torch.float64).transpose(-1, -2)
    V = quant.unpack_dequantize(*buf[3:], v_bits, G, torch.float64)
    for b in range(B):
        n, r = n_packed[b], res_len[b]
        keys = torch.cat([K[b : b + 1, :, :n], rk[b : b + 1, :, :r].double()], 2)
        vals = torch.cat([V[b : b + 1, :, :n], rv[b : b + 1, :, :r].double()], 2)
        exact = _dense(q[b : b + 1].double(), keys, vals, n, r, Lq, torch.float64)
        same = _dense(q[b : b + 1], keys, vals, n, r, Lq, dtype).double()
        assert (got[b : b + 1] - exact).abs().max() <= 2 * (same - exact).abs().max() + EPS[dtype], b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_with_a_tier_is_the_reference_on_the_gpu(device, dtype):
    """A K4 V4 tier beside a K4 V2 store (SmolLM2's shape, per-head fill levels): the compiled kernel
    against the reference's fp32 math on the same codes."""
    B, Hq, Hkv, D, G, R = 2, 9, 3, 64, 32, 128
    g = torch.Generator().manual_seed(7)

    def packed(C, kb, vb):
        k, v = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
        return [*quant.quantize_pack(k.transpose(-1, -2), kb, G), *quant.quantize_pack(v, vb, G)]

    main, tier = packed(1024 + R, 4, 2), packed(512, 4, 4)
    npk, nt = torch.tensor([[1024, 64, 0], [512, 1024, 96]]), torch.tensor([[512, 0, 32], [64, 512, 480]])
    rk, rv = (torch.randn(B, Hkv, R, D, generator=g).to(dtype) for _ in range(2))
    rl, q = torch.tensor([17, 1]), torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    args = (q, *main, npk, rk, rv, rl, D**-0.5, 0.0, 4, 2, G, *tier, nt, 4, 4)
    want = reference.decode_attention(*args).float()
    got = ops.decode_attention(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)).float().cpu()
    assert (got - want).abs().max() <= 4 * EPS[dtype]


def test_prefill_attention_and_scores(device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 300, 128, generator=g).to(device, torch.bfloat16)
    k = torch.randn(2, 2, 300, 128, generator=g).to(device, torch.bfloat16)
    v = torch.randn(2, 2, 300, 128, generator=g).to(device, torch.bfloat16)
    valid = torch.ones(2, 300, dtype=torch.bool, device=device)
    valid[1, :40] = False
    w = torch.rand(2, 300, generator=g).to(device)
    out, scores = ops.prefill_attention(q, k, v, valid, w, 128**-0.5, 0.0)
    ref_out, ref_scores = reference.prefill_attention(q.double(), k.double(), v.double(), valid, w, 128**-0.5, 0.0)
    assert (out.double() - ref_out.double())[valid[:, None, :, None].expand_as(out)].abs().max() < 3e-2
    assert torch.allclose(scores.double(), ref_scores.double(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_patched_generation_with_triton_equals_the_reference(device, family):
    model = tiny_model(family, dtype=torch.float32, head_dim=64).to(device)
    ids = torch.randint(1, 320, (2, 200), generator=torch.Generator().manual_seed(1)).to(device)
    outs = {}
    for backend in ("reference", "triton"):
        minikv.patch(model, budget=0.5, residual_length=32, backend=backend)
        outs[backend] = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
        minikv.unpatch(model)
    assert torch.equal(outs["reference"], outs["triton"])


def test_compiled_decode_with_cuda_graphs_equals_eager(device):
    model = tiny_model("llama", dtype=torch.float16, head_dim=64).to(device)
    ids = torch.randint(1, 320, (1, 300), generator=torch.Generator().manual_seed(2)).to(device)
    minikv.patch(model, budget=0.5, residual_length=32)
    try:
        eager = minikv.generate(model, ids, max_new_tokens=80)
        graphs = minikv.generate(model, ids, max_new_tokens=80, compile=True, mode="reduce-overhead")
    finally:
        minikv.unpatch(model)
    assert torch.equal(eager, graphs)


@pytest.mark.parametrize("k_bits,v_bits,dtype", [(4, 2, torch.bfloat16), (2, 2, torch.float16)])
def test_paged_decode_and_write_replay_in_a_cuda_graph(device, k_bits, v_bits, dtype):
    """vLLM's decode step, captured once: the decode write and the paged decode kernel; then the block
    tables, lengths and slot mappings change in place between replays (padded rows and slot -1
    included), and every replay equals an eager run on a copy of the cache."""
    from minikv.kernels import paged_reference
    from minikv.vllm import paged
    from minikv.vllm.layout import PageLayout

    Hq, Hkv, D, N, G, B, nb = 8, 2, 128, 64, 32, 4, 6
    lay = PageLayout(D, N, dtype, k_bits, v_bits, G)
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.zeros(B * nb + 1, Hkv, N, lay.slot_bytes // dtype.itemsize, dtype=dtype, device=device)
    views = lay.views(cache)
    table = torch.zeros(B, nb, dtype=torch.int32, device=device)
    lens = torch.zeros(B, dtype=torch.int32, device=device)
    slots = torch.zeros(B, dtype=torch.int64, device=device)
    q = torch.zeros(B, Hq, D, dtype=dtype, device=device)
    key = torch.zeros(B, Hkv, D, dtype=dtype, device=device)
    value = torch.zeros_like(key)

    def step():
        paged.write_decode(views, lay, key, value, slots, clip=True)
        return paged.decode(q, views, lay, table, lens, D**-0.5, 0.0)

    def fill(seed: int, padded: int):
        """New tables, lengths and slots in place: the first sequences have prompts written eagerly."""
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(B * nb, generator=gen).view(B, nb) + 1
        table.copy_(order.int())
        n = torch.randint(1, nb * N - 1, (B,), generator=gen)
        n[B - padded :] = 0
        for b in range(B - padded):  # each sequence's earlier tokens, written eagerly
            p = torch.arange(int(n[b]))
            paged.write(
                views,
                lay,
                torch.randn(len(p), Hkv, D, device=device).to(dtype),
                torch.randn(len(p), Hkv, D, device=device).to(dtype),
                (order[b][p // N] * N + p % N).to(device),
            )
        new_slot = torch.where(n > 0, order[torch.arange(B), n // N] * N + n % N, -1)
        slots.copy_(new_slot.to(device))
        lens.copy_(torch.where(n > 0, n + 1, 0).int().to(device))
        q.copy_(torch.randn(B, Hq, D, generator=g, device=device).to(dtype))
        key.copy_(torch.randn(B, Hkv, D, generator=g, device=device).to(dtype))
        value.copy_(torch.randn(B, Hkv, D, generator=g, device=device).to(dtype))

    from minikv.kernels import triton_paged

    triton_paged.reserve(B, Hkv, Hq, D, device)  # as the vLLM builder does, before capture
    fill(0, 0)
    step()  # warm up (compiles the kernels) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed, padded in ((1, 0), (2, 1), (3, 2)):
        fill(seed, padded)
        before = cache.clone()
        graph.replay()
        after = cache.clone()
        cache.copy_(before)
        want = step()  # eager, on the same inputs
        assert torch.equal(cache, after)  # the replayed write wrote what the eager one does
        assert torch.equal(out, want)
        ref = paged_reference.paged_decode_attention(
            q, *(views[n] for n in paged.REGIONS), table, lens, D**-0.5, 0.0, k_bits, v_bits, G
        )
        assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
        assert not out[B - padded :].any()  # padded rows give zeros
