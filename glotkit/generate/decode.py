"""The decoding loop of the local backend: batches planned by a token budget, shared prompt
prefixes computed once, finished rows leaving the batch.

Planning (:func:`plan_batches`).  Prompts are sorted by their token ids, so prompts that begin
alike (the questions about one context, the pairs of one article, the prompts of one template)
sit next to each other; runs of neighbours that share at least ``share_min`` leading tokens form
a *group* whose common prefix is computed once.  Groups go into batches longest first (little
padding), a batch holding as many prompts as fit in ``batch_tokens`` (rows × (padded prompt +
new tokens): the key/value cache the batch needs) and at most ``max_rows``.

Decoding (:func:`decode`).  Per batch: one forward pass over the groups' prefixes (one row per
group, left-padded), the cache rows copied to the prompts of each group, one pass over the
prompts' remaining tokens (left-padded after the prefix; positions continue each prompt's own
count, so padding never shifts a position), then one token per step.  A row leaves the batch as
soon as it ends (an end-of-sequence token or a stop string after non-blank text): the others no
longer pay for it.  Greedy decoding (``temperature=0``) picks the arg-max; sampling draws from
one generator per prompt, seeded with ``seed`` and the prompt's index, so a prompt's text does not
depend on which batch it landed in.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from glotkit.models.lm import prefix_groups

DEFAULT_BATCH_TOKENS = 16384
DEFAULT_MAX_ROWS = 64
SHARE_MIN = 16  # fewer shared leading tokens than this: not worth a pass of their own


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


@dataclass
class Batch:
    """Prompts decoded together: ``rows`` (prompt indices), ``group`` (each row's prefix),
    ``prefixes`` (token ids computed once per batch; empty when the batch shares nothing)."""

    rows: list[int]
    group: list[int]
    prefixes: list[list[int]]
    masked: bool = False  # attention masks of our own (positions, not cache slots, for the window)


@dataclass
class DecodeStats:
    """What a call did: prompts, prompt tokens as given and as computed, tokens generated."""

    prompts: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    new_tokens: int = 0
    batches: int = 0
    rows_per_batch: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0  # the prompts through the model
    decode_seconds: float = 0.0  # the steps after
    steps: int = 0  # decoding steps (one token for each row still in its batch)


def plan_batches(prompts: Sequence[list[int]], *, max_new_tokens: int, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 max_rows: int = DEFAULT_MAX_ROWS, share_prefix: bool = True,
                 share_min: int = SHARE_MIN, window: int | None = None, masks_ok: bool = False) -> list[Batch]:
    """Batches of prompt indices (see the module text).  ``batch_tokens=0``: ``max_rows`` prompts
    a batch, whatever their length.  A prompt longer than the budget gets a batch of its own.

    ``window``: the model's smallest sliding attention window.  Sharing puts padding between a
    prompt's prefix and the rest of it, and the library's sliding-window masks count cache slots,
    padding included.  A batch whose prefix + rest + new tokens fit in the window shares as it is;
    a longer one is ``masked`` (``masks_ok``: the model takes a mask per attention type, which
    :func:`decode` builds from positions) or else left-padded whole (exact, nothing shared)."""
    n = len(prompts)
    if not n:
        return []
    # groups of neighbours in token order sharing >= share_min leading tokens
    groups = prefix_groups(prompts, share_min) if share_prefix else [(0, [i]) for i in range(n)]
    # longest first, so a batch holds prompts of like length
    groups.sort(key=lambda g: -max(len(prompts[i]) for i in g[1]))
    batches: list[Batch] = []
    cur: list[tuple[int, int]] = []  # (prompt, prefix length)

    def close():
        if not cur:
            return
        rows = [i for i, _ in cur]
        span = max(p for _, p in cur) + max(len(prompts[i]) - p for i, p in cur) + max_new_tokens
        long = bool(window and span > window)
        if min(p for _, p in cur) == 0 or (long and not masks_ok):  # plain prompts
            batches.append(Batch(rows, list(range(len(rows))), []))
        else:
            keys: dict[tuple, int] = {}
            group, prefixes = [], []
            for i, p in cur:
                key = tuple(prompts[i][:p])
                if key not in keys:
                    keys[key] = len(prefixes)
                    prefixes.append(list(key))
                group.append(keys[key])
            batches.append(Batch(rows, group, prefixes, masked=long))
        cur.clear()

    width = 0
    for plen, members in groups:
        for i in sorted(members, key=lambda j: -len(prompts[j])):
            w = max(width, len(prompts[i]))
            if cur and (len(cur) >= max_rows or (batch_tokens and (len(cur) + 1) * (w + max_new_tokens) > batch_tokens)):
                close()
                w = len(prompts[i])
            cur.append((i, plen))  # a prompt alone: all but its last token (nothing saved, nothing lost)
            width = w
    close()
    return batches


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, left-padded (decoder-only generation continues at the right)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, p in enumerate(seqs):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
    return ids, mask


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row: arg-max (``temperature`` 0) or a draw after temperature, top-k and
    top-p, row ``r`` drawing from ``gens[r]``."""
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
    probs = probs.cpu()
    pick = torch.stack([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)])
    return cand.gather(-1, pick.to(cand.device)).squeeze(-1)


