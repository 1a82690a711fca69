"""The supervised fine-tuning engine: a plain PyTorch loop built for speed on small hardware.

Why not ``transformers.Trainer``/TRL: for a 262k-vocabulary model the full LM-head logits
(vocab × every token) cost more than the whole transformer body.  Here the body runs once and the
LM head is applied only at the positions that carry a label (the answer tokens), which gives the
same loss — a test checks it against the full-logits computation — at a fraction of the cost.

Also here: token-weighted loss over gradient accumulation (every supervised token counts the
same, whatever its micro-batch), seeded length-grouped batches, atomic checkpoints with the
optimizer, scheduler and RNG state so that an interrupted run resumes to the same result, and
a progress bar with tokens/s.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from glotkit.config import TrainSection
from glotkit.data.prompts import IGNORE, Encoded
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_jsonl
from glotkit.train.memory import peak_memory, reset_peak

if TYPE_CHECKING:
    from glotkit.train.distributed import Parallel

CHECKPOINT = "checkpoint.pt"
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
            same = next((i for i, (a, b) in enumerate(zip(first, e.input_ids)) if a != b), lcp)
            lcp = min(lcp, same)
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
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        targets[i, :n] = torch.tensor(r.targets)
        mask[i, :n] = 1
        pos[i, :n] = torch.tensor(r.position_ids)
        seg[i, :n] = torch.tensor(r.segments)
    out = {"input_ids": ids.to(device), "targets": targets.to(device), "n_tokens": sum(r.n_tokens for r in rows),
           "n_compute": sum(len(r.input_ids) for r in rows)}
    if all(r.n_examples == 1 for r in rows):
        out["attention_mask"] = mask.to(device)
        return out
    sq, sk = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = ((sq == sk) | (sk == 0)) & (sk >= 0) & causal
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


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                  keys: Sequence | None = None) -> list[list[int]]:
    """The micro-batches of one epoch, a pure function of (seed, epoch) so resume replays them.

    With ``group_by_length`` examples of similar length share a batch (less padding): shuffled
    indices are cut into mega-batches of 50 batches, each sorted by length; the longest batch goes
    first so a run that would run out of memory does so at once.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if keys is not None:
        # examples with the same prompt prefix side by side (in shuffled group order) so that they
        # can share it; batches are then cut in that order
        groups: dict = {}
        for i in order:
            groups.setdefault(keys[i], []).append(i)
        order = [i for g in groups.values() for i in g]
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    first = batches.pop(longest)
    rng.shuffle(batches)
    return [first] + batches


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


