"""A three-turn chat on one cache with the real SmolLM2: the third question asks about the first
turn's document (``evals/chat.py`` measures the same conversation over seeds and configurations)."""

import pytest
import torch
from models import smollm2

import minikv
from minikv.chat import Conversation
from minikv.prompts import CHAT_TURNS, document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = smollm2()
    yield model, tokenizer
    if minikv.is_patched(model):
        minikv.unpatch(model)


def _talk(model, tok, doc, **knobs):
    """The answers and the token ids of the conversation, on one cache when ``knobs`` patch the model."""
    if knobs:
        minikv.patch(model, **knobs)
    try:
        chat = Conversation(model, tok)
        answers = [chat.ask(q.format(doc=doc), max_new_tokens=n) for q, n in CHAT_TURNS]
    finally:
        if knobs:
            minikv.unpatch(model)
    return answers, chat


def test_three_turns_on_one_cache(lm):
    model, tok = lm
    doc, key = document(tok, 1200, seed=0)
    full, full_chat = _talk(model, tok, doc)
    assert key in full[2]  # the question is answerable with the full cache
    same, same_chat = _talk(model, tok, doc, bits=16, budget=None)
    assert torch.equal(same_chat.ids, full_chat.ids)  # compression off: token-identical, turn after turn
    assert minikv.MiniKVCache is type(same_chat.cache)
    quant, quant_chat = _talk(model, tok, doc, bits=2, budget=None)  # K4 V2, every token kept
    assert key in quant[2], quant
    mem = quant_chat.cache.memory()
    assert mem.fp16_bytes and mem.ratio < 0.35
    assert int(quant_chat.cache.get_seq_length()) == quant_chat.ids.shape[1] - 1  # the last answer token is not fed
