"""Triton append + flush, bit-exact with ``reference.append_kv``.

One launch per new token, grid ``(B * Hkv,)``: program ``(b, h)`` writes the token into slot
``res_len[b]`` of its residual and, only where that fills the residual (``res_len + 1 == n_sink + R``,
a predicate on the device), quantizes the R tokens after the sinks with the quantizer of
``triton_quant`` (keys per channel, ``BD`` channels at a time; values per token, ``BR`` tokens at a
time) and writes codes, scales and minimums at token ``n_packed[b]`` of its store. The token just
written is taken from registers, not read back (other threads' stores need not be visible yet).
The per-sequence lengths are updated after the launch with two branch-free tensor ops: nothing
waits for the host, and a step that flushes nothing re-quantizes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import CLIP_GRID
from . import reference
from .quant import clip_table
from .triton_quant import pack_words, quantize_groups

CHUNK = 1024  # elements quantized at once (BD * R keys or BR * D values): no spills on sm_90 (aot_check)


@triton.jit
def _append_kernel(
    kn_ptr,
    vn_ptr,
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,
    npk_ptr,
    rk_ptr,
    rv_ptr,
    rl_ptr,
    sink_ptr,
    clip_ptr,
    Hkv,
    C,
    SR,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BR: tl.constexpr,
    N_CLIP: tl.constexpr,
):
    KPW: tl.constexpr = 32 // K_BITS
    VPW: tl.constexpr = 32 // V_BITS
    pid = tl.program_id(0)
    b = pid // Hkv
    n_packed = tl.load(npk_ptr + pid)  # [B, Hkv]: this KV head's packed tokens
    res_len = tl.load(rl_ptr + b)
    n_sink = tl.load(sink_ptr + b)
    slot = tl.minimum(res_len, SR - 1)
    d = tl.arange(0, D)
    rk_base = rk_ptr + pid * SR * D
    rv_base = rv_ptr + pid * SR * D
    tl.store(rk_base + slot * D + d, tl.load(kn_ptr + pid * D + d))  # new tokens: in the residual's dtype
    tl.store(rv_base + slot * D + d, tl.load(vn_ptr + pid * D + d))
    if res_len + 1 == n_sink + R:  # this token fills the residual: flush its R tokens
        t = n_sink + tl.arange(0, R)  # residual slots, in time order
        # keys [BD, R]: per channel, groups of G tokens -> codes [B, Hkv, D, C / KPW], meta [.., D, C / G]
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            x = tl.load(rk_base + t[None, :] * D + dd[:, None]).to(tl.float32)
            new = tl.load(kn_ptr + pid * D + dd).to(tl.float32)
            x = tl.where(t[None, :] == slot, new[:, None], x)
            q, scale, mn = quantize_groups(tl.reshape(x, [BD * R // G, G]), clip_ptr, K_BITS, G, N_CLIP)
            w = tl.arange(0, BD * R // KPW)
            tl.store(
                kc_ptr + (pid * D + d0 + w // (R // KPW)) * (C // KPW) + n_packed // KPW + w % (R // KPW),
                pack_words(q, BD * R, K_BITS),
            )
            gi = tl.arange(0, BD * R // G)
            meta = (pid * D + d0 + gi // (R // G)) * (C // G) + n_packed // G + gi % (R // G)
            tl.store(ks_ptr + meta, scale)
            tl.store(km_ptr + meta, mn)
        # values [BR, D]: per token, groups of G channels -> codes [B, Hkv, C, D / VPW], meta [.., C, D / G]
        new_v = tl.load(vn_ptr + pid * D + d).to(tl.float32)
        for r0 in range(0, R, BR):
            tt = n_sink + r0 + tl.arange(0, BR)
            x = tl.load(rv_base + tt[:, None] * D + d[None, :]).to(tl.float32)
            x = tl.where(tt[:, None] == slot, new_v[None, :], x)
            q, scale, mn = quantize_groups(tl.reshape(x, [BR * D // G, G]), clip_ptr, V_BITS, G, N_CLIP)
            w = tl.arange(0, BR * D // VPW)
            tok = pid * C + n_packed + r0 + w // (D // VPW)
            tl.store(vc_ptr + tok * (D // VPW) + w % (D // VPW), pack_words(q, BR * D, V_BITS))
            gi = tl.arange(0, BR * D // G)
            meta = (pid * C + n_packed + r0 + gi // (D // G)) * (D // G) + gi % (D // G)
            tl.store(vs_ptr + meta, scale)
            tl.store(vm_ptr + meta, mn)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def append_kv(
    k_new,
    v_new,
    k_codes,
    k_scale,
    k_mn,
    v_codes,
    v_scale,
    v_mn,
    n_packed,
    res_k,
    res_v,
    res_len,
    n_sink,
    k_bits: int,
    v_bits: int,
    group_size: int,
    residual_length: int,
    clip: bool = False,
) -> None:
    """Triton launcher of ``minikv::append_kv`` (same contract as the reference, in place)."""
    B, Hkv, Lq, D = k_new.shape
    R, G = residual_length, group_size
    if not (_power_of_two(D) and _power_of_two(R)) or B * Hkv == 0:  # tile shapes are powers of two
        return reference.append_kv(
            k_new,
            v_new,
            k_codes,
            k_scale,
            k_mn,
            v_codes,
            v_scale,
            v_mn,
            n_packed,
            res_k,
            res_v,
            res_len,
            n_sink,
            k_bits,
            v_bits,
            G,
            R,
            clip,
        )
    C, SR = v_codes.shape[2], res_k.shape[2]
    bd, br = max(1, min(D, CHUNK // R)), max(1, min(R, CHUNK // D))
    table = clip_table(k_new.device)
    n_clip = len(CLIP_GRID) if clip else 1
    for i in range(Lq):  # one launch per token: a flush sees every earlier token of the step
        # rounded to the residual's dtype here, as the reference does (the interpreter's in-kernel
        # fp32 -> bf16 cast truncates)
        kn = k_new[:, :, i].to(res_k.dtype).contiguous()
        vn = v_new[:, :, i].to(res_v.dtype).contiguous()
        with torch.device(k_new.device):
            # no FMA contraction: the codes must follow the reference's fp32 roundings exactly
            _append_kernel[(B * Hkv,)](
                kn,
                vn,
                k_codes,
                k_scale,
                k_mn,
                v_codes,
                v_scale,
                v_mn,
                n_packed,
                res_k,
                res_v,
                res_len,
                n_sink,
                table,
                Hkv,
                C,
                SR,
                K_BITS=k_bits,
                V_BITS=v_bits,
                G=G,
                R=R,
                D=D,
                BD=bd,
                BR=br,
                N_CLIP=n_clip,
                enable_fp_fusion=False,
            )
        filled = res_len + 1
        full = filled == n_sink + R
        n_packed.add_(full[:, None].to(n_packed.dtype) * R)
        res_len.copy_(torch.where(full, n_sink, filled))
