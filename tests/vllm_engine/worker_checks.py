"""Functions vLLM runs inside its worker (``LLM.collective_rpc``): record what the first attention layer
is given and returns, then compare the pages it wrote with ``minikv::quantize_pack`` of the same tokens
and its output with an fp64 attention over the stored (dequantized) tokens."""

from __future__ import annotations

from types import SimpleNamespace

import torch

RECORD: dict = {}


def _layer(worker):
    ctx = worker.model_runner.compilation_config.static_forward_context
    name = sorted(n for n in ctx if n.endswith(".attn"))[0]
    return name, ctx[name]


def install(worker) -> str:
    from vllm.forward_context import get_forward_context

    name, attn = _layer(worker)
    RECORD.update(name=name, keys={}, values={}, last=None)

    def pre(module, args):
        RECORD["active"] = True
        fc = get_forward_context()
        slots = fc.slot_mapping[name]
        if not bool((slots > 0).any()):  # a dummy batch (slot 0 is vLLM's null block): not a request's tokens
            return
        n = slots.shape[0]
        key = args[1].view(-1, attn.num_kv_heads, attn.head_size)[:n]
        value = args[2].view(-1, attn.num_kv_heads, attn.head_size)[:n]
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                RECORD["keys"][s], RECORD["values"][s] = key[i].clone(), value[i].clone()
        meta = fc.attn_metadata[name] if isinstance(fc.attn_metadata, dict) else fc.attn_metadata
        # the block table and lengths live in the runner's persistent buffers, rewritten by later steps: copy them
        nd = meta.num_decodes  # the decodes come first, one token each; then the requests with host copies
        snapshot = SimpleNamespace(
            query_start=list(range(nd)) + (list(meta.query_start) or [nd]),
            seq_lens_host=meta.seq_lens.tolist(),
            seq_lens=meta.seq_lens.clone(),
            block_table=meta.block_table.clone(),
        )
        RECORD["pending"] = (args[0].clone(), snapshot)

    def post(module, args, output):
        RECORD["active"] = False
        if "pending" not in RECORD:
            return
        q, meta = RECORD.pop("pending")
        RECORD["last"] = (q, output.clone(), meta)
        starts, lens = meta.query_start, meta.seq_lens_host
        if any(b - a > 1 and n > b - a for a, b, n in zip(starts, starts[1:], lens)):  # a later prefill chunk
            RECORD["chunk"] = RECORD["last"]

    attn.register_forward_pre_hook(pre)
    attn.register_forward_hook(post)
    _record_rotated_rows()
    _guard_decode_path(attn.impl)
    return name


def _record_rotated_rows() -> None:
    """Keep the first layer's writes as the writer rotated them (``RECORD["writes"]``): an fp32 matmul's
    rounding depends on the batch it runs in, so the stored codes are compared with ``quantize_pack`` of
    the rows the writer itself produced, not of the same tokens rotated again in another batch. Copies
    only (no host reads: decode steps write under the guard); :func:`_rotated_rows` maps them to slots."""
    from minikv.vllm import paged

    RECORD["writes"] = []
    calls: list = []
    rotate = paged.rotate

    def recording_rotate(x, R):
        y = rotate(x, R)
        calls.append(y)
        return y

    def recording(write):
        def call(views, layout, key, value, slot_mapping, *args, **kwargs):
            calls.clear()
            write(views, layout, key, value, slot_mapping, *args, **kwargs)
            if RECORD.get("active") and len(calls) >= 2:  # the recorded layer, quantized (16 bits: no rotation)
                RECORD["writes"].append((slot_mapping.clone(), calls[0].clone(), calls[1].clone()))

        return call

    paged.rotate = recording_rotate
    paged.write, paged.write_decode = recording(paged.write), recording(paged.write_decode)


def _rotated_rows() -> tuple[dict, dict]:
    """Slot -> key row, slot -> value row, as written (a later write of a slot replaces an earlier one)."""
    keys, values = {}, {}
    for slots, k, v in RECORD["writes"]:
        if k.shape[0] != slots.shape[0]:  # the general write drops padding slots before rotating
            slots = slots[slots >= 0]
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                keys[s], values[s] = k[i], v[i]
    return keys, values


