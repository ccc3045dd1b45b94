"""The reconstruction pass's maxima merged with SnapKV's observation window (``scorer="kvzip_window"``).

A prompt that ends with a question tells SnapKV's window what matters to that question; the
reconstruction pass (:mod:`.reconstruction`) tells what matters to any question. This scorer keeps a
token if either does: its score is the larger of the pass's maximum (a probability) and the window's
attention to it (SnapKV's pooled column sums over the last ``snap_window`` queries, averaged over the
query heads of the KV head, summed over the window's queries). Summed, a token that several question
tokens attend outranks any single re-read maximum, while the diffuse attention of a window to most of
a document stays below the pass's scores. (Averaged over the window's queries too, the window never
won: Gemma 3's judge 64.9% of full, as ``kvzip``'s 64.2%, at commit 65692b1.) A prompt without a
question (a document compressed before any is asked) gets the window of its own last tokens.
"""

from . import snapkv

NEEDS_ATTENTION = True  # the prompt's attention gives the window's scores...
NEEDS_PASS = True  # ...and the pass gives the rest, folded in by max

query_weights = snapkv.query_weights


def seed(scores, group: int, cfg):
    """The window's scores ``[B, Hkv, T]`` as the pass's starting point: SnapKV's pooled column sums over
    the window's queries, averaged over the ``group`` query heads of each KV head."""
    return snapkv.finish(scores, cfg) / group


def finish(scores, cfg):
    """The merged scores as they are (the window's were pooled before the pass)."""
    return scores
