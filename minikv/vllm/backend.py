"""The vLLM attention backend: minikv's KIVI layout in vLLM's paged blocks (vLLM 0.32).

Write (``do_kv_cache_update``, before each layer's attention): values quantized per token at once,
keys kept in the block's residual until their group of G is complete, then quantized per channel
(:mod:`.paged`). Attention (``forward``): the batch is ordered decodes first; requests decoding one
token read their whole stored sequence from the pages in place (``minikv::paged_decode_attention``,
one launch for all of them); a request with several new tokens (prefill, a chunk, a later turn)
attends over its stored context, read from the pages by the same kernel
(``minikv::paged_attention``), and over its new tokens in full precision, as minikv's patched
prefill does. Declares ``state_content_bytes`` (the packed bytes per token slot) through ``customize_spec``,
so vLLM's scheduler fits more tokens in the same memory.

CUDA graphs: a batch of decodes only is capture-safe (``UNIFORM_SINGLE_TOKEN_DECODE``): the builder,
the write (:func:`.paged.write_decode`) and the decode read no device value on the host, pass the
runner's persistent ``seq_lens`` and block table through, and launch fixed grids; the kernel's split
partials live in a workspace the builder reserves for ``max_num_seqs`` before capture. Batches with a
prefill run eagerly (vLLM's piecewise graphs), reading host copies vLLM already holds.

Not done here, by design: token selection at prefill (vLLM's scheduler allocates a block for every
prompt token; evicting needs changes to vLLM's KV cache manager), sliding-window, ALiBi,
attention-sink and encoder layers, FP8 caches. Each is refused at engine start.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from ..rotation import hadamard
from . import paged
from .layout import PageLayout
from .settings import ENV, Settings, current


@functools.cache
def settings() -> Settings:
    found = current()
    if found is None:  # the plugin registers the backend only when the variable is set
        raise RuntimeError(f"the minikv vLLM backend was selected but {ENV} is not set")
    return found


def layout_for(head_size: int, block_size: int, dtype: torch.dtype) -> PageLayout:
    s = settings()
    return PageLayout(head_size, block_size, dtype, s.k_bits, s.v_bits, s.group_size, s.keys == "token")


class MiniKVAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        s = settings()
        return [MultipleOf(s.group_size if s.quantized and s.keys == "channel" else 16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple:
        return (KVCacheLayout.LBHNC,)  # each (block, KV head) page contiguous: the layout lives inside it

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Declare the packed bytes per (KV head, token slot): the scheduler sizes the cache with them."""
        if not settings().quantized or spec.state_content_bytes is not None:
            return spec
        return replace(spec, state_content_bytes=layout_for(spec.head_size, spec.block_size, spec.dtype).slot_bytes)

    @staticmethod
    def get_impl_cls() -> type[MiniKVAttentionImpl]:
        return MiniKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MiniKVMetadataBuilder]:
        return MiniKVMetadataBuilder


@dataclass
class MiniKVMetadata:
    num_decodes: int  # the first requests, one new token each (the batch is ordered decodes first)
    seq_lens: torch.Tensor  # [num_reqs] on the device: the runner's persistent buffers, passed through
    block_table: torch.Tensor
    # host copies for the requests with several new tokens (empty when the batch is decodes only)
    query_start: list[int]  # of requests num_decodes..num_reqs, and the end
    seq_lens_host: list[int]


