"""The supervised fine-tuning engine: a plain PyTorch loop built for speed on small hardware.

Why not ``transformers.Trainer``/TRL: for a 262k-vocabulary model the full LM-head logits
(vocab × every token) cost more than the whole transformer body.  Here the body runs once and the
LM head is applied only at the positions that carry a label (the answer tokens), which gives the
same loss — a test checks it against the full-logits computation — at a fraction of the cost
(the rows and that loss are :mod:`glotkit.models.lm`, shared with evaluation).

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

from glotkit.config import TrainSection
from glotkit.data.prompts import IGNORE, Encoded
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_jsonl
from glotkit.logs import say
from glotkit.models.lm import Row, SupervisedLoss, build_rows, group_key, split_by_tokens
from glotkit.models.memory import peak_memory, reset_peak

if TYPE_CHECKING:
    from glotkit.train.distributed import Parallel

CHECKPOINT = "checkpoint.pt"


# --------------------------------------------------------------------------- batching


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



def plan_steps(lengths: Sequence[int], cfg: TrainSection, seed: int, keys: Sequence | None = None,
               epoch_ends: list[int] | None = None) -> list[list[list[int]]]:
    """Every optimizer step as a list of micro-batches of example indices; ``epoch_ends``, when
    given, gets the number of steps done at the end of each whole epoch."""
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
        if epoch_ends is not None and len(steps) <= total:
            epoch_ends.append(len(steps))
    return steps[:total]


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


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before ``path``'s last one is kept (``checkpoint.previous.pt``)."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def _atomic_torch_save(obj, path: Path) -> None:
    """Write ``obj`` to ``path`` through a temporary file; the checkpoint it replaces is kept as
    :func:`previous_checkpoint` (the fallback when the new one cannot be read).  A failed write
    (a full disk) removes the temporary file and is one line; the earlier checkpoints stay."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if path.is_file():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        kept = path if path.is_file() else previous_checkpoint(path)
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise GlotkitError(f"{path}: could not write the checkpoint ({why})"
                           + (f"; {kept.name} is kept" if kept.is_file() else "")
                           + ": free space (or fix the folder) and rerun the same command to resume") from None


def _load_checkpoint(path: Path, log: Callable[[str], None]) -> dict | None:
    """The state saved in ``path``, or in the checkpoint before it when ``path`` cannot be read
    (truncated by a crash, say); None when there is none.  Unreadable everywhere: one line."""
    import pickle
    import zipfile

    from glotkit.models.safety import unpickling_reason

    tried = []
    for candidate in (path, previous_checkpoint(path)):
        if not candidate.is_file():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "trainable" not in state or "step" not in state:
                raise ValueError("not a glotkit checkpoint")
        except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            if isinstance(err, pickle.UnpicklingError):  # torch's own advice would be to unpickle code
                why = f"refused: not plain weights ({unpickling_reason(err)})"
            else:
                why = str(err).splitlines()[0][:120] if str(err).strip() else type(err).__name__
            tried.append(f"{candidate.name}: {why}")
            log(f"{candidate}: cannot be read ({tried[-1].split(': ', 1)[1]})"
                + ("; trying the checkpoint before it" if candidate == path else ""))
            continue
        if candidate != path:
            log(f"resuming from the checkpoint before it ({candidate.name}, step {state['step']})")
        return state
    if tried:
        raise GlotkitError(f"{path}: checkpoint cannot be read ({'; '.join(tried)}); delete {path.parent} "
                           "to start this training over")
    return None


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
        self.log("Ctrl-C: stopping after this step (press it again to stop at once)")

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
        log("note: paged AdamW pages optimizer state between GPU and CPU memory; on CPU plain AdamW is used")
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer, cfg: TrainSection, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler]
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@dataclass
class _Counters:
    """Where a run is: what a checkpoint carries besides the weights, optimizer and random state."""

    step: int = 0
    log: list[dict] = field(default_factory=list)
    tokens: int = 0
    supervised_tokens: int = 0
    compute_tokens: int = 0
    elapsed: float = 0.0


def _plan(examples: Sequence[Encoded], cfg: TrainSection, seed: int,
          epoch_ends: list[int] | None = None) -> tuple[list[list[list[int]]], list | None]:
    """(every optimizer step as micro-batches of example indices, the examples' prompt-prefix keys
    when some of them can share a prefix, else None)."""
    lengths = [len(e.input_ids) for e in examples]
    packed = any(isinstance(e, Row) for e in examples)
    keys = [group_key(e) for e in examples] if cfg.share_prefix and not packed else None
    if keys is not None and len(set(keys)) == len(keys):
        keys = None  # no two examples share a prompt prefix: keep length-grouped batches
    return plan_steps(lengths, cfg, seed, keys, epoch_ends), keys


