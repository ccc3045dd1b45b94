"""Run under ``torchrun --nproc-per-node N`` by ``tests/test_tensor_parallel.py``: load a saved tiny
model with ``tp_plan="auto"`` (gloo on CPU), generate greedily with or without minikv, and have rank 0
write the tokens and the KV heads each rank's cache layers hold as JSON."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import minikv
from minikv.compat import cache_key

NEW = 24


def prompt():
    ids = torch.randint(1, 320, (2, 90), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    return ids, mask


def generate(model, knobs: dict | None):
    """Greedy tokens and, with minikv, the KV heads of every compressed cache layer."""
    ids, mask = prompt()
    if knobs is None:
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0), []
    minikv.patch(model, **knobs)
    try:
        cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=NEW)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **{cache_key(): cache}
        )
        return out, [layer.num_heads for layer in cache.layers]
    finally:
        minikv.unpatch(model)


def main(model_dir: str, out: str, knobs: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float64).eval()
    tokens, heads = generate(model, json.loads(knobs))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, heads)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(dict(tokens=tokens.tolist(), heads_per_rank=every), f)
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads torn down before exit: left running they can abort it


if __name__ == "__main__":
    main(*sys.argv[1:])
