"""KVzip-style reconstruction scores: question-agnostic, computed by one more pass over the prompt.

After the prompt (or a new turn) is attended, its tokens are fed again, right after it, in chunks of
``reconstruct_chunk`` (:mod:`minikv.reconstruct`): a model re-reading a context copies it, and the
token each copying query attends to is the one that must stay. The score of a prompt token is the
most attention any re-read query of its KV head's query group gives it (Kim et al., 2025, "KVzip").
No question is involved, so a second question about the same context finds what it needs. The
attention itself is ``minikv::reconstruct_attention``; this module only names the scorer.
"""

NEEDS_ATTENTION = False  # the prompt's own attention gives nothing to this score
NEEDS_PASS = True  # scored by the reconstruction pass, after the whole model has read the prompt


def finish(scores, cfg):
    """The pass's maxima as they are. Pooled as SnapKV's (keeping a token's neighbours with it), they
    kept less on the shared-context suite (SmolLM2, 50% kept: 0.412 unpooled, 0.355 with a 3-token max
    pool; ``evals/shared_context.py``), so ``pool`` / ``pool_kernel`` do not apply to this scorer."""
    return scores