class MiniKVMetadataBuilder(AttentionMetadataBuilder[MiniKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:  # the base's is abstract
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # decodes first: their rows and tokens are [0, num_decodes)
        self.quantized = settings().quantized
        if self.quantized and torch.device(device).type == "cuda":  # the kernel's split partials, before capture
            from ..kernels import triton_paged

            q_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
            triton_paged.reserve(
                vllm_config.scheduler_config.max_num_seqs,
                kv_cache_spec.num_kv_heads,
                q_heads,
                kv_cache_spec.head_size,
                device,
            )

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Decode-only batches are capture-safe when quantized (16 bits reads every request on the host)."""
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if settings().quantized else AttentionCGSupport.NEVER

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> MiniKVMetadata:
        m = common_attn_metadata
        num_decodes = split_decodes_and_prefills(m, decode_threshold=1)[0] if self.quantized else 0
        start, lens = [], []
        if num_decodes < m.num_reqs:  # eager: vLLM's host copies (exact for requests that prefill)
            start = m.query_start_loc_cpu[num_decodes : m.num_reqs + 1].tolist()
            upper = m.seq_lens_cpu_upper_bound
            lens = (upper if upper is not None else m.seq_lens.cpu())[num_decodes : m.num_reqs].tolist()
        return MiniKVMetadata(
            num_decodes=num_decodes,
            seq_lens=m.seq_lens[: m.num_reqs],
            block_table=m.block_table_tensor[: m.num_reqs],
            query_start=start,
            seq_lens_host=lens,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> MiniKVMetadata:
        meta = self.build(0, common_attn_metadata)
        meta.seq_lens.fill_(1)  # as vLLM's Triton backend: capture reads one token, not max_model_len
        return meta


class MiniKVAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes,
        sliding_window,
        kv_cache_dtype: str,
        logits_soft_cap=None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name=None,
        sinks=None,
    ) -> None:
        refused = {
            "attn_type": (attn_type != AttentionType.DECODER, f"{attn_type} (only decoder attention)"),
            "sliding_window": (sliding_window is not None, f"{sliding_window} (only full attention layers)"),
            "alibi_slopes": (alibi_slopes is not None, "set (ALiBi is not supported)"),
            "sinks": (sinks is not None, "set (learned attention sinks are not supported)"),
            "kv_cache_dtype": (kv_cache_dtype != "auto", f"{kv_cache_dtype!r} (only 'auto': minikv quantizes)"),
            "kv_sharing_target_layer_name": (
                kv_sharing_target_layer_name is not None,
                "set (no cross-layer KV sharing)",
            ),
        }
        for name, (bad, what) in refused.items():
            if bad:
                raise ValueError(f"{ENV}: the minikv backend cannot serve this model: {name}={what}")
        config = get_current_vllm_config()
        spec = getattr(config, "speculative_config", None)
        drafts = getattr(spec, "num_speculative_tokens", None) or 0
        if drafts:  # a rejected draft that completed a key group would leave the group's codes stale
            raise ValueError(
                f"{ENV}: the minikv backend does not support speculative decoding: "
                f"num_speculative_tokens={drafts} (valid: 0 or unset)"
            )
        self.settings = settings()
        block_size = config.cache_config.block_size
        self.settings.check_model(head_size, block_size)
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale, self.softcap = float(scale), float(logits_soft_cap or 0.0)
        self.kv_cache_dtype, self.attn_type = kv_cache_dtype, attn_type
        self.kv_sharing_target_layer_name = None
        self.sinks = None
        self._views: tuple | None = None  # (cache key, (layout, region views, rot_k, rot_v))

    def _setup(self, kv_cache: torch.Tensor):
        """The layout of this cache tensor and its region views, and the rotations on its device."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape))
        if self._views is None or self._views[0] != key:
            lay = layout_for(self.head_size, kv_cache.shape[2], kv_cache.dtype)
            R = hadamard(self.head_size, kv_cache.device)
            s = self.settings
            self._views = (
                key,
                (
                    lay,
                    lay.views(kv_cache),
                    R if s.rotate in ("k", "kv") else None,
                    R if s.rotate in ("v", "kv") else None,
                ),
            )
        return self._views[1]

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        lay, views, rot_k, rot_v = self._setup(kv_cache)
        n = slot_mapping.shape[0]
        meta = _metadata(layer)
        write = paged.write_decode if lay.quantized and meta is not None and not meta.query_start else paged.write
        write(views, lay, key[:n], value[:n], slot_mapping, rot_k, rot_v, self.settings.clip)

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the minikv backend does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output
        m: MiniKVMetadata = attn_metadata
        lay, views, rot_k, rot_v = self._setup(kv_cache)
        nd = m.num_decodes
        if nd:  # one new token each: every stored sequence read from its pages, one launch
            out = paged.decode(
                query[:nd], views, lay, m.block_table[:nd], m.seq_lens[:nd], self.scale, self.softcap, rot_k, rot_v
            )
            output[:nd].copy_(out)
        for r, (a, b) in enumerate(zip(m.query_start, m.query_start[1:])):
            if b > a:
                output[a:b] = self._extend(views, lay, m, r, query[a:b], key[a:b], value[a:b], rot_k, rot_v).to(
                    output.dtype
                )
        return output

    def _extend(self, views, lay, m: MiniKVMetadata, r: int, q, k_new, v_new, rot_k, rot_v):
        """Request ``num_decodes + r``'s new tokens over its stored context and themselves in full precision."""
        ctx = m.seq_lens_host[r] - q.shape[0]
        i = m.num_decodes + r
        if lay.quantized and ctx > 0:  # the context read from the pages in place, merged with the new tokens
            return paged.extend(
                q,
                k_new,
                v_new,
                views,
                lay,
                m.block_table[i : i + 1],
                m.seq_lens[i : i + 1],
                self.scale,
                self.softcap,
                rot_k,
                rot_v,
            )
        if lay.quantized:  # a first chunk: the new tokens only
            k_ctx = v_ctx = k_new[:0]
        else:
            blocks = m.block_table[i, : -(-ctx // lay.block_size)].long()
            k_ctx = views["k"][blocks].transpose(1, 2).flatten(0, 1)[:ctx]  # [ctx, H, D]
            v_ctx = views["v"][blocks].transpose(1, 2).flatten(0, 1)[:ctx]
        return paged.attend(q, k_ctx, v_ctx, k_new, v_new, self.scale, self.softcap)


def _metadata(layer) -> MiniKVMetadata | None:
    """This step's metadata of ``layer`` (the write is called without it), or None (profiling)."""
    found = get_forward_context().attn_metadata
    if isinstance(found, list):  # speculative decoding: the base model's
        found = found[0]
    return found.get(layer.layer_name) if isinstance(found, dict) else found
