"""Per-model calibrations: which compressed layers hold their kept prompt in the precision tier by default.

A model is recognised by its architecture (family, layers, width, heads, KV heads, vocabulary), so a
fine-tune of a calibrated model shares its entry. Each entry names the command that measured it; a model
without one gets no tier (``tier_share=0``) unless the caller gives one.
"""

from __future__ import annotations

# architecture -> compressed layers whose values keep 4 bits (tier_bits), by their cost at 2 bits
V4_LAYERS = {
    # SmolLM2-135M(-Instruct). `python evals/value_layers.py --model smollm2 --layers 30` (4 samples of the
    # shared-context suite, every token kept at K4 V4, one layer at a time at V2): the answers' NLL rises by
    # 0.046 (layer 18), 0.024 (7) and 0.015 (2); no other layer above 0.005 (evals/results/value_layers_smollm2.csv)
    ("llama", 30, 576, 9, 3, 49152): (2, 7, 18),
}


def fingerprint(text_config) -> tuple:
    """``(model_type, layers, hidden size, attention heads, KV heads, vocabulary)`` of a text config."""
    heads = text_config.num_attention_heads
    return (
        text_config.model_type,
        text_config.num_hidden_layers,
        text_config.hidden_size,
        heads,
        getattr(text_config, "num_key_value_heads", None) or heads,
        text_config.vocab_size,
    )


def tier_layers(text_config) -> tuple[int, ...]:
    """The calibrated tier layers of this model (ranks among its compressed layers), or ``()``."""
    return V4_LAYERS.get(fingerprint(text_config), ())
