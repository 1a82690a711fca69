"""Held-out perplexity and bits-per-byte of a causal LM on packed documents.

Perplexity depends on the tokenizer; bits-per-byte (total negative log-likelihood in bits divided
by the UTF-8 bytes of the text scored) does not, so it compares models with different
vocabularies.  Rows are those of :func:`glotkit.data.corpus.pack_documents`: attention never
crosses a document.  The bytes are those of the documents scored; the one token per block
boundary that has no target in its row is not scored (a small under-count of the bits, the same
for every model with the same tokenizer and block size).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from glotkit.data.prompts import IGNORE


@torch.no_grad()
def heldout_scores(model, rows: Sequence, n_bytes: int, pad_id: int, batch_tokens: int = 2048,
                   progress: bool = True, desc: str = "held-out", per_row: bool = False) -> dict:
    """Loss per supervised token, perplexity and bits per byte of ``rows``; with ``per_row`` each
    row is its own pass and ``row_nll`` / ``row_tokens`` give each row's summed loss and
    supervised tokens (for an interval over rows)."""
    from tqdm.auto import tqdm

    from glotkit.models.lm import SupervisedLoss, split_by_tokens

    loss_fn = SupervisedLoss(model)
    was_training = model.training
    model.eval()
    nll = 0.0
    n = 0
    lengths = [len(r.input_ids) for r in rows]
    chunks = [[i] for i in range(len(rows))] if per_row else \
        split_by_tokens(list(range(len(rows))), lengths, batch_tokens)
    row_nll, row_tokens = [], []
    try:
        for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            batch = loss_fn.collate([rows[i] for i in chunk], pad_id)
            loss, k = loss_fn(batch)
            nll += loss.item()
            n += k
            row_nll.append(loss.item())
            row_tokens.append(int(k))
    finally:
        model.train(was_training)
    per_token = nll / max(n, 1)
    return {
        "nll_per_token": round(per_token, 5),
        "perplexity": round(math.exp(per_token), 4),
        "bits_per_byte": round(nll / math.log(2) / max(n_bytes, 1), 5),
        "tokens": n,
        "bytes": n_bytes,
    } | ({"row_nll": row_nll, "row_tokens": row_tokens} if per_row else {})


def count_target_tokens(rows: Sequence) -> int:
    return sum(sum(1 for t in r.targets if t != IGNORE) for r in rows)


def _rates(row_nll: Sequence[float], row_tokens: Sequence[int], row_bytes: Sequence[float]):
    import numpy as np

    nll, toks, nbytes = (np.asarray(x, dtype=float) for x in (row_nll, row_tokens, row_bytes))

    def stat(idx):
        total = nll[idx].sum()
        return {"bits_per_byte": total / math.log(2) / nbytes[idx].sum(), "nll_per_token": total / toks[idx].sum()}

    return stat


def with_intervals(scores: dict, row_bytes: Sequence[float], seed: int = 0) -> dict:
    """``scores`` of :func:`heldout_scores` (``per_row=True``) with 95 % bootstrap intervals of bits
    per byte, loss per token and perplexity over the held-out rows (each row's share of the bytes
    in ``row_bytes``); the per-row values stay in the result (``rows``) for a paired comparison."""
    from glotkit.eval.uncertainty import method, statistic_intervals

    rows = {"nll": scores.pop("row_nll"), "tokens": scores.pop("row_tokens"), "bytes": list(row_bytes)}
    ci = statistic_intervals(_rates(rows["nll"], rows["tokens"], rows["bytes"]), len(rows["nll"]), seed=seed)
    out = dict(scores) | {"ci_method": method("held-out rows", seed=seed)}
    if ci:
        out["bits_per_byte_ci"] = [round(x, 5) for x in ci["bits_per_byte"]]
        out["nll_per_token_ci"] = [round(x, 5) for x in ci["nll_per_token"]]
        out["perplexity_ci"] = [round(math.exp(x), 4) for x in ci["nll_per_token"]]
    return out | {"rows": rows}


def paired_change(a: dict, b: dict, seed: int = 0) -> dict:
    """b − a of bits per byte and loss per token on the same held-out rows, the paired bootstrap
    interval and whether it excludes zero (empty when the rows differ)."""
    from glotkit.eval.uncertainty import paired_statistic

    ra, rb = a.get("rows"), b.get("rows")
    if not ra or not rb or ra["tokens"] != rb["tokens"]:
        return {}
    return paired_statistic(_rates(ra["nll"], ra["tokens"], ra["bytes"]), _rates(rb["nll"], rb["tokens"], rb["bytes"]),
                            len(ra["nll"]), seed=seed)