def eos_ids(model, tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence id and the model's generation config's (Gemma: two)."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | set(extra if isinstance(extra, (list, tuple)) else [extra])
    eos.discard(None)
    return eos


@torch.no_grad()
def decode(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop: Sequence[str] | None = ("\n",),
    keep_stop: bool = False,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_rows: int = DEFAULT_MAX_ROWS,
    share_prefix: bool = True,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[list[int], list[str]], None] | None = None,
    stats: DecodeStats | None = None,
    vocab: Sequence[int] | None = None,
) -> tuple[list[str], int]:
    """Continue every prompt (token ids); returns the texts in the prompts' order (cut before the
    first stop string, or after it with ``keep_stop``) and the number of tokens generated.
    ``on_batch(indices, texts)`` is called as each batch ends (for incremental writing).

    ``vocab``: token ids the continuation may use (the end-of-sequence ids and the prompts' own
    tokens are added): the LM head is computed on those rows only.  On a small model the head
    is most of the work of a decoding step (Gemma 3 270M: 262,144 rows of 640); the text is the
    same as with the whole head wherever the whole head's choice lies in ``vocab``."""
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(model, tokenizer)
    stop = tuple(stop or ())
    batches = plan_batches(prompts, max_new_tokens=max_new_tokens, batch_tokens=batch_tokens, max_rows=max_rows,
                           share_prefix=share_prefix, window=sliding_window(model), masks_ok=bool(mask_types(model)))
    kept = None
    if vocab is not None:
        kept = torch.tensor(sorted(set(vocab) | eos | {t for p in prompts for t in p}), dtype=torch.long,
                            device=device)
    step = _Stepper(model, kept)
    st = stats if stats is not None else DecodeStats()
    out: list[str] = [""] * len(prompts)
    produced = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    try:
        for b in batches:
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in b.rows] if temperature else []
            t0 = time.perf_counter()
            logits, cache, mask = _prefill(step, [prompts[i] for i in b.rows], b, pad_id, device, st, max_new_tokens)
            t1 = time.perf_counter()
            st.prefill_seconds += t1 - t0
            active = list(range(len(b.rows)))  # rows of this batch still generating
            new: list[list[int]] = [[] for _ in b.rows]
            for _ in range(max_new_tokens):
                nxt = _sample(logits, temperature, top_k, top_p, [gens[r] for r in active] if gens else [])
                if kept is not None:
                    nxt = kept[nxt]
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
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], 1)
                pos = mask.sum(-1, keepdim=True) - 1
                logits, cache = step(nxt[:, None].to(device), mask, pos, cache, b.masked)
                st.steps += 1
            st.decode_seconds += time.perf_counter() - t1
            texts = []
            for row, i in enumerate(b.rows):
                t = tokenizer.decode(new[row], skip_special_tokens=True)
                c = cut_at_stop(t, stop, keep_stop) if stop else None
                out[i] = c if c is not None else t
                texts.append(out[i])
                produced += len(new[row])
            st.batches += 1
            st.rows_per_batch.append(len(b.rows))
            if on_batch:
                on_batch(b.rows, texts)
            bar.update(len(b.rows))
    finally:
        bar.close()
        model.train(was_training)
    st.prompts += len(prompts)
    st.prompt_tokens += sum(map(len, prompts))
    st.new_tokens += produced
    return out, produced


