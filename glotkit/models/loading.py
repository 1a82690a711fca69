"""Load a causal LM and its tokenizer from a registry name, a local folder or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from glotkit.config import ModelSection
from glotkit.errors import GlotkitError
from glotkit.logs import say
from glotkit.models.convert import ensure_converted
from glotkit.models.registry import BUILTIN_MODELS


def resolve_model_path(name: str, log=say) -> str:
    """Registry name -> converted cache folder; local folder -> itself; else a hub id."""
    if name in BUILTIN_MODELS:
        return str(ensure_converted(BUILTIN_MODELS[name], log=log))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise GlotkitError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; transformers fetches it where a network exists
    known = ", ".join(BUILTIN_MODELS)
    raise GlotkitError(f"model.name: '{name}' is not a built-in model ({known}), a folder, or a hub id")


def pick_device(spec: str = "auto") -> str:
    import torch

    if spec != "auto":
        return spec
    if not torch.cuda.is_available():
        return "cpu"
    # in a multi-process launch each process has its own GPU
    return f"cuda:{os.environ['LOCAL_RANK']}" if os.environ.get("LOCAL_RANK") else "cuda"


def pick_dtype(spec: str, device: str):
    """fp32 on CPU, bf16 on CUDA, unless the recipe says otherwise."""
    import torch

    if spec == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec)


def load_tokenizer(path: str, cfg: ModelSection):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_for(cfg: ModelSection, log=say):
    """The tokenizer of ``cfg.name`` (built-in, folder or hub id) without loading the weights."""
    return load_tokenizer(resolve_model_path(cfg.name, log=log), cfg)


def quantization_config(cfg: ModelSection, dtype):
    """A BitsAndBytesConfig for NF4, or None; a clear error when bitsandbytes is missing."""
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes
    except ImportError:
        raise GlotkitError(
            "model.quantization: nf4 needs bitsandbytes; install it with: pip install 'glotkit[quant]'"
        ) from None
    del bitsandbytes  # only its presence is checked here; transformers uses it
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(cfg: ModelSection, log=say):
    """Return ``(model, tokenizer, device)`` ready for training or generation."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name, log=log)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    quant = quantization_config(cfg, dtype)
    try:
        tokenizer = load_tokenizer(path, cfg)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            use_safetensors=True if os.path.isdir(path) else None,
            attn_implementation="sdpa",
            quantization_config=quant,
            device_map={"": device} if quant is not None else None,
        )
    except OSError as err:
        raise GlotkitError(f"model.name: could not load '{cfg.name}': {str(err).splitlines()[0]}") from None
    if quant is None:
        model.to(device)
    return model, tokenizer, device