def plan_steps(lengths: Sequence[int], cfg: TrainSection, seed: int, keys: Sequence | None = None) -> list[list[list[int]]]:
    """Every optimizer step as a list of micro-batches of example indices."""
    if not lengths:
        raise GlotkitError("data.train: no training examples left to train on")
    per_epoch = math.ceil(math.ceil(len(lengths) / cfg.batch_size) / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    steps: list[list[list[int]]] = []
    epoch = 0
    while len(steps) < total:
        batches = epoch_batches(lengths, cfg.batch_size, seed, epoch, cfg.group_by_length, keys)
        for i in range(0, len(batches), cfg.grad_accum):
            steps.append(batches[i : i + cfg.grad_accum])
        epoch += 1
    return steps[:total]


# --------------------------------------------------------------------------- the loss


def _causal_parts(model):
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
        self.base, self.body, self.head, self.cap = _causal_parts(model)
        self.fast = self.body is not None and self.head is not None
        config = self.base.config
        layer_types = getattr(config, "layer_types", None)
        self.mask_types = sorted(set(layer_types)) if layer_types else None
        self.sliding_window = getattr(config, "sliding_window", None)
        self.device = next(model.parameters()).device

    def collate(self, rows: Sequence[Row], pad_id: int) -> dict:
        return collate_rows(rows, pad_id, self.device, self.mask_types, self.sliding_window)

    @torch.no_grad()
    def check_sharing(self, examples: Sequence[Encoded], pad_id: int, log: Callable[[str], None] = print) -> bool:
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
            log(f"[glotkit] note: shared-prefix packing unavailable for this model ({type(err).__name__}); "
                "each example is computed separately")
            return False
        finally:
            self.model.train(was_training)
        if n1 != n2 or not torch.allclose(packed / n1, alone / n2, rtol=1e-4, atol=1e-4):
            log(f"[glotkit] note: shared-prefix packing disagrees for this model ({(packed / n1).item():.5f} vs "
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
    def self_check(self, example: Encoded, log: Callable[[str], None] = print, max_tokens: int = 48) -> None:
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
                f"[glotkit] note: answer-only LM head disagrees with this model's logits "
                f"({(fast / n).item():.5f} vs {(ref / n).item():.5f}); using full logits (slower)"
            )


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps: int
    examples: int
    tokens: int
    supervised_tokens: int
    seconds: float
    tokens_per_s: float
    supervised_tokens_per_s: float
    final_loss: float | None
    memory: dict[str, float]
    fast_loss: bool
    shared_prefix: bool = False
    computed_tokens: int = 0
    processes: int = 1
    log: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _LossModule(torch.nn.Module):
    """The model with the supervised loss as its forward, so that DistributedDataParallel sees
    the whole computation of a pass (the loss calls the decoder body and the LM head apart)."""

    def __init__(self, model, loss_fn: "SupervisedLoss"):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(batch)[0]


class _DeferredInterrupt:
    """Ctrl-C during training ends the current step, then stops (the checkpoint is saved at a
    step boundary); a second Ctrl-C stops at once.  Python otherwise raises KeyboardInterrupt
    wherever the signal lands, and loses it when that is inside a finaliser ("Exception
    ignored in ..."), so a run could go on after Ctrl-C.  Only in the main thread."""

    def __init__(self, log: Callable[[str], None]):
        self.asked, self.log, self.previous = False, log, None

    def _handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        self.log("[glotkit] Ctrl-C: stopping after this step (press it again to stop at once)")

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def make_optimizer(params: list, cfg: TrainSection, device, log: Callable[[str], None]):
    """AdamW (paged on CUDA when asked) with weight decay on matrices only."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "paged_adamw" and str(device).startswith("cuda"):
        try:
            from bitsandbytes.optim import PagedAdamW
        except ImportError:
            raise GlotkitError("train.optimizer: paged_adamw needs bitsandbytes (pip install 'glotkit[quant]')") from None
        return PagedAdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "paged_adamw":
        log("[glotkit] note: paged AdamW pages optimizer state between GPU and CPU memory; on CPU plain AdamW is used")
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer, cfg: TrainSection, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler]
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def train(
    model,
    examples: Sequence[Encoded],
    cfg: TrainSection,
    *,
    seed: int,
    work_dir: Path,
    pad_id: int,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop_after: int | None = None,
    parallel: "Parallel | None" = None,
) -> TrainResult:
    """Train the model's trainable parameters (the LoRA adapter) on ``examples``.

    ``work_dir`` holds the checkpoint and the loss log; if it has a checkpoint the run resumes
    from it.  ``stop_after`` ends the loop early after that many steps (for tests of resume).
    With ``parallel`` (the processes of an ``accelerate launch``) each micro-batch is split
    between the processes and only process 0 writes; the steps are those of one process.
    """
    from tqdm.auto import tqdm

    from glotkit.train.distributed import Parallel, check_split, share_of

    par = parallel or Parallel()
    check_split(cfg.batch_size, par.world)
    if not par.is_main:
        log, progress = (lambda msg: None), False
    work_dir = Path(work_dir)
    if par.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + par.rank)  # dropout masks differ between processes
    lengths = [len(e.input_ids) for e in examples]
    packed = any(isinstance(e, Row) for e in examples)
    keys = [group_key(e) for e in examples] if cfg.share_prefix and not packed else None
    if keys is not None and len(set(keys)) == len(keys):
        keys = None  # no two examples share a prompt prefix: keep length-grouped batches
    steps = plan_steps(lengths, cfg, seed, keys)
    total = len(steps)

    if not any(p.requires_grad for p in model.parameters()):
        raise GlotkitError("nothing to train: the model has no trainable parameters")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    loss_fn = SupervisedLoss(model)
    resumed_compute = 0
    start_step, history = 0, []
    tokens = sup_tokens = 0
    elapsed = 0.0
    ckpt_path = work_dir / CHECKPOINT
    state = None
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("total_steps") != total:
            raise GlotkitError(
                f"{ckpt_path}: checkpoint was made for {state.get('total_steps')} steps, this run plans {total}; "
                "delete the run folder to start again"
            )
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value.to(named[name].device))
        rngs = state.get("torch_rngs") or [state["torch_rng"]]
        if state.get("processes", 1) != par.world:
            log(f"[glotkit] note: the checkpoint was made by {state.get('processes', 1)} process(es), this run has "
                f"{par.world}; the steps are the same, random state (dropout) continues from process 0's")
        torch.set_rng_state(rngs[par.rank] if len(rngs) == par.world else rngs[0])
        start_step, history = state["step"], list(state["log"])
        tokens, sup_tokens, elapsed = state["tokens"], state["supervised_tokens"], state["elapsed"]
        resumed_compute = state.get("compute_tokens", 0)
        log(f"[glotkit] resuming training from step {start_step}/{total}")
    else:
        loss_fn.self_check(examples[steps[0][0][0]], log)
    share = keys is not None and loss_fn.check_sharing([examples[i] for mb in steps[0] for i in mb], pad_id, log)
    compute_tokens = resumed_compute
    wrapped = _LossModule(model, loss_fn) if par.world > 1 else None
    if par.sharded:  # before the optimizer, which must hold the sharded parameters
        par.shard(wrapped, model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device, log)
    scheduler = make_scheduler(optimizer, cfg, total)
    if state is not None:
        par.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        del state
    torch_optimizer = optimizer
    if par.world > 1:
        wrapped, optimizer = par.prepare(wrapped, optimizer)

    def save(step: int, rng_state: torch.Tensor, together: bool = True) -> bool:
        # every process's random state, when all of them are here to hand it over; sharded
        # parameters and optimizer state are gathered by all of them together
        if par.sharded and not together:
            log(f"[glotkit] the processes did not stop together: the checkpoint is the last one saved, not step {step}")
            return False
        rngs = par.gather(rng_state) if together and par.world > 1 else [rng_state]
        if not (par.is_main or par.sharded):
            return True
        trainable = par.trainable_state(model)
        optimizer_state = par.optimizer_state(model, torch_optimizer)
        if not par.is_main:
            return True
        _atomic_torch_save(
            {
                "step": step,
                "total_steps": total,
                "trainable": trainable,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "torch_rng": rngs[0],
                "torch_rngs": rngs,  # one per process (only process 0's after an interrupt)
                "processes": par.world,
                "log": history,
                "tokens": tokens,
                "supervised_tokens": sup_tokens,
                "compute_tokens": compute_tokens,
                "elapsed": elapsed,
            },
            ckpt_path,
        )
        atomic_write_jsonl(work_dir / "log.jsonl", history)
        return True

    model.train()
    reset_peak(device)
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    step = start_step
    rng_at_step = torch.get_rng_state()
    t0 = time.perf_counter() - elapsed
    end = total if stop_after is None else min(total, start_step + stop_after)
    in_update = agreed = False
    interrupt = _DeferredInterrupt(log)
    try:
        with interrupt:
            while step < end:
                # (batch, real): this process's forward passes; a process whose share of a short last
                # micro-batch is empty runs one example with weight 0, so that every process takes
                # part in the gradient synchronisation
                passes = []
                for mb in steps[step]:
                    mine = share_of(mb, par.rank, par.world)
                    rows = build_rows([examples[i] for i in mine or mb[:1]], share_prefix=share,
                                      max_row=cfg.max_tokens_per_forward)
                    row_len = [len(r.input_ids) for r in rows]
                    for chunk in split_by_tokens(list(range(len(rows))), row_len, cfg.max_tokens_per_forward):
                        passes.append((loss_fn.collate([rows[i] for i in chunk], pad_id), bool(mine)))
                if par.sharded:  # each pass gathers the shards: every process makes as many
                    most = par.most(len(passes))
                    while len(passes) < most:
                        passes.append((loss_fn.collate(build_rows([examples[steps[step][0][0]]])[:1], pad_id), False))
                counts = [(int((b["targets"] != IGNORE).sum()), b["n_tokens"], b["n_compute"]) if real else (0, 0, 0)
                          for b, real in passes]
                n_sup, n_tok, n_comp = (int(v) for v in par.sum([sum(c[k] for c in counts) for k in range(3)]))
                # each process's gradients are averaged over the processes: scale its sum back up
                norm = max(n_sup, 1) / par.world
                step_loss = 0.0
                for k, (b, real) in enumerate(passes):
                    with par.no_sync(wrapped, skip=k < len(passes) - 1):
                        loss_sum = wrapped(b) if wrapped is not None else loss_fn(b)[0]
                        par.backward(loss_sum / norm if real else loss_sum * 0.0)
                    if real:
                        step_loss += loss_sum.item()
                # (with the loss, whether any process was asked to stop: they stop after the same step)
                step_loss, stop = par.sum([step_loss, float(interrupt.asked)])
                tokens += n_tok
                compute_tokens += n_comp
                sup_tokens += n_sup
                if cfg.max_grad_norm:
                    par.clip_grad_norm_(params, cfg.max_grad_norm)
                in_update = True
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                rng_at_step = torch.get_rng_state()
                in_update = False
                elapsed = time.perf_counter() - t0
                loss = step_loss / max(n_sup, 1)
                if not math.isfinite(loss):
                    raise GlotkitError(f"training diverged at step {step}: loss is {loss}; lower train.lr (now {cfg.lr})")
                history.append({"step": step, "loss": round(loss, 6), "lr": lr, "tokens": tokens, "seconds": round(elapsed, 3)})
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}", refresh=False)
                bar.update(1)
                if step % cfg.checkpoint_every == 0 and step < total:
                    save(step, rng_at_step)
                if stop:
                    agreed = True
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        if not in_update and step > start_step:
            optimizer.zero_grad(set_to_none=True)
            if save(step, rng_at_step, together=agreed):
                log(f"[glotkit] interrupted: checkpoint saved at step {step}/{total}")
        raise
    bar.close()
    if step < total:  # stopped early on purpose (tests)
        save(step, rng_at_step)
    elif par.is_main:
        atomic_write_jsonl(work_dir / "log.jsonl", history)
    elapsed = time.perf_counter() - t0
    return TrainResult(
        steps=step,
        examples=len(examples),
        tokens=tokens,
        supervised_tokens=sup_tokens,
        seconds=round(elapsed, 2),
        tokens_per_s=round(tokens / max(elapsed, 1e-9), 1),
        supervised_tokens_per_s=round(sup_tokens / max(elapsed, 1e-9), 1),
        final_loss=history[-1]["loss"] if history else None,
        memory=peak_memory(device),
        fast_loss=loss_fn.fast,
        shared_prefix=share,
        computed_tokens=compute_tokens,
        processes=par.world,
        log=history,
    )


def train_adapter(peft_model, examples: Sequence[Encoded], cfg: TrainSection, *, what: str, out: Path, work_dir: Path,
                  seed: int, pad_id: int, device: str = "cpu", log: Callable[[str], None] = print,
                  progress: bool = True, info: dict | None = None) -> TrainResult:
    """Train a LoRA adapter, save it to ``out`` (a PEFT folder), write ``work_dir/result.json``
    (the run's figures and ``info``) and drop the checkpoint: one adapter, one call."""
    from glotkit.io import atomic_write_json
    from glotkit.models.lora import count_trainable, save_adapter

    log(f"[glotkit] {what}: {len(examples)} examples; {count_trainable(peft_model).line()}")
    result = train(peft_model, examples, cfg, seed=seed, work_dir=work_dir, pad_id=pad_id, device=device, log=log,
                   progress=progress)
    save_adapter(peft_model, out)
    summary = result.to_dict()
    summary.pop("log")
    atomic_write_json(Path(work_dir) / "result.json", summary | (info or {}))
    (Path(work_dir) / CHECKPOINT).unlink(missing_ok=True)
    log(f"[glotkit] {what}: {result.steps} steps in {result.seconds:.0f}s, {result.tokens_per_s:.0f} tokens/s, "
        f"final loss {result.final_loss}")
    return result