def _text_config(model):
    """The decoder's config, looking through a PEFT wrapper and a multimodal config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return getattr(config, "text_config", None) or config


def sliding_window(model) -> int | None:
    """The smallest sliding attention window of the model's layers, or None when none slides."""
    config = _text_config(model)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def mask_types(model) -> list[str] | None:
    """The attention types of the model's layers (``full_attention``, ``sliding_attention``) when
    it declares them (it then takes a dict of 4-D masks, one per type), else None."""
    types = getattr(_text_config(model), "layer_types", None)
    return sorted(set(types)) if types else None


def _window_masks(mask: torch.Tensor, q: int, types: Sequence[str], window: int | None) -> dict[str, torch.Tensor]:
    """4-D boolean masks for the last ``q`` slots of ``mask`` (B × slots, 1 on real tokens): a
    query sees the real keys at positions up to its own, and on sliding layers only those fewer
    than ``window`` positions back, padding wherever it lies; padding queries see themselves."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    qpos = pos[:, -q:]
    allowed = mask.bool()[:, None, :] & (pos[:, None, :] <= qpos[:, :, None])
    k = mask.shape[1]
    eye = torch.zeros((q, k), dtype=torch.bool, device=mask.device)
    eye[torch.arange(q), torch.arange(k - q, k)] = True
    out = {}
    for t in types:
        a = allowed & ((qpos[:, :, None] - pos[:, None, :]) < window) if t == "sliding_attention" and window else allowed
        out[t] = (a | eye)[:, None]
    return out


class _Stepper:
    """One forward pass that returns (last-position logits, cache), whichever name the model's
    forward gives the cache (``cache`` in transformers >= 5.2x, ``past_key_values`` before);
    ``masked``: with the 4-D masks of :func:`_window_masks` instead of the 2-D padding mask;
    with ``kept`` ids, the decoder body then those rows of the LM head (logits in ``kept`` order)."""

    def __init__(self, model, kept: torch.Tensor | None = None):
        self.model, self.kept = model, kept
        self.types, self.window = mask_types(model) or [], sliding_window(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.fn = model
        if kept is not None:
            from glotkit.models.lm import causal_parts

            _, body, head, self.cap = causal_parts(model)
            if body is None or head is None or not hasattr(head, "weight"):
                raise ValueError("a restricted vocabulary needs a causal LM with a separate LM head")
            self.fn, base = body, body
            self.weight = head.weight.detach()[kept.to(head.weight.device)]
            bias = getattr(head, "bias", None)
            self.bias = bias.detach()[kept.to(bias.device)] if bias is not None else None
        self.key = "cache" if "cache" in _parameters(base.forward) else "past_key_values"

    def __call__(self, ids, mask, pos, cache=None, masked: bool = False):
        if masked and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()  # full layers only: the masks do the windowing
        kwargs = {self.key: cache} if cache is not None else {}
        attn = _window_masks(mask, ids.shape[1], self.types, self.window) if masked else mask
        if self.kept is None:
            res = self.fn(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                          **kwargs)
            logits = res.logits[:, -1, :]
        else:
            res = self.fn(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **kwargs)
            logits = torch.nn.functional.linear(res.last_hidden_state[:, -1, :], self.weight, self.bias)
            if self.cap:
                logits = torch.tanh(logits / self.cap) * self.cap
        new = getattr(res, "cache", None)
        return logits.float(), new if new is not None else res.past_key_values


def _parameters(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


@functools.lru_cache(maxsize=None)
def _roomy_layer_class(room: int):
    """A DynamicLayer that keeps room for the tokens to come, so a decoding step writes its keys
    and values in place instead of copying the whole cache (``torch.cat``: a fifth of a CPU
    decoding step on Gemma 3 270M)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._n, self._k, self._v = 0, None, None
            n, q = self._n, key_states.shape[-2]
            if self._k is None or n + q > self._k.shape[-2]:
                b, h, _, d = key_states.shape
                k = key_states.new_empty((b, h, n + q + room, d))
                v = value_states.new_empty((b, h, n + q + room, value_states.shape[-1]))
                if n:
                    k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
                self._k, self._v = k, v
            self._k[:, :, n : n + q] = key_states
            self._v[:, :, n : n + q] = value_states
            self._n = n + q
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.is_initialized and self._k is not None:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

        def batch_repeat_interleave(self, repeats: int):
            raise NotImplementedError

        def crop(self, tokens_to_remove: int):
            raise NotImplementedError

    return RoomyLayer


