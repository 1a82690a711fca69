"""Contrastive training of sentence-embedding models on triplets (the models themselves are
loaded by :mod:`glotkit.models.encoders`).

Training is sentence-transformers' own: ``MultipleNegativesRankingLoss`` (InfoNCE over the
in-batch positives plus each anchor's hard negative; ``scale`` 20 = temperature 0.05) or
``CachedMultipleNegativesRankingLoss`` (GradCache: large batches in bounded memory), with the
no-duplicates batch sampler so that a text never appears twice in one batch (it would be its own
false negative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from glotkit.errors import GlotkitError
from glotkit.logs import say


@dataclass
class EmbedTrainResult:
    steps: int
    seconds: float
    examples: int
    final_loss: float | None
    log: list[dict]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def train_embeddings(model, triplets: Sequence[dict], out_dir: Path, *, epochs: int = 1, batch_size: int = 32,
                     lr: float = 2e-5, warmup_ratio: float = 0.1, scale: float = 20.0, cached: bool = False,
                     mini_batch_size: int = 16, seed: int = 42, prompt: str | None = None,
                     max_steps: int | None = None, progress: bool = True,
                     log: Callable[[str], None] = say) -> EmbedTrainResult:
    """Contrastive training on (anchor, positive, hard_negative) triplets; saves the model to
    ``out_dir`` (a sentence-transformers folder).  Checkpoints go to ``out_dir.parent/checkpoints``
    and an interrupted run resumes from the last one."""
    import time

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    if len(triplets) < 2:
        raise GlotkitError(f"embedding training needs at least 2 triplets, got {len(triplets)}")
    if batch_size < 2:
        raise GlotkitError("embed.batch_size: in-batch negatives need a batch of at least 2")
    bs = min(batch_size, len(triplets))
    ds = Dataset.from_dict({"anchor": [t["anchor"] for t in triplets], "positive": [t["positive"] for t in triplets],
                            "negative": [t["hard_negative"] for t in triplets]})
    if cached:
        loss = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=mini_batch_size)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=scale)
    ckpt = Path(out_dir).parent / "checkpoints"
    steps_per_epoch = max(1, len(triplets) // bs)
    total = max_steps or steps_per_epoch * epochs
    args = SentenceTransformerTrainingArguments(
        output_dir=str(ckpt), num_train_epochs=epochs, max_steps=max_steps or -1, per_device_train_batch_size=bs,
        learning_rate=lr, warmup_steps=math.ceil(warmup_ratio * total), seed=seed, data_seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, report_to="none", use_cpu=not _cuda(),
        save_strategy="steps", save_steps=max(1, total // 4), save_total_limit=1, logging_steps=1,
        disable_tqdm=not progress, prompts=prompt or None, dataloader_drop_last=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the loss goes to the history, not to stdout per step
    last = _last_checkpoint(ckpt)
    if last:
        log(f"resuming embedding training from {last}")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.perf_counter() - t0
    if trainer.state.global_step == 0:
        raise GlotkitError(f"embedding training made no step: {len(triplets)} triplets give no batch of {bs} "
                           "without repeated texts; lower embed.batch_size or add triplets")
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    import shutil

    tmp = Path(out_dir).with_name(Path(out_dir).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(str(tmp))
    except BaseException:  # a full disk: no half-written folder is left to fill it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if Path(out_dir).exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return EmbedTrainResult(trainer.state.global_step, round(seconds, 1), len(triplets),
                            history[-1]["loss"] if history else None, history)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _last_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    cks = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                 key=lambda p: int(p.name.split("-")[-1]))
    return cks[-1] if cks else None


def read_triplets(path: Path) -> list[dict]:
    from glotkit.io import iter_jsonl_objects

    out = []
    for lineno, rec in iter_jsonl_objects(path):
        missing = [k for k in ("anchor", "positive", "hard_negative") if not str(rec.get(k) or "").strip()]
        if missing:
            raise GlotkitError(f"{path}: line {lineno}: missing field '{missing[0]}'")
        out.append(rec)
    return out

