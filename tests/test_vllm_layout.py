"""The vLLM backend's storage, without vLLM: minikv's KIVI layout inside paged blocks (minikv.vllm).

Tokens written in any chunking, through any block table, with padding slots: the stored key codes
equal ``minikv::quantize_pack`` of each complete group, value codes of each token, the open group's
keys sit exactly in the block's residual; decode over the pages equals fp64 attention over the stored
tokens; the page layout's regions fit and the declared bytes; bad settings are refused by name.
The engine-level tests (a real ``vllm.LLM``) are in tests/vllm_engine/ and run in their own venv (.ci/vllm).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minikv.kernels import ops
from minikv.rotation import hadamard, rotate
from minikv.vllm import paged, plugin
from minikv.vllm.layout import ALIGN, PageLayout
from minikv.vllm.settings import Settings, parse


def _cache(lay: PageLayout, blocks: int, H: int) -> torch.Tensor:
    """A cache tensor shaped as vLLM hands it over: ``[blocks, H, N, C / itemsize]`` in the model dtype."""
    return torch.zeros(blocks, H, lay.block_size, lay.slot_bytes // lay.dtype.itemsize, dtype=lay.dtype)


def _write_all(lay, views, tables, K, V, chunks, rot, clip):
    """Write each sequence's tokens in the given chunk sizes, requests interleaved as vLLM batches them,
    with a padding slot (-1, NaN key) at the end of every call. Returns each sequence's keys and values
    rotated as the writes rotated them (the same call on the same rows: a row's rounding can depend on
    the batch it is rotated in)."""
    N = lay.block_size
    pos = [0] * len(K)
    rotated = [([], []) for _ in K]
    for step in range(max(len(c) for c in chunks)):
        ks, vs, slots, owners = [], [], [], []
        for b, sizes in enumerate(chunks):
            if step < len(sizes):
                a, e = pos[b], pos[b] + sizes[step]
                p = torch.arange(a, e)
                ks.append(K[b][a:e]), vs.append(V[b][a:e]), slots.append(tables[b][p // N] * N + p % N)
                owners += [b] * (e - a)
                pos[b] = e
        H, D = K[0].shape[1:]
        (
            ks.append(torch.full((1, H, D), float("nan"))),
            vs.append(torch.zeros(1, H, D)),
            slots.append(torch.tensor([-1])),
        )
        key, value, slot = torch.cat(ks), torch.cat(vs), torch.cat(slots)
        paged.write(views, lay, key, value, slot, rot, rot, clip)
        real = slot >= 0  # the writer drops the padding slot before it rotates
        rk, rv = rotate(key[real].to(lay.dtype), rot), rotate(value[real].to(lay.dtype), rot)
        for i, b in enumerate(owners):
            rotated[b][0].append(rk[i]), rotated[b][1].append(rv[i])
    return [(torch.stack(k), torch.stack(v)) for k, v in rotated]


def _split(total: int, cuts: list[int]) -> list[int]:
    """Chunk sizes summing to ``total``: a prompt cut where ``cuts`` say, then one token per step."""
    first = min(total, cuts[0]) if cuts else total
    sizes = [max(first, 1)]
    rest = total - sizes[0]
    for c in cuts[1:]:
        if rest <= 0:
            break
        sizes.append(min(rest, c))
        rest -= sizes[-1]
    return sizes + [1] * rest


@settings(max_examples=25, deadline=None)
@given(
    k_bits=st.sampled_from([2, 4]),
    v_bits=st.sampled_from([2, 4]),
    G=st.sampled_from([16, 32]),
    blocks_per=st.sampled_from([1, 2, 4]),
    lens=st.lists(st.integers(1, 200), min_size=1, max_size=3),
    cuts=st.lists(st.integers(1, 90), max_size=3),
    rotate_kv=st.booleans(),
    clip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_stored_codes_equal_quantize_pack_of_the_same_tokens(
    k_bits, v_bits, G, blocks_per, lens, cuts, rotate_kv, clip, seed
):
    g = torch.Generator().manual_seed(seed)
    H, D, N = 2, 32, G * blocks_per
    lay = PageLayout(D, N, torch.float32, k_bits, v_bits, G)
    per_seq = -(-max(lens) // N)
    order = torch.randperm(len(lens) * per_seq + 3, generator=g)[: len(lens) * per_seq]  # any block ids
    tables = order.view(len(lens), per_seq)
    cache = _cache(lay, len(lens) * per_seq + 3, H)
    views = lay.views(cache)
    K = [torch.randn(n, H, D, generator=g) for n in lens]
    V = [torch.randn(n, H, D, generator=g) for n in lens]
    R = hadamard(D) if rotate_kv else None
    written = _write_all(lay, views, tables, K, V, [_split(n, cuts) for n in lens], R, clip)
    store = paged.gather(views, lay, tables, torch.tensor(lens))
    W = G * k_bits // 32
    for b, n in enumerate(lens):
        k, v = written[b]
        for j in range(n // G):
            codes, scale, mn = ops.quantize_pack(k[j * G : (j + 1) * G].permute(1, 2, 0), k_bits, G, clip)
            assert torch.equal(store["k_codes"][b, :, :, j * W : (j + 1) * W], codes)
            assert torch.equal(store["k_scale"][b, :, :, j], scale[..., 0])
            assert torch.equal(store["k_mn"][b, :, :, j], mn[..., 0])
        codes, scale, mn = ops.quantize_pack(v, v_bits, G, clip)
        assert torch.equal(store["v_codes"][b, :, :n], codes.transpose(0, 1))
        assert torch.equal(store["v_scale"][b, :, :n], scale.transpose(0, 1))
        n_packed = n // G * G
        assert int(store["n_packed"][b]) == n_packed and int(store["res_len"][b]) == n - n_packed
        assert torch.equal(store["res_k"][b, :, : n - n_packed], k[n_packed:].transpose(0, 1))  # exact, full precision


@pytest.mark.parametrize("k_bits,v_bits,rotate_kv", [(4, 2, True), (2, 2, False), (4, 4, True)])
def test_decode_over_the_pages_equals_fp64_attention_over_the_stored_tokens(k_bits, v_bits, rotate_kv):
    g = torch.Generator().manual_seed(0)
    H, Hq, D, G, N = 2, 6, 64, 32, 64
    lay = PageLayout(D, N, torch.float32, k_bits, v_bits, G)
    lens = [150, 37, 64]
    tables = torch.tensor([[3, 7, 1], [5, 2, 0], [4, 6, 8]])
    views = lay.views(_cache(lay, 9, H))
    K = [torch.randn(n, H, D, generator=g) * 2 for n in lens]
    V = [torch.randn(n, H, D, generator=g) for n in lens]
    R = hadamard(D) if rotate_kv else None
    _write_all(lay, views, tables, K, V, [_split(n, [n - 5]) for n in lens], R, True)
    store = paged.gather(views, lay, tables, torch.tensor(lens))
    q = torch.randn(3, Hq, D, generator=g)
    out = paged.decode(q, views, lay, tables, torch.tensor(lens), D**-0.5, 0.0, R, R)
    kd, vd = paged.dense(store, lay, max(lens), R, R)
    for b, n in enumerate(lens):
        k, v = kd[b, :, :n].double(), vd[b, :, :n].double()  # [H, n, D]
        qb = q[b].double().view(H, Hq // H, D)
        ref = torch.einsum("hgn,hnd->hgd", torch.softmax(torch.einsum("hgd,hnd->hgn", qb, k) * D**-0.5, -1), v)
        assert (out[b].double() - ref.reshape(Hq, D)).abs().max() <= 1e-5 * ref.abs().max()
        # the stored tokens are the given ones up to quantization: an SQNR floor per width (Gaussian data, G 32:
        # min-max steps of ~range/3 and ~range/15 give ~8 and ~22 dB)
        for x, x_hat, bits in ((K[b], k, k_bits), (V[b], v, v_bits)):
            x = x.double().transpose(0, 1)
            sqnr = 10 * torch.log10(x.square().sum() / (x - x_hat).square().sum())
            assert sqnr > {4: 18.0, 2: 6.0}[bits], (bits, float(sqnr))


def test_the_new_tokens_attend_in_full_precision_over_the_stored_context():
    """A chunk of new tokens (prefill, a later turn): context as stored, new tokens as given, causal."""
    g = torch.Generator().manual_seed(1)
    q, kc, vc = (
        torch.randn(5, 4, 16, generator=g),
        torch.randn(7, 2, 16, generator=g),
        torch.randn(7, 2, 16, generator=g),
    )
    kn, vn = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    out = paged.attend(q, kc, vc, kn, vn, 0.25, 0.0)
    keys, vals = torch.cat([kc, kn]).double(), torch.cat([vc, vn]).double()
    for i in range(5):
        for h in range(4):
            s = keys[: 8 + i, h // 2] @ q[i, h].double() * 0.25
            ref = torch.softmax(s, 0) @ vals[: 8 + i, h // 2]
            assert torch.allclose(out[i, h].double(), ref, atol=1e-5)


def test_sixteen_bits_stores_every_token_exactly():
    lay = PageLayout(32, 32, torch.bfloat16, 16, 16, 32)
    assert lay.slot_bytes == lay.dense_slot_bytes == 2 * 32 * 2
    views = lay.views(_cache(lay, 4, 2))
    k, v = torch.randn(40, 2, 32).bfloat16(), torch.randn(40, 2, 32).bfloat16()
    slots = torch.cat([torch.arange(32, 64), torch.arange(96, 104)])  # blocks 1 then 3
    paged.write(views, lay, k, v, slots)
    assert torch.equal(views["k"][1].transpose(0, 1), k[:32]) and torch.equal(
        views["v"][3, :, :8].transpose(0, 1), v[32:]
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "D,N,G,k_bits,v_bits", [(64, 128, 32, 4, 2), (64, 256, 32, 2, 2), (128, 256, 32, 4, 2), (32, 32, 16, 2, 4)]
)
def test_the_regions_fit_the_declared_bytes(dtype, D, N, G, k_bits, v_bits):
    lay = PageLayout(D, N, dtype, k_bits, v_bits, G)
    spans = sorted((off, off + torch.Size(shape).numel() * dt.itemsize) for off, shape, dt in lay.regions().values())
    assert all(a % ALIGN == 0 for a, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # no overlap
    assert spans[-1][1] == lay.page_bytes <= N * lay.slot_bytes < lay.page_bytes + N * max(ALIGN, dtype.itemsize)
    expected = N * (D * k_bits + D * v_bits) // 8 + 2 * 2 * D * (N // G) + 2 * 2 * N * (D // G) + G * D * dtype.itemsize
    assert lay.page_bytes == expected  # codes, fp16 scales and minimums, the keys' residual: nothing else
    cache = _cache(lay, 3, 2)
    views = lay.views(cache)
    views["k_res"][1, 0].fill_(1.0)
    assert cache.view(torch.uint8)[1, 0].any() and not cache.view(torch.uint8)[0].any()  # views write the cache
    with pytest.raises(ValueError, match="page holds"):
        lay.views(cache[..., :-1].contiguous())


def test_settings_parse_and_refuse_by_name():
    assert parse(None) is None and parse("") is None and parse("0") is None
    assert parse("1") == Settings()
    assert parse("bits=2,group_size=16,clip=0,rotate=v") == Settings(2, 2, 16, False, "v")
    assert parse("bits=16") == Settings(16, 16, 32, False, "none")
    assert parse("keys=token").keys == "token"
    Settings(keys="token").check_model(64, 16)  # no open group: vLLM's default block size
    for text, name in [
        ("bits=3", "k_bits"),
        ("k_bits=4,v_bits=16", "k_bits and v_bits"),
        ("group_size=48", "group_size"),
        ("rotate=q", "rotate"),
        ("clip=yes", "clip"),
        ("bits", "key=value"),
        ("budget=0.5", "key=value"),
        ("k_bits=four", "k_bits"),
        ("keys=head", "keys must be one of"),
    ]:
        with pytest.raises(ValueError, match=name):
            parse(text)
    with pytest.raises(
        ValueError, match=r"group_size=64 must divide the model's head_dim=32 \(valid here: \[16, 32\]\)"
    ):
        Settings(group_size=64).check_model(32, 128)
    with pytest.raises(ValueError, match="block size .* multiple of group_size=32"):
        Settings().check_model(64, 48)
    Settings(16, 16).check_model(24, 48)  # 16 bits: any head and block vLLM takes


def test_the_plugin_leaves_vllm_alone_unless_asked(monkeypatch):
    monkeypatch.delenv("MINIKV_VLLM", raising=False)
    assert plugin.register() is None  # returns before importing vLLM (not installed in this venv)
    monkeypatch.setenv("MINIKV_VLLM", "bits=5")
    with pytest.raises(ValueError, match="k_bits must be one of"):
        plugin.register()
    plugin.check_version("0.32.3")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x, found vLLM 0\.33\.0"):
        plugin.check_version("0.33.0")


def test_softcapped_attention_caps_the_logits():
    g = torch.Generator().manual_seed(2)
    q, kc, vc = (
        torch.randn(3, 2, 8, generator=g) * 4,
        torch.randn(4, 1, 8, generator=g) * 4,
        torch.randn(4, 1, 8, generator=g),
    )
    kn, vn = torch.randn(3, 1, 8, generator=g), torch.randn(3, 1, 8, generator=g)
    out = paged.attend(q, kc, vc, kn, vn, 0.5, 5.0)
    keys, vals = torch.cat([kc, kn])[:, 0].double(), torch.cat([vc, vn])[:, 0].double()
    for i in range(3):
        for h in range(2):
            s = 5.0 * torch.tanh(keys[: 5 + i] @ q[i, h].double() * 0.5 / 5.0)
            assert torch.allclose(out[i, h].double(), torch.softmax(s, 0) @ vals[: 5 + i], atol=1e-5)