def _prepare_model(model, cfg: TrainSection) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise GlotkitError("nothing to train: the model has no trainable parameters")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()


def _restore(ckpt_path: Path, model, total: int, par: "Parallel", log: Callable[[str], None]) -> tuple[_Counters, dict | None]:
    """Resume from ``ckpt_path`` when it exists: the trainable weights and this process's random
    state are set now; returns the counters and, for once the optimizer exists, the optimizer and
    scheduler state (None: no checkpoint, a fresh start)."""
    state = _load_checkpoint(ckpt_path, log)
    if state is None:
        return _Counters(), None
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
        log(f"note: the checkpoint was made by {state.get('processes', 1)} process(es), this run has "
            f"{par.world}; the steps are the same, random state (dropout) continues from process 0's")
    torch.set_rng_state(rngs[par.rank] if len(rngs) == par.world else rngs[0])
    run = _Counters(step=state["step"], log=list(state["log"]), tokens=state["tokens"],
                    supervised_tokens=state["supervised_tokens"], compute_tokens=state.get("compute_tokens", 0),
                    elapsed=state["elapsed"])
    log(f"resuming training from step {run.step}/{total}")
    return run, {"optimizer": state["optimizer"], "scheduler": state["scheduler"]}


class _Checkpoint:
    """The run's atomic checkpoint: ``checkpoint.pt`` (trainable weights, optimizer, scheduler,
    random state, counters) and ``log.jsonl`` beside it; only process 0 writes."""

    def __init__(self, path: Path, total: int, par: "Parallel", model, optimizer, scheduler,
                 log: Callable[[str], None]):
        self.path, self.total, self.par, self.log = path, total, par, log
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler  # the torch optimizer

    def save(self, run: _Counters, rng_state: torch.Tensor, together: bool = True) -> bool:
        par = self.par
        # every process's random state, when all of them are here to hand it over; sharded
        # parameters and optimizer state are gathered by all of them together
        if par.sharded and not together:
            self.log(f"the processes did not stop together: the checkpoint is the last one saved, "
                     f"not step {run.step}")
            return False
        rngs = par.gather(rng_state) if together and par.world > 1 else [rng_state]
        if not (par.is_main or par.sharded):
            return True
        trainable = par.trainable_state(self.model)
        optimizer_state = par.optimizer_state(self.model, self.optimizer)
        if not par.is_main:
            return True
        _atomic_torch_save(
            {
                "step": run.step,
                "total_steps": self.total,
                "trainable": trainable,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": rngs[0],
                "torch_rngs": rngs,  # one per process (only process 0's after an interrupt)
                "processes": par.world,
                "log": run.log,
                "tokens": run.tokens,
                "supervised_tokens": run.supervised_tokens,
                "compute_tokens": run.compute_tokens,
                "elapsed": run.elapsed,
            },
            self.path,
        )
        atomic_write_jsonl(self.path.parent / "log.jsonl", run.log)
        return True


def _step_passes(micro_batches: list[list[int]], examples: Sequence[Encoded], loss_fn: SupervisedLoss,
                 cfg: TrainSection, par: "Parallel", share: bool, pad_id: int) -> list[tuple[dict, bool]]:
    """This process's forward passes of one optimizer step, as (batch, real): a process whose share
    of a short last micro-batch is empty runs one example with weight 0, so that every process
    takes part in the gradient synchronisation."""
    from glotkit.train.distributed import share_of

    passes = []
    for mb in micro_batches:
        mine = share_of(mb, par.rank, par.world)
        rows = build_rows([examples[i] for i in mine or mb[:1]], share_prefix=share, max_row=cfg.max_tokens_per_forward)
        row_len = [len(r.input_ids) for r in rows]
        for chunk in split_by_tokens(list(range(len(rows))), row_len, cfg.max_tokens_per_forward):
            passes.append((loss_fn.collate([rows[i] for i in chunk], pad_id), bool(mine)))
    if par.sharded:  # each pass gathers the shards: every process makes as many
        most = par.most(len(passes))
        while len(passes) < most:
            passes.append((loss_fn.collate(build_rows([examples[micro_batches[0][0]]])[:1], pad_id), False))
    return passes


def _forward_backward(passes: list[tuple[dict, bool]], loss_fn: SupervisedLoss, wrapped,
                      par: "Parallel") -> tuple[float, int, int, int]:
    """The gradients of one optimizer step, every supervised token of every pass and process
    weighted the same -> (this process's summed loss; supervised, written and computed tokens
    of all processes)."""
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
    return step_loss, n_sup, n_tok, n_comp