def _guard_decode_path(impl) -> None:
    """Decode-only steps (the batches a CUDA graph captures) run the builder, the write and the attention
    with every host-read API raising; RECORD counts the guarded calls."""
    from host_reads import no_host_reads

    from minikv.vllm import backend

    RECORD.update(guarded={"build": 0, "write": 0, "forward": 0})

    def decode_only(meta) -> bool:
        return meta is not None and meta.num_decodes > 0 and not meta.query_start

    def guarded(name, fn, meta_of):
        def call(*args, **kwargs):
            meta = meta_of(*args, **kwargs)
            if not decode_only(meta):
                return fn(*args, **kwargs)
            RECORD["guarded"][name] += 1
            with no_host_reads():
                return fn(*args, **kwargs)

        return call

    impl.forward = guarded("forward", impl.forward, lambda layer, q, k, v, cache, meta, *a, **kw: meta)
    impl.do_kv_cache_update = guarded(
        "write", impl.do_kv_cache_update, lambda layer, *a, **kw: backend._metadata(layer)
    )
    build = backend.MiniKVMetadataBuilder.build

    def build_guarded(self, common_prefix_len, m, fast_build=False):
        if m.max_query_len != 1 or not self.quantized:
            return build(self, common_prefix_len, m, fast_build)
        RECORD["guarded"]["build"] += 1
        with no_host_reads():
            return build(self, common_prefix_len, m, fast_build)

    backend.MiniKVMetadataBuilder.build = build_guarded


