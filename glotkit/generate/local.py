"""Batched greedy generation on a local model, with stop strings (by default the first newline).

Prompts are sorted by length so each batch carries little padding (left padding, as decoder-only
generation needs), and the outputs are returned in the input order.  A sequence stops once its
generated text holds a stop string after some non-blank text (a leading newline does not stop it:
base models often start their answer on a new line); the text is cut before the stop string.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch


def cut_at_stop(text: str, stop: Sequence[str], keep: bool = False) -> str | None:
    """``text`` up to the first stop string found after its leading blanks (with it when
    ``keep``), or None if none is."""
    body = text.lstrip()
    lead = len(text) - len(body)
    hits = [(i, i + len(s)) for i, s in ((body.find(s), s) for s in stop) if i >= 0]
    if not hits:
        return None
    start, end = min(hits)
    return text[: lead + (end if keep else start)]


class _StopStrings:
    """Per-row stopping: True for rows whose new text holds a stop string after non-blank text."""

    def __init__(self, tokenizer, prompt_width: int, stop: Sequence[str]):
        self.tok = tokenizer
        self.width = prompt_width
        self.stop = tuple(stop)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        done = [cut_at_stop(t, self.stop) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@contextmanager
def _batches(model, prompts: Sequence[list[int]], batch_size: int, desc: str, progress: bool) -> Iterator:
    """Batches of prompt indices, longest prompts first (little padding per batch), with the
    model in eval mode and a progress bar; yields (batches, bar) and restores the model's mode."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    try:
        yield [order[i : i + batch_size] for i in range(0, len(order), batch_size)], bar
    finally:
        bar.close()
        model.train(was_training)


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, left-padded (decoder-only generation continues at the right)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, p in enumerate(seqs):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: str = "cpu",
    stop: Sequence[str] | None = ("\n",),
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[list[int], list[str]], None] | None = None,
) -> list[str]:
    """Generate a continuation for each prompt (token ids); returns the decoded new text, cut
    before the first stop string (``stop=None``: no stop strings, only EOS and the length).

    ``on_batch(indices, texts)`` is called after each batch (for incremental writing).
    Sampling with finished rows leaving the batch: :func:`generate_sampled`.
    """
    from transformers import StoppingCriteriaList

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str | None] = [None] * len(prompts)
    with _batches(model, prompts, batch_size, desc, progress) as (batches, bar):
        for idx in batches:
            ids, mask = _left_pad([prompts[i] for i in idx], pad_id)
            width = ids.shape[1]
            stopping = StoppingCriteriaList([_StopStrings(tokenizer, width, stop)]) if stop else None
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
            if stop:
                texts = [c if (c := cut_at_stop(t, stop)) is not None else t for t in texts]
            for i, t in zip(idx, texts):
                out[i] = t
            if on_batch:
                on_batch(idx, texts)
            bar.update(len(idx))
    return [t or "" for t in out]


