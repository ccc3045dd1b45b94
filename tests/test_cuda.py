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