def _new_cache(room: int):
    """A cache of full-attention layers with room for ``room`` more tokens after each growth."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_roomy_layer_class(room))


PREFIX_PASS_TOKENS = 1024  # padded tokens a prefix pass may hold (long prefixes go alone: no padding)


def _prefix_cache(step: _Stepper, prefixes: list[list[int]], pad_id: int, device: str, masked: bool, room: int):
    """The prefixes through the model in passes of at most PREFIX_PASS_TOKENS padded tokens
    (on a CPU one long prefix alone runs faster per token than several padded together), the
    caches joined left-padded into one: (cache with a row per prefix, its attention mask).
    None when the cache cannot be joined (a layer without plain key/value tensors)."""
    from transformers import DynamicCache

    order = sorted(range(len(prefixes)), key=lambda g: -len(prefixes[g]))
    passes, cur = [], []
    for g in order:
        if cur and (len(cur) + 1) * len(prefixes[cur[0]]) > PREFIX_PASS_TOKENS:
            passes.append(cur)
            cur = []
        cur.append(g)
    passes.append(cur)
    width = len(prefixes[order[0]])
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    masks = []
    for members in passes:
        ids, pmask = _left_pad([prefixes[g] for g in members], pad_id)
        ids, pmask = ids.to(device), pmask.to(device)
        _, cache = step(ids, pmask, (pmask.cumsum(-1) - 1).clamp(min=0), DynamicCache(), masked=masked)
        layers = []
        for layer in cache.layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.shape[-2] != ids.shape[1]:
                return None
            layers.append((k, v))
        parts.append(layers)
        masks.append(pmask)
    pad = [width - m.shape[1] for m in masks]
    joined = _new_cache(room)
    for li in range(len(parts[0])):
        ks = [torch.nn.functional.pad(p[li][0], (0, 0, n, 0)) for p, n in zip(parts, pad)]
        vs = [torch.nn.functional.pad(p[li][1], (0, 0, n, 0)) for p, n in zip(parts, pad)]
        joined.update(torch.cat(ks), torch.cat(vs), li)
    mask = torch.cat([torch.nn.functional.pad(m, (n, 0)) for m, n in zip(masks, pad)])
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor([g for members in passes for g in members])] = torch.arange(len(order))
    joined.batch_select_indices(back.to(mask.device))  # rows in prefix order again
    return joined, mask[back.to(mask.device)]


def _prefill(step: _Stepper, seqs: list[list[int]], b: Batch, pad_id: int, device: str, st: DecodeStats,
             room: int):
    """The prompts of one batch through the model: (last-position logits, cache, attention mask)."""
    cache = None
    if b.prefixes:
        joined = _prefix_cache(step, b.prefixes, pad_id, device, b.masked, room)
        if joined is None:  # one padded pass over all prefixes
            ids, pmask = _left_pad(b.prefixes, pad_id)
            ids, pmask = ids.to(device), pmask.to(device)
            _, cache = step(ids, pmask, (pmask.cumsum(-1) - 1).clamp(min=0), masked=b.masked)
        else:
            cache, pmask = joined
        sel = torch.tensor(b.group, device=pmask.device)
        if b.group != list(range(len(b.prefixes))):
            cache.batch_select_indices(sel)
        pmask = pmask[sel]
        tails = [s[len(b.prefixes[g]) :] for s, g in zip(seqs, b.group)]
        st.computed_prompt_tokens += sum(map(len, b.prefixes))
    else:
        pmask = torch.zeros((len(seqs), 0), dtype=torch.long, device=device)
        tails = seqs
        if not step.window or max(map(len, seqs)) + room <= step.window:  # the window never binds
            cache = _new_cache(room)
    ids, smask = _left_pad(tails, pad_id)
    ids, smask = ids.to(device), smask.to(device)
    mask = torch.cat([pmask, smask], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
    logits, cache = step(ids, mask, pos, cache, b.masked)
    st.computed_prompt_tokens += sum(map(len, tails))
    return logits, cache, mask
