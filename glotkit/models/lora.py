"""LoRA adapters through PEFT: validated target modules and PEFT's own parameter count."""

from __future__ import annotations

from dataclasses import dataclass

from glotkit.config import LoraSection
from glotkit.errors import GlotkitError


def linear_layer_names(model) -> list[str]:
    """The distinct leaf names of the model's linear layers (what ``target_modules`` can name)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


@dataclass
class TrainableParams:
    """Trainable and total parameters exactly as PEFT counts them (adapter included in total)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        # The same wording and precision as PEFT's print_trainable_parameters().
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def apply_lora(model, cfg: LoraSection):
    """Wrap ``model`` with a fresh LoRA adapter described by ``cfg``."""
    from peft import LoraConfig, get_peft_model

    available = linear_layer_names(model)
    targets = cfg.target_modules
    if targets != "all-linear":
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise GlotkitError(
                f"lora.target_modules: unknown module {unknown[0]!r}; this model's linear layers are: "
                + ", ".join(available)
            )
    extra = {}
    if cfg.modules_to_save:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in cfg.modules_to_save if m not in names]
        if missing:
            raise GlotkitError(f"lora.modules_to_save: this model has no module {missing[0]!r}")
        extra["modules_to_save"] = list(cfg.modules_to_save)
    if cfg.trainable_tokens:
        vocab = model.get_input_embeddings().num_embeddings
        if cfg.trainable_tokens[-1] >= vocab:
            raise GlotkitError(f"lora.trainable_tokens: id {cfg.trainable_tokens[-1]} is outside the vocabulary "
                               f"({vocab} rows)")
        extra["trainable_token_indices"] = list(cfg.trainable_tokens)
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.resolved_alpha(),
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        **extra,
    )
    if cfg.use_dora and cfg.changes_base():
        raise GlotkitError(f"lora.init: {cfg.init} with lora.use_dora is not supported by PEFT's conversion; choose one")
    return get_peft_model(model, peft_cfg)


def save_initial(peft_model, out_dir) -> None:
    """Keep the adapter as initialised (PiSSA, OLoRA), for converting the trained one to plain
    LoRA of the original base model when it is saved (PEFT's own conversion)."""
    from pathlib import Path

    out_dir = Path(out_dir)
    if (out_dir / "adapter_config.json").is_file():
        return  # kept from the first start; a resumed run initialises the same way
    cfg = peft_model.peft_config["default"]
    was = cfg.init_lora_weights
    cfg.init_lora_weights = True  # what PEFT expects of the initial adapter's config
    try:
        save_adapter(peft_model, out_dir)
    finally:
        cfg.init_lora_weights = was


def trainable(model, finetune: str, cfg: LoraSection):
    """The model made trainable: a fresh LoRA adapter (``finetune: lora``), or every weight
    (``full``; a quantized model cannot be fully fine-tuned)."""
    if finetune == "lora":
        return apply_lora(model, cfg)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False):
        raise GlotkitError("finetune: full cannot train a quantized model (model.quantization: nf4); "
                           "use finetune: lora (QLoRA)")
    model.requires_grad_(True)
    return model


def count_trainable(peft_model) -> TrainableParams:
    if not hasattr(peft_model, "get_nb_trainable_parameters"):  # a plain model (full fine-tuning)
        params = list(peft_model.parameters())
        return TrainableParams(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return TrainableParams(trainable=int(trainable), total=int(total))


def save_full(model, out_dir, tokenizer=None) -> None:
    """A fully fine-tuned model as a Hugging Face folder (safetensors), written atomically."""
    import os
    import shutil
    from pathlib import Path

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def save_adapter(peft_model, out_dir, state: dict | None = None, initial=None) -> None:
    """Write the adapter in PEFT format, atomically (temporary folder, then rename).

    The adapter's tensors are handed to PEFT explicitly rather than letting it call
    ``model.state_dict()``: with bitsandbytes 0.50 on CPU, ``state_dict()`` of a 4-bit model
    after training corrupts the quantized weights in memory (measured: held-out loss 5.36 -> 25.8),
    so the tuned evaluation that follows would be wrong.  ``state``: the trainable tensors when
    the model's own are sharded between processes (gathered by the caller).  ``initial``: the
    folder :func:`save_initial` wrote (PiSSA, OLoRA): the adapter is saved converted for the
    original base model.
    """
    import os
    import shutil
    from pathlib import Path

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if initial is not None and state is not None:
        raise GlotkitError("lora.init: pissa/olora adapters cannot be converted from sharded training; "
                           "use lora.init: default with FSDP")
    if state is None:
        state = {k: v.detach() for k, v in peft_model.named_parameters() if v.requires_grad}
    try:
        if initial is not None:
            # PEFT's conversion reads the initial adapter through the model's own state dict (a
            # given one would stand for both the trained and the initial weights)
            peft_model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(initial))
        else:
            peft_model.save_pretrained(tmp, state_dict=state)
    except BaseException:  # a full disk: no half-written folder is left to fill it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