def train(
    model,
    examples: Sequence[Encoded],
    cfg: TrainSection,
    *,
    seed: int,
    work_dir: Path,
    pad_id: int,
    device: str = "cpu",
    log: Callable[[str], None] = say,
    progress: bool = True,
    stop_after: int | None = None,
    parallel: "Parallel | None" = None,
    on_epoch: Callable[[int, int], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train the model's trainable parameters (the LoRA adapter) on ``examples``.

    ``work_dir`` holds the checkpoint and the loss log; if it has a checkpoint the run resumes
    from it.  ``stop_after`` ends the loop early after that many steps (for tests of resume).
    With ``parallel`` (the processes of an ``accelerate launch``) each micro-batch is split
    between the processes and only process 0 writes; the steps are those of one process.
    ``on_epoch(epoch, step)`` is called at the end of each whole epoch (1-based), after a
    checkpoint is saved there and with the model in eval mode (a dev evaluation: an interrupted
    one is called again on resume, so it must skip what it has done); single process only.
    ``on_log(record)`` gets each step's record (loss, lr, tokens, seconds, tokens/s, peak memory)
    as it is made (experiment tracking); on process 0 only.
    """
    from tqdm.auto import tqdm

    from glotkit.train.distributed import Parallel, check_split

    par = parallel or Parallel()
    check_split(cfg.batch_size, par.world)
    if not par.is_main:
        log, progress = (lambda msg: None), False
    work_dir = Path(work_dir)
    if par.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + par.rank)  # dropout masks differ between processes
    epoch_ends: list[int] = []
    steps, keys = _plan(examples, cfg, seed, epoch_ends)
    total = len(steps)
    if on_epoch is not None and par.world > 1:
        raise GlotkitError("an evaluation after each epoch needs a single process (not a launch)")
    _prepare_model(model, cfg)

    loss_fn = SupervisedLoss(model)
    run, resumed = _restore(work_dir / CHECKPOINT, model, total, par, log)
    if resumed is None:
        loss_fn.self_check(examples[steps[0][0][0]], log)
    share = keys is not None and loss_fn.check_sharing([examples[i] for mb in steps[0] for i in mb], pad_id, log)
    wrapped = _LossModule(model, loss_fn) if par.world > 1 else None
    if par.sharded:  # before the optimizer, which must hold the sharded parameters
        par.shard(wrapped, model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device, log)
    scheduler = make_scheduler(optimizer, cfg, total)
    if resumed is not None:
        par.load_optimizer_state(model, optimizer, resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        del resumed
    checkpoint = _Checkpoint(work_dir / CHECKPOINT, total, par, model, optimizer, scheduler, log)
    if par.world > 1:
        wrapped, optimizer = par.prepare(wrapped, optimizer)

    model.train()
    reset_peak(device)
    start_step = run.step
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    rng_at_step = torch.get_rng_state()
    t0 = time.perf_counter() - run.elapsed
    end = total if stop_after is None else min(total, start_step + stop_after)
    in_update = agreed = False
    interrupt = _DeferredInterrupt(log)

    def epoch_done() -> None:
        """The hook at an epoch's end, after the checkpoint there (an interrupted evaluation is
        redone on resume, never the training before it); its time is not training time."""
        nonlocal t0
        if on_epoch is None or run.step not in epoch_ends:
            return
        checkpoint.save(run, rng_at_step)
        began = time.perf_counter()
        model.eval()
        try:
            on_epoch(epoch_ends.index(run.step) + 1, run.step)
        finally:
            model.train()
            t0 += time.perf_counter() - began

    try:
        with interrupt:
            if run.step == start_step and start_step > 0:
                epoch_done()  # resumed where an epoch ended: its evaluation may not have finished
            while run.step < end:
                passes = _step_passes(steps[run.step], examples, loss_fn, cfg, par, share, pad_id)
                step_loss, n_sup, n_tok, n_comp = _forward_backward(passes, loss_fn, wrapped, par)
                # (with the loss, whether any process was asked to stop: they stop after the same step)
                step_loss, stop = par.sum([step_loss, float(interrupt.asked)])
                run.tokens += n_tok
                run.compute_tokens += n_comp
                run.supervised_tokens += n_sup
                if cfg.max_grad_norm:
                    par.clip_grad_norm_(params, cfg.max_grad_norm)
                in_update = True
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                run.step += 1
                rng_at_step = torch.get_rng_state()
                in_update = False
                run.elapsed = time.perf_counter() - t0
                loss = step_loss / max(n_sup, 1)
                if not math.isfinite(loss):
                    raise GlotkitError(f"training diverged at step {run.step}: loss is {loss}; lower train.lr (now {cfg.lr})")
                run.log.append({"step": run.step, "loss": round(loss, 6), "lr": lr, "tokens": run.tokens,
                                "seconds": round(run.elapsed, 3)})
                if on_log is not None and par.is_main:
                    on_log(run.log[-1] | {"tokens_per_s": run.tokens / max(run.elapsed, 1e-9),
                                          "supervised_tokens": run.supervised_tokens} | peak_memory(device))
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{run.tokens / max(run.elapsed, 1e-9):.0f}", refresh=False)
                bar.update(1)
                if run.step % cfg.checkpoint_every == 0 and run.step < total:
                    checkpoint.save(run, rng_at_step)
                epoch_done()
                if stop:
                    agreed = True
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        if not in_update and run.step > start_step:
            optimizer.zero_grad(set_to_none=True)
            if checkpoint.save(run, rng_at_step, together=agreed):
                log(f"interrupted: checkpoint saved at step {run.step}/{total}")
        raise
    bar.close()
    if run.step < total:  # stopped early on purpose (tests)
        checkpoint.save(run, rng_at_step)
    elif par.is_main:
        atomic_write_jsonl(work_dir / "log.jsonl", run.log)
    elapsed = time.perf_counter() - t0
    return TrainResult(
        steps=run.step,
        examples=len(examples),
        tokens=run.tokens,
        supervised_tokens=run.supervised_tokens,
        seconds=round(elapsed, 2),
        tokens_per_s=round(run.tokens / max(elapsed, 1e-9), 1),
        supervised_tokens_per_s=round(run.supervised_tokens / max(elapsed, 1e-9), 1),
        final_loss=run.log[-1]["loss"] if run.log else None,
        memory=peak_memory(device),
        fast_loss=loss_fn.fast,
        shared_prefix=share,
        computed_tokens=run.compute_tokens,
        processes=par.world,
        log=run.log,
    )


def train_adapter(peft_model, examples: Sequence[Encoded], cfg: TrainSection, *, what: str, out: Path, work_dir: Path,
                  seed: int, pad_id: int, device: str = "cpu", log: Callable[[str], None] = say,
                  progress: bool = True, info: dict | None = None, parallel: "Parallel | None" = None,
                  on_epoch: Callable[[int, int], None] | None = None, tokenizer=None,
                  on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a LoRA adapter, save it to ``out`` (a PEFT folder; a plain model trained whole — full
    fine-tuning — is saved there as a Hugging Face folder with ``tokenizer``), write ``work_dir/result.json``
    (the run's figures, the trainable-parameter count and ``info``) and drop the checkpoint: one
    adapter, one call, for every system.  With ``parallel`` (the processes of a launch) every
    process trains, a sharded adapter is gathered whole, and process 0 alone writes."""
    from glotkit.io import atomic_write_json
    from glotkit.models.lora import count_trainable, save_adapter, save_full, save_initial

    params = count_trainable(peft_model)
    log(f"{what}: {len(examples)} examples; {params.line()}")
    init = str(getattr(peft_model.peft_config.get("default"), "init_lora_weights", "")) \
        if hasattr(peft_model, "peft_config") else ""
    initial = Path(work_dir) / "initial-adapter" if init.startswith(("pissa", "olora")) else None
    if initial is not None and (parallel is None or parallel.is_main):
        save_initial(peft_model, initial)  # PiSSA/OLoRA: the saved adapter is converted for the original base
    result = train(peft_model, examples, cfg, seed=seed, work_dir=work_dir, pad_id=pad_id, device=device, log=log,
                   progress=progress, parallel=parallel, on_epoch=on_epoch, on_log=on_log)
    whole = parallel.trainable_state(peft_model) if parallel is not None and parallel.sharded else None  # every process
    if parallel is not None and not parallel.is_main:
        return result
    if hasattr(peft_model, "peft_config"):
        save_adapter(peft_model, out, state=whole, initial=initial)
    else:  # full fine-tuning: the whole model
        if whole is not None:
            raise GlotkitError("finetune: full with sharded training (FSDP) is not supported yet; use DDP")
        save_full(peft_model, out, tokenizer)
    summary = result.to_dict()
    summary.pop("log")
    counts = {"trainable_params": params.trainable, "all_params": params.total,
              "trainable_percent": round(params.percent, 4), "trainable_line": params.line()}
    atomic_write_json(Path(work_dir) / "result.json", summary | counts | (info or {}))
    (Path(work_dir) / CHECKPOINT).unlink(missing_ok=True)
    previous_checkpoint(Path(work_dir) / CHECKPOINT).unlink(missing_ok=True)
    peak = (result.memory or {}).get("peak_rss_mb")
    log(f"{what}: {result.steps} steps in {result.seconds:.0f}s, {result.tokens_per_s:.0f} tokens/s, "
        f"final loss {result.final_loss}" + (f", peak RSS {peak:.0f} MB" if peak else ""))
    return result
