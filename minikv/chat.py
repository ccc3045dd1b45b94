"""A chat on one cache: every turn extends the conversation's token ids and the same cache.

>>> chat = Conversation(minikv.patch(model), tokenizer)                     # doctest: +SKIP
>>> chat.ask("Here is a report: ... What is it about?")                     # doctest: +SKIP
>>> chat.ask("Which year does it start in?")  # only the new turn is prefilled  # doctest: +SKIP

Each turn after the first hands ``generate`` the whole conversation and the cache of the turns
before: transformers feeds only the tokens the cache has not seen, and a MiniKV cache compresses
them as a new turn (:meth:`minikv.cache.MiniKVLayer.update`). On an unpatched model the same code
runs with transformers' own cache.
"""

from __future__ import annotations

import torch

from .compat import cache_key


class Conversation:
    """Turns of a chat model's conversation, generated greedily on one cache.

    ``ids`` ``[1, n]``: the conversation's tokens so far; ``cache``: the cache that holds all but the
    last of them (``None`` before the first turn).
    """

    def __init__(self, model, tokenizer):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("Conversation needs a tokenizer with a chat template (a chat/instruct model)")
        self.model, self.tokenizer = model, tokenizer
        self.messages: list[dict] = []
        self.ids: torch.Tensor | None = None
        self.cache = None

    def _render(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _new_tokens(self, text: str) -> torch.Tensor:
        """The token ids that take the conversation from its last answer to the new user turn."""
        full = self._render([*self.messages, {"role": "user", "content": text}])
        if self.ids is None:
            return self.tokenizer(full, return_tensors="pt", add_special_tokens=False).input_ids
        answer = self.messages[-1]["content"]
        end = full.rfind(answer, 0, len(full) - len(text))
        if not answer or end < 0:
            raise ValueError("the chat template does not reproduce the last answer: cannot extend the conversation")
        return self.tokenizer(full[end + len(answer) :], return_tensors="pt", add_special_tokens=False).input_ids

    @torch.inference_mode()
    def ask(self, text: str, max_new_tokens: int = 64, **generate_kwargs) -> str:
        """Add a user turn, generate the answer on the conversation's cache and return its text."""
        new = self._new_tokens(text).to(self.model.device)
        ids = new if self.ids is None else torch.cat([self._without_end(self.ids), new], 1)
        kwargs = {} if self.cache is None else {cache_key(): self.cache}
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            **kwargs,
            **generate_kwargs,
        )
        self.ids, self.cache = out.sequences, getattr(out, cache_key())
        answer = self.tokenizer.decode(self.ids[0, ids.shape[1] :], skip_special_tokens=True).strip()
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def _without_end(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` less a final end-of-sequence token: the template closes the answer itself, and the
        cache has not seen the last token, so dropping it costs nothing."""
        eos = self.tokenizer.eos_token_id
        return ids[:, :-1] if eos is not None and int(ids[0, -1]) == eos else ids
