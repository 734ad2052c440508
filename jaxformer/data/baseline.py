"""The unigram baseline: the loss a model must beat to have learned anything beyond token counts."""

import numpy as np

from jaxformer.data.packing import TokenStream, num_rows


def unigram_cross_entropy(
    train_tokens: np.ndarray, eval_stream: TokenStream, seq_len: int, vocab_size: int
) -> float:
    """Cross-entropy (nats/token) of a unigram model fit on `train_tokens` [N] over `eval_stream`.

    Probabilities are add-one smoothed counts over the `vocab_size` tokens, so unseen tokens
    get a finite loss. The evaluated targets are exactly those with loss weight 1 in the
    evaluation rows: stream positions 1..R*T whose token is in the same document as the one
    before (rows overlap by one token, so their targets tile [1, R*T] without overlap).
    """
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())
    end = num_rows(len(eval_stream), seq_len) * seq_len + 1
    same_doc = eval_stream.doc_ids[1:end] == eval_stream.doc_ids[: end - 1]
    targets = eval_stream.tokens[1:end][same_doc]
    if targets.size == 0:
        return float("nan")
    return float(-log_probs[targets].mean())