def check(worker) -> dict:
    from minikv.kernels import ops
    from minikv.vllm import backend, paged

    name, attn = _layer(worker)
    impl = attn.impl
    kv_cache = attn.kv_cache if not isinstance(attn.kv_cache, list) else attn.kv_cache[0]
    lay, views, rot_k, rot_v = impl._setup(kv_cache)
    q, out, meta = RECORD["last"]
    N, G, H, D = lay.block_size, lay.group_size, attn.num_kv_heads, attn.head_size
    result = {
        "block_size": N,
        "requests": 0,
        "groups": 0,
        "key_code_mismatch": 0,
        "value_code_mismatch": 0,
        "residual_mismatch": 0,
        "attention_max_err": 0.0,
        "attention_ref_max": 0.0,
        "decode_rows": 0,
        "guarded": dict(RECORD.get("guarded", {})),
        "cudagraph_support": backend.MiniKVMetadataBuilder.get_cudagraph_support(None, None).name,
    }
    result["chunk_rows"], result["chunk_max_err"], result["chunk_ref_max"] = 0, 0.0, 0.0
    if "chunk" in RECORD and lay.quantized:  # a later chunk: its context as stored, itself in full precision
        cq, cout, cmeta = RECORD["chunk"]
        for r, L in enumerate(cmeta.seq_lens_host):
            a, b = cmeta.query_start[r], cmeta.query_start[r + 1]
            if b - a <= 1 or L == b - a:
                continue
            ctx = L - (b - a)
            bt = cmeta.block_table[r]
            pos = torch.arange(ctx, L)
            new = (bt[pos // N].long() * N + pos % N).tolist()
            kd, vd = (
                x[0, :, :ctx].double()
                for x in paged.stored(views, lay, cmeta.block_table[r : r + 1], cmeta.seq_lens[r : r + 1], rot_k, rot_v)
            )  # [H, ctx, D]
            kn = torch.stack([RECORD["keys"][s] for s in new]).double().transpose(0, 1)  # [H, n, D]
            vn = torch.stack([RECORD["values"][s] for s in new]).double().transpose(0, 1)
            keys, vals = torch.cat([kd, kn], 1), torch.cat([vd, vn], 1)
            qr = cq.view(-1, attn.num_heads, D)[a:b].double().view(b - a, H, -1, D)  # [n, H, g, D]
            s = torch.einsum("nhgd,hld->nhgl", qr, keys) * impl.scale
            causal = torch.arange(L)[None] <= ctx + torch.arange(b - a)[:, None]  # [n, L]
            p = torch.softmax(s.masked_fill(~causal[:, None, None], float("-inf")), -1)
            ref = torch.einsum("nhgl,hld->nhgd", p, vals).reshape(b - a, -1)
            got = cout.view(-1, attn.num_heads * D)[a:b].double()
            result["chunk_max_err"] = max(result["chunk_max_err"], float((got - ref).abs().max()))
            result["chunk_ref_max"] = max(result["chunk_ref_max"], float(ref.abs().max()))
            result["chunk_rows"] += 1
    rot_keys, rot_values = _rotated_rows() if lay.quantized else ({}, {})
    for r, L in enumerate(meta.seq_lens_host):
        bt = meta.block_table[r]
        pos = torch.arange(L)
        slots = (bt[pos // N].long() * N + pos % N).tolist()
        result["requests"] += 1
        if not lay.quantized:  # 16 bits: vLLM's dense layout, every token as given
            k = torch.stack([RECORD["keys"][s] for s in slots]).to(lay.dtype)  # [L, H, D]
            v = torch.stack([RECORD["values"][s] for s in slots]).to(lay.dtype)
            idx = torch.tensor(slots)
            stored_k = views["k"].transpose(1, 2).flatten(0, 1)[idx]  # [L, H, D]
            stored_v = views["v"].transpose(1, 2).flatten(0, 1)[idx]
            result["residual_mismatch"] += int((stored_k != k).sum()) + int((stored_v != v).sum())
            continue
        k = torch.stack([rot_keys[s] for s in slots])  # [L, H, D], as the writer rotated them
        v = torch.stack([rot_values[s] for s in slots])
        clip = impl.settings.clip
        if lay.keys_per_token:  # keys as values: every token's codes, no residual
            blk, off = torch.tensor(slots) // N, torch.tensor(slots) % N
            for kind, x, bits in (("k", k, lay.k_bits), ("v", v, lay.v_bits)):
                codes, scale, mn = ops.quantize_pack(x, bits, G, clip)
                bad = int((views[f"{kind}_codes"][blk, :, off] != codes).sum())
                bad += int((views[f"{kind}_scale"][blk, :, off] != scale).sum())
                result["key_code_mismatch" if kind == "k" else "value_code_mismatch"] += bad
            result["groups"] += L // G
        else:
            store = paged.gather(views, lay, meta.block_table[r : r + 1], meta.seq_lens[r : r + 1])
            W = G * lay.k_bits // 32
            for j in range(L // G):
                codes, scale, mn = ops.quantize_pack(k[j * G : (j + 1) * G].permute(1, 2, 0), lay.k_bits, G, clip)
                stored = store["k_codes"][0, :, :, j * W : (j + 1) * W]
                result["key_code_mismatch"] += int((stored != codes).sum()) + int(
                    (store["k_scale"][0, :, :, j] != scale[..., 0]).sum()
                )
                result["groups"] += 1
            vc, vs, vm = ops.quantize_pack(v, lay.v_bits, G, clip)
            result["value_code_mismatch"] += int((store["v_codes"][0, :, :L] != vc.transpose(0, 1)).sum())
            n_packed = L // G * G
            diff = store["res_k"][0, :, : L - n_packed] - k[n_packed:].transpose(0, 1)
            result["residual_mismatch"] += int((diff != 0).sum())
            result["residual_max_err"] = max(
                result.get("residual_max_err", 0.0), float(diff.abs().max()) if diff.numel() else 0.0
            )
        # the output of a decode step against fp64 attention over the stored tokens
        a, b = meta.query_start[r], meta.query_start[r + 1]
        if b - a == 1:
            kd, vd = (
                x[0, :, :L].double()
                for x in paged.stored(views, lay, meta.block_table[r : r + 1], meta.seq_lens[r : r + 1], rot_k, rot_v)
            )  # [H, L, D]
            qr = q.view(-1, attn.num_heads, D)[a].double().view(H, -1, D)  # [H, g, D]
            p = torch.softmax(torch.einsum("hgd,hld->hgl", qr, kd) * impl.scale, -1)
            ref = torch.einsum("hgl,hld->hgd", p, vd).reshape(-1)
            got = out.view(-1, attn.num_heads * D)[a].double()
            result["attention_max_err"] = max(result["attention_max_err"], float((got - ref).abs().max()))
            result["attention_ref_max"] = max(result["attention_ref_max"], float(ref.abs().max()))
            result["decode_rows"] += 1
    return result
