"""The LM pieces shared by training and evaluation: rows (one example, or several sharing a
prompt prefix, or packed documents), their collation into tensors, and the supervised loss.

The loss applies the LM head only at the positions that carry a label: for a 262k-vocabulary
model the full logits (vocab × every token) cost more than the whole transformer body, so the
body runs once and the head runs on the supervised positions, a chunk at a time.  It gives the
same loss as the model's own logits (a test checks it against :func:`reference_loss_sum`).
Training (:mod:`glotkit.train.engine`) and evaluation (held-out perplexity, option
log-likelihoods) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from glotkit.data.prompts import IGNORE, Encoded
from glotkit.logs import say

HEAD_CHUNK = 512  # supervised positions per LM-head chunk (bounds the vocabulary-wide logits in memory)
PREFIX_KEY = 16  # examples whose first 16 prompt tokens agree are candidates for a shared prefix


# --------------------------------------------------------------------------- batching


@dataclass
class Row:
    """One row of a forward pass: one example, or several sharing a prompt prefix.

    ``targets[t]`` is the token position ``t`` must predict (``IGNORE`` where there is no loss);
    ``segments`` is 0 on a shared prefix and 1..k on the examples' own tokens.
    """

    input_ids: list[int]
    position_ids: list[int]
    segments: list[int]
    targets: list[int]
    n_examples: int
    n_tokens: int  # tokens of the examples as written (a shared prefix counted once per example)
    # optional second level: a token also sees the tokens of segment ``parents[t]`` (option scoring:
    # each option sees its own prompt's part, which sees the prefix several prompts share)
    parents: list[int] | None = None


def _targets(e: Encoded) -> list[int]:
    return list(e.labels[1:]) + [IGNORE]


def _first_label(e: Encoded) -> int:
    return next((i for i, y in enumerate(e.labels) if y != IGNORE), len(e.labels))


def _plain_row(e: Encoded) -> Row:
    n = len(e.input_ids)
    return Row(list(e.input_ids), list(range(n)), [1] * n, _targets(e), 1, n)


def group_key(e: Encoded):
    """Which examples may share a prefix: the data's own group (the context) or the first tokens."""
    return e.group if e.group is not None else tuple(e.input_ids[:PREFIX_KEY])


def build_rows(examples: Sequence[Encoded], share_prefix: bool = False, min_prefix: int = 16,
               min_share: float = 0.25, max_row: int | None = None) -> list[Row]:
    """Rows for one forward pass.  With ``share_prefix``, examples whose prompts start with the same
    tokens (SQuAD-style data: several questions about one context) become one row: the common
    prefix once, then each example's remaining tokens, each attending to the prefix and to itself
    only, at the positions it would have alone.  Loss and gradients are those of the separate
    examples; the prefix is computed once instead of once per question.

    A group shares only when its common prefix is at least ``min_prefix`` tokens and
    ``min_share`` of its mean length (a short common system prompt is not worth a packed row);
    rows are kept under ``max_row`` tokens by packing a large group into several rows.
    """
    if any(isinstance(e, Row) for e in examples):  # already packed (pretraining)
        return [e if isinstance(e, Row) else _plain_row(e) for e in examples]
    if not share_prefix:
        return [_plain_row(e) for e in examples]
    groups: dict[tuple[int, ...], list[Encoded]] = {}
    for e in examples:
        groups.setdefault(group_key(e), []).append(e)
    rows = []
    for group in groups.values():
        if len(group) == 1:
            rows.append(_plain_row(group[0]))
            continue
        lcp = min(len(e.input_ids) for e in group)
        first = group[0].input_ids
        for e in group[1:]:
            lcp = common_prefix(first, e.input_ids, lcp)
        # the prefix must end before any supervised position: its last token predicts a prompt token
        lp = min(lcp, min(_first_label(e) for e in group) - 1)
        mean_len = sum(len(e.input_ids) for e in group) / len(group)
        if lp < max(min_prefix, min_share * mean_len):
            rows.extend(_plain_row(e) for e in group)
            continue
        parts: list[list[Encoded]] = [[]]
        size = lp
        for e in group:
            extra = len(e.input_ids) - lp
            if parts[-1] and max_row and size + extra > max_row:
                parts.append([])
                size = lp
            parts[-1].append(e)
            size += extra
        for part in parts:
            if len(part) == 1:
                rows.append(_plain_row(part[0]))
                continue
            ids, pos, seg, tg = list(first[:lp]), list(range(lp)), [0] * lp, [IGNORE] * lp
            for k, e in enumerate(part, 1):
                n = len(e.input_ids)
                ids += e.input_ids[lp:]
                pos += range(lp, n)
                seg += [k] * (n - lp)
                tg += _targets(e)[lp:]
            rows.append(Row(ids, pos, seg, tg, len(part), sum(len(e.input_ids) for e in part)))
    return rows


