"""What a minikv cache layer's ``update`` returns in place of dense K/V."""

from __future__ import annotations


class MiniKVView:
    """The layer (whose ``attend`` computes the attention), plus the new K/V when the attention needs
    them: the prompt, or with ``turn`` the tokens that extend a cache already holding some (a new
    turn or a prefill chunk). A decode step's view holds the layer only: its tokens are stored."""

    def __init__(self, layer, key=None, value=None, turn: bool = False):
        self.layer, self.key, self.value, self.turn = layer, key, value, turn