@torch.no_grad()
def generate_sampled(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    seed: int = 0,
    stop: Sequence[str] | None = ("\n",),
    keep_stop: bool = False,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[list[int], list[str]], None] | None = None,
) -> tuple[list[str], int]:
    """Sampling (temperature, top-k, top-p; ``temperature=0`` is greedy) with a decoding loop of
    our own that drops a sequence from the batch as soon as it ends (EOS or a stop string): the
    rest of the batch no longer pays for it, whereas ``model.generate`` keeps computing finished
    rows until the longest one ends.  Each batch draws from a generator seeded with ``seed`` and
    the index of its first prompt.  Returns the texts (input order, cut before the stop string,
    or after it with ``keep_stop``) and the number of tokens generated."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | set(extra if isinstance(extra, (list, tuple)) else [extra])
    eos.discard(None)
    out: list[str] = [""] * len(prompts)
    produced = 0
    with _batches(model, prompts, batch_size, desc, progress) as (batches, bar):
        for idx in batches:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + idx[0])
            ids, mask = _left_pad([prompts[i] for i in idx], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            cache = res.past_key_values
            active = list(range(len(idx)))  # rows of this batch still generating
            new: list[list[int]] = [[] for _ in idx]
            logits = res.logits[:, -1, :].float()
            for _ in range(max_new_tokens):
                nxt = _sample(logits, temperature, top_k, top_p, gen)
                keep = []
                for k, row in enumerate(active):
                    t = int(nxt[k])
                    if t in eos:
                        continue
                    new[row].append(t)
                    if stop and cut_at_stop(tokenizer.decode(new[row], skip_special_tokens=True), stop) is not None:
                        continue
                    keep.append(k)
                if not keep:
                    break
                if len(keep) < len(active):
                    sel = torch.tensor(keep, device=mask.device)
                    cache.batch_select_indices(sel)
                    mask, nxt = mask[sel], nxt[keep]
                    active = [active[k] for k in keep]
                mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=mask.device)], 1)
                pos = (mask.sum(-1, keepdim=True) - 1)
                res = model(input_ids=nxt[:, None].to(device), attention_mask=mask, position_ids=pos,
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = res.past_key_values
                logits = res.logits[:, -1, :].float()
            texts = []
            for row, i in enumerate(idx):
                t = tokenizer.decode(new[row], skip_special_tokens=True)
                c = cut_at_stop(t, stop, keep_stop) if stop else None
                out[i] = c if c is not None else t
                texts.append(out[i])
                produced += len(new[row])
            if on_batch:
                on_batch(idx, texts)
            bar.update(len(idx))
    return out, produced


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if not temperature or temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        vals, cand = logits.topk(top_k, dim=-1)  # sorted, descending
    else:
        vals, cand = logits.sort(dim=-1, descending=True)
    probs = vals.softmax(-1)
    if top_p < 1.0:
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    pick = torch.multinomial(probs.cpu(), 1, generator=gen).to(cand.device)
    return cand.gather(-1, pick).squeeze(-1)


class LocalGenerator:
    """The :class:`~glotkit.generate.Generator` of a model loaded in this process.  ``adapter``
    names the LoRA adapter to make active before each call (a PeftModel holding several);
    ``adapter_off`` runs the base model with its adapters switched off.  Switching adapters on
    and off for generation happens here and nowhere else."""

    backend = "local"

    def __init__(self, model, tokenizer, device: str = "cpu", *, adapter: str | None = None, adapter_off: bool = False):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.adapter, self.adapter_off = adapter, adapter_off

    @contextmanager
    def _active(self) -> Iterator[None]:
        if self.adapter_off and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
            return
        if self.adapter is not None:
            self.model.set_adapter(self.adapter)
        yield

    def greedy(self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
               stop: Sequence[str] | None = ("\n",), texts: Sequence[str] | None = None, progress: bool = True,
               desc: str = "generate", on_batch: Callable[[list[int], list[str]], None] | None = None):
        """Greedy continuations through ``model.generate`` (``texts`` is for servers: unused)."""
        from glotkit.generate import Generations

        with self._active():
            out = generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, device=self.device, stop=stop, progress=progress, desc=desc,
                                  on_batch=on_batch)
        return Generations(out, sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out))

    def sample(self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
               temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
               stop: Sequence[str] | None = ("\n",), keep_stop: bool = False, texts: Sequence[str] | None = None,
               progress: bool = True, desc: str = "generate",
               on_batch: Callable[[list[int], list[str]], None] | None = None):
        """Seeded sampling in our own loop (finished rows leave the batch); ``temperature=0`` is greedy."""
        from glotkit.generate import Generations

        with self._active():
            out, produced = generate_sampled(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, temperature=temperature, top_p=top_p, top_k=top_k,
                                             seed=seed, stop=stop, keep_stop=keep_stop, device=self.device,
                                             progress=progress, desc=desc, on_batch=on_batch)
        return Generations(out, produced)

    def option_logliks(self, prompts: Sequence[list[int]], options: Sequence[str], *, batch_size: int = 8,
                       texts: Sequence[str] | None = None, progress: bool = True,
                       desc: str = "loglik") -> list[list[float]]:
        """Each option (text, tokenized without special tokens) scored after each prompt, the
        prompt computed once for all its options where the model allows."""
        from glotkit.models.lm import option_logliks

        option_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        with self._active():
            return option_logliks(self.model, self.tokenizer, prompts, option_ids, batch_size, self.device)