def collate_rows(rows: Sequence[Row], pad_id: int, device: str | torch.device = "cpu",
                 mask_types: Sequence[str] | None = None, sliding_window: int | None = None) -> dict:
    """Right-pad rows into tensors.  Rows of one example use an ordinary padding mask; rows with a
    shared prefix get a 4-D boolean mask (a dict of them per attention type when the model has
    sliding-window layers)."""
    width = max(len(r.input_ids) for r in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    seg = torch.full((b, width), -1, dtype=torch.long)
    par = torch.full((b, width), -2, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        targets[i, :n] = torch.tensor(r.targets)
        mask[i, :n] = 1
        pos[i, :n] = torch.tensor(r.position_ids)
        seg[i, :n] = torch.tensor(r.segments)
        if r.parents is not None:
            par[i, :n] = torch.tensor(r.parents)
    out = {"input_ids": ids.to(device), "targets": targets.to(device), "n_tokens": sum(r.n_tokens for r in rows),
           "n_compute": sum(len(r.input_ids) for r in rows)}
    if all(r.n_examples == 1 for r in rows):
        out["attention_mask"] = mask.to(device)
        return out
    sq, sk = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = ((sq == sk) | (sk == 0) | (par[:, :, None] == sk)) & (sk >= 0) & causal
    allowed |= torch.eye(width, dtype=torch.bool)  # padding queries see themselves: no empty rows
    full = allowed[:, None].to(device)
    if mask_types:
        masks = {t: full for t in mask_types}
        if sliding_window and "sliding_attention" in masks:
            near = (pos[:, :, None] - pos[:, None, :]) < sliding_window
            masks["sliding_attention"] = ((allowed & near) | torch.eye(width, dtype=torch.bool))[:, None].to(device)
        out["attention_mask"] = masks
    else:
        out["attention_mask"] = full
    out["position_ids"] = pos.to(device)
    return out


def collate(examples: Sequence[Encoded], pad_id: int, device: str | torch.device = "cpu") -> dict:
    """Right-pad a micro-batch, one example per row; ``labels`` (for reference computations) are
    ``IGNORE`` on the prompt and on padding, ``targets`` are the labels shifted by one."""
    out = collate_rows(build_rows(examples), pad_id, device)
    labels = torch.full_like(out["input_ids"], IGNORE)
    for i, e in enumerate(examples):
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    out["labels"] = labels.to(device)
    return out


def split_by_tokens(batch: list[int], lengths: Sequence[int], budget: int | None) -> list[list[int]]:
    """Cut a micro-batch into forward passes of at most ``budget`` padded tokens (rows × longest).

    A single example longer than the budget gets a pass of its own.
    """
    if not budget:
        return [batch]
    order = sorted(batch, key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = max([lengths[j] for j in cur] + [lengths[i]])
        if cur and width * (len(cur) + 1) > budget:
            chunks.append(cur)
            cur = []
        cur.append(i)
    chunks.append(cur)
    return chunks


# --------------------------------------------------------------------------- the loss


def causal_parts(model):
    """(decoder body, LM head, logit softcap) of a causal LM, looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    return base, body, head, cap


def reference_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Plain computation: full logits from the model, cross-entropy over the labelled positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    keep = labels != IGNORE
    loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


class SupervisedLoss:
    """Sum of cross-entropy over the supervised tokens, with the LM head only where it is needed.

    On construction nothing is checked; call :meth:`self_check` once with a real batch: if the
    fast path disagrees with the model's own logits (an architecture with an unusual output
    layer), the engine falls back to full logits and says so.
    """

    def __init__(self, model):
        self.model = model
        self.base, self.body, self.head, self.cap = causal_parts(model)
        self.fast = self.body is not None and self.head is not None
        config = self.base.config
        layer_types = getattr(config, "layer_types", None)
        self.mask_types = sorted(set(layer_types)) if layer_types else None
        self.sliding_window = getattr(config, "sliding_window", None)
        self.device = next(model.parameters()).device

    def collate(self, rows: Sequence[Row], pad_id: int) -> dict:
        return collate_rows(rows, pad_id, self.device, self.mask_types, self.sliding_window)

    @torch.no_grad()
    def check_sharing(self, examples: Sequence[Encoded], pad_id: int, log: Callable[[str], None] = say) -> bool:
        """True when shared-prefix rows give this model the same loss as separate examples."""
        if not self.fast:
            return False
        by_key: dict = {}
        for e in examples:
            by_key.setdefault(group_key(e), []).append(e)
        for row_key, group in by_key.items():
            rows = build_rows(group, share_prefix=True)
            if len(rows) == 1 and rows[0].n_examples > 1:
                row = rows[0]
                break
        else:
            return True  # nothing to compare on yet; rows are built the same way throughout
        members = [e for e in examples if group_key(e) == row_key]
        was_training = self.model.training
        self.model.eval()
        try:
            packed, n1 = self(self.collate([row], pad_id))
            alone, n2 = self(self.collate(build_rows(members), pad_id))
        except Exception as err:  # an architecture that does not take custom masks
            log(f"note: shared-prefix packing unavailable for this model ({type(err).__name__}); "
                "each example is computed separately")
            return False
        finally:
            self.model.train(was_training)
        if n1 != n2 or not torch.allclose(packed / n1, alone / n2, rtol=1e-4, atol=1e-4):
            log(f"note: shared-prefix packing disagrees for this model ({(packed / n1).item():.5f} vs "
                f"{(alone / n2).item():.5f}); each example is computed separately")
            return False
        return True

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if not self.fast:
            if "position_ids" in batch:
                raise RuntimeError("shared-prefix rows need the fast loss path")
            return reference_loss_sum(self.model, batch)
        kwargs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
        hidden = self.body(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **kwargs
        ).last_hidden_state
        targets = batch["targets"]
        keep = targets != IGNORE
        h, t = hidden[keep], targets[keep]
        n = int(t.numel())
        if n <= HEAD_CHUNK:
            return self._head_loss(h, t), n
        # many supervised positions (pretraining): the vocabulary-wide logits are made a chunk at a
        # time and, when training, recomputed in the backward pass instead of kept in memory
        from torch.utils.checkpoint import checkpoint

        loss = h.new_zeros((), dtype=torch.float32)
        for i in range(0, n, HEAD_CHUNK):
            hc, tc = h[i : i + HEAD_CHUNK], t[i : i + HEAD_CHUNK]
            if torch.is_grad_enabled():
                loss = loss + checkpoint(self._head_loss, hc, tc, use_reentrant=False)
            else:
                loss = loss + self._head_loss(hc, tc)
        return loss, n

    def _head_loss(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return F.cross_entropy(logits.float(), t, reduction="sum")

    @torch.no_grad()
    def self_check(self, example: Encoded, log: Callable[[str], None] = say, max_tokens: int = 48) -> None:
        """Compare the fast path with the model's own logits on a short slice of one example
        (every position labelled, so that the full logits stay small in memory)."""
        if not self.fast:
            return
        device = next(self.model.parameters()).device
        ids = torch.tensor([example.input_ids[:max_tokens]], device=device)
        labels = ids.clone()
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], dim=1)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "targets": targets}
        was_training = self.model.training
        self.model.eval()
        try:
            fast, n = self(batch)
            ref, _ = reference_loss_sum(self.model, batch)
        finally:
            self.model.train(was_training)
        if n and not torch.allclose(fast / n, ref / n, rtol=1e-4, atol=1e-4):
            self.fast = False
            log(
                f"note: answer-only LM head disagrees with this model's logits "
                f"({(fast / n).item():.5f} vs {(ref / n).item():.5f}); using full logits (slower)"
            )


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``."""
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


def prefix_groups(prompts: Sequence[Sequence[int]], min_prefix: int,
                  min_share: float = 0.0) -> list[tuple[int, list[int]]]:
    """Prompts that begin alike, as (shared length, indices): neighbours in token order sharing at
    least ``min_prefix`` leading tokens and ``min_share`` of their length (each prompt keeps at
    least its last token out of the shared part); a neighbour that would halve the group's shared
    part starts a group of its own.  Used by generation (a prefix's cache computed once) and by
    option scoring (a prefix once per row)."""
    if not prompts:
        return []
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    groups: list[tuple[int, list[int]]] = []
    members, plen = [order[0]], len(prompts[order[0]]) - 1
    for i in order[1:]:
        c = common_prefix(prompts[members[0]], prompts[i], min(plen, len(prompts[i]) - 1))
        if c >= max(min_prefix, min_share * len(prompts[i])) and (len(members) == 1 or 2 * c >= plen):
            members.append(i)
            plen = c
        else:
            groups.append((plen, members))
            members, plen = [i], len(prompts[i]) - 1
    groups.append((plen, members))
    return groups


OPTION_ROW_TOKENS = 1024  # option scoring: prompts sharing a prefix fill one row up to this many tokens
OPTION_PASS_TOKENS = 2048  # option scoring: padded tokens of one forward pass (a longer row goes alone)


def _shared_length(prompts: Sequence[list[int]]) -> int:
    """The prefix the prompts of one option row share (every prompt keeps a token of its own)."""
    if len(prompts) < 2:
        return 0
    lp = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        lp = common_prefix(prompts[0], p, lp)
    return lp


def _option_row_length(prompts: Sequence[list[int]], options: Sequence[list[int]]) -> int:
    lp = _shared_length(prompts)
    return lp + sum(len(p) - lp for p in prompts) + len(prompts) * sum(map(len, options))


def _option_row(prompts: Sequence[list[int]], options: Sequence[list[int]], common: int):
    """One row for option scoring: the prompts' common prefix once (segment 0), then each prompt's
    own tokens (a segment) followed by every option (a segment each, whose parent is that prompt's
    segment), at the positions each would have alone.  Returns the row and, per prompt, (positions
    predicting the ``common`` head tokens at the prompt's end, positions predicting each option)."""
    lp = _shared_length(prompts)
    ids, pos, seg, par = list(prompts[0][:lp]), list(range(lp)), [0] * lp, [-1] * lp
    places, nxt = [], 1
    for p in prompts:
        own, begin = nxt, len(ids)
        nxt += 1
        ids += p[lp:]
        pos += range(lp, len(p))
        seg += [own] * (len(p) - lp)
        par += [-1] * (len(p) - lp)

        def at(t: int) -> int:  # the row index of the prompt's token t
            return t if t < lp else begin + t - lp

        shared_at = [at(t) for t in range(len(p) - common - 1, len(p) - 1)]
        option_at = []
        for o in options:
            start = len(ids)
            ids += o
            pos += range(len(p), len(p) + len(o))
            seg += [nxt] * len(o)
            par += [own] * len(o)
            nxt += 1
            # token 0 is predicted from the prompt's last position, token t from the option's t-1
            option_at.append([at(len(p) - 1)] + [start + t - 1 for t in range(1, len(o))])
        places.append((shared_at, option_at))
    n_tokens = sum(len(p) + len(o) for p in prompts for o in options)
    return Row(ids, pos, seg, [IGNORE] * len(ids), len(prompts) * len(options), n_tokens, par), places


@torch.no_grad()
def option_logliks(model, tokenizer, prompts: Sequence[list[int]], options: Sequence[list[int]],
                   batch_size: int, device: str = "cpu", share_prompt: bool = True) -> list[list[float]]:
    """Sum of log-probabilities of each option's tokens after each prompt.

    With ``share_prompt`` (the default where the model takes 4-D masks) one row holds the prompt
    once and every option after it, each option attending to the prompt and to itself only, with
    its positions continuing the prompt's: the prompt is computed once instead of once per option
    (the engine's shared-prefix rows; equal to separate sequences, tested).  Prompts that begin
    alike (a task's instruction, a HIPE prompt's definitions, the same demonstrations) share one
    row: their common prefix once, then each prompt's own tokens and its options, which see that
    prompt only (a prefix of at least 16 tokens and a quarter of the prompt; rows up to
    ``OPTION_ROW_TOKENS``, passes up to ``OPTION_PASS_TOKENS`` padded tokens whatever
    ``batch_size``, so that the scores do not depend on it).  Rows are right-padded
    so every sequence sits at the same positions whatever its batch.  Tokens that begin every
    option alike (``{"at": "`` in a JSON answer) are scored once per prompt, not once per option."""
    import torch.nn.functional as F

    common = 0  # the options' shared first tokens (each option keeps at least one of its own)
    while len(options) > 1 and all(len(o) > common + 1 for o in options) and len({o[common] for o in options}) == 1:
        common += 1
    head = list(options[0][:common])
    options = [list(o[common:]) for o in options]
    loss_fn = SupervisedLoss(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [[0.0] * len(options) for _ in prompts]
    model.eval()

    def option_scores(hidden_row, where: list[int], option: list[int]) -> float:
        logits = loss_fn.head(hidden_row[where])
        if loss_fn.cap:
            logits = torch.tanh(logits / loss_fn.cap) * loss_fn.cap
        logp = F.log_softmax(logits.float(), -1)
        tgt = torch.tensor(option, device=logp.device)
        return float(logp.gather(1, tgt[:, None]).sum())

    if share_prompt and loss_fn.fast:
        full = [list(p) + head for p in prompts]
        # rows and passes depend on the prompts only, not on batch_size: the same scores whatever it is
        cap, budget = OPTION_ROW_TOKENS, OPTION_PASS_TOKENS
        rows: list[tuple[Row, list]] = []
        for _, members in prefix_groups(full, PREFIX_KEY, min_share=0.25):
            while members:  # a group too large for one row goes into several
                take = 1
                while take < len(members) and _option_row_length([full[i] for i in members[: take + 1]], options) <= cap:
                    take += 1
                row, places = _option_row([full[i] for i in members[:take]], options, common)
                rows.append((row, list(zip(members[:take], places))))
                members = members[take:]
        rows.sort(key=lambda item: -len(item[0].input_ids))  # rows of like length pass together: little padding
        passes: list[list[tuple[Row, list]]] = [[]]
        for item in rows:  # a pass holds at most `budget` padded tokens
            if passes[-1] and (len(passes[-1]) + 1) * len(passes[-1][0][0].input_ids) > budget:
                passes.append([])
            passes[-1].append(item)
        for part in passes:
            batch = loss_fn.collate([r for r, _ in part], pad)
            hidden = loss_fn.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], use_cache=False).last_hidden_state
            for r, (_, members) in enumerate(part):
                for i, (shared_at, option_at) in members:
                    shared = option_scores(hidden[r], shared_at, head) if common else 0.0
                    for j, o in enumerate(options):
                        scores[i][j] = shared + option_scores(hidden[r], option_at[j], o)
        return scores

    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(options))]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [list(prompts[i]) + head + options[j] for i, j in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        # the vocabulary-wide logits only where an option token is predicted (a long few-shot
        # prompt would otherwise need positions × vocabulary floats)
        hidden = loss_fn.body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for r, (i, j) in enumerate(chunk):
            p, o = len(prompts[i]), common + len(options[j])
            scores[i][j] = option_scores(hidden[r], list(range(p - 1, p - 1 + o)), head + options[j])
    return scores
