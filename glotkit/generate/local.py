"""Batched greedy generation on a local model, with a stop at the first newline of the answer.

Prompts are sorted by length so each batch carries little padding (left padding, as decoder-only
generation needs), and the outputs are returned in the input order.  A sequence stops once its
generated text holds a newline after some non-blank text (a leading newline does not stop it:
base models often start their answer on a new line).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class _StopAtNewline:
    """Per-row stopping: True for rows whose new text has a newline after non-blank text."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tok = tokenizer
        self.width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        done = [("\n" in t.lstrip()) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: str = "cpu",
    stop_at_newline: bool = True,
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[list[int], list[str]], None] | None = None,
) -> list[str]:
    """Generate a continuation for each prompt (token ids); returns the decoded new text.

    ``on_batch(indices, texts)`` is called after each batch (for incremental writing).
    """
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            stopping = StoppingCriteriaList([_StopAtNewline(tokenizer, width)]) if stop_at_newline else None
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                stopping_criteria=stopping,
            )
            texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = t
            if on_batch:
                on_batch(idx, texts)
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return [t or "" for t in out]
