"""Load a causal LM and its tokenizer from a registry name, a local folder or a hub id.

A local folder is checked before transformers sees it (:mod:`glotkit.models.safety`: safetensors
only, headers that fit the files, no model code unless ``model.trust_remote_code``); a name that
looks like a path but names no folder is "folder not found" at once, never a hub request; a hub id
is read from the local cache only when the hub is unreachable or ``HF_HUB_OFFLINE`` is set.
Whatever goes wrong is one :class:`GlotkitError` line.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from glotkit.config import ModelSection
from glotkit.errors import GlotkitError
from glotkit.logs import say
from glotkit.models.convert import ensure_converted
from glotkit.models.registry import BUILTIN_MODELS
from glotkit.models.safety import check_remote_code, check_weights
from glotkit.models.safety import first_line as _first_line

_TRUE = {"1", "ON", "YES", "TRUE"}


def _looks_like_path(name: str) -> bool:
    """A name meant as a local folder: ``./x``, ``/x``, ``~/x``, ``a/b/c``, or ``d/x`` where ``d`` is a local folder."""
    if name.startswith((".", "/", "~", os.sep)) or Path(name).is_absolute():
        return True
    parts = name.replace(os.sep, "/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def resolve_model_path(name: str, log=say) -> str:
    """Registry name -> converted cache folder; local folder -> itself (checked); else a hub id."""
    if name in BUILTIN_MODELS:
        return str(ensure_converted(BUILTIN_MODELS[name], log=log))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GlotkitError(f"model.name: {path}: is a file; give a Hugging Face model folder "
                               "(config.json and model.safetensors)")
        if not (path / "config.json").is_file():
            raise GlotkitError(f"{path}: not a Hugging Face model folder (no config.json)")
        check_weights(path)
        return str(path)
    if _looks_like_path(name):
        raise GlotkitError(f"model.name: {name}: folder not found (looked at {path.absolute()})")
    if name.count("/") == 1 and all(name.split("/")):
        return name  # a hub id; transformers fetches it where a network exists
    known = ", ".join(BUILTIN_MODELS)
    raise GlotkitError(f"model.name: '{name}' is not a built-in model ({known}), a folder, or a hub id")


def _offline_env() -> bool:
    import huggingface_hub.constants as hub

    return bool(hub.HF_HUB_OFFLINE) or any(
        (os.environ.get(k) or "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens (True when a proxy is set: the library must try)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or
                                       (80 if url.scheme == "http" else 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_kwargs(path: str) -> dict:
    """``local_files_only`` for a hub id when offline, so that no request is retried for a minute."""
    if os.path.isdir(path) or not (_offline_env() or not _hub_reachable()):
        return {}
    return {"local_files_only": True}


def _load_error(err: BaseException, name: str, path: str) -> GlotkitError:
    """One line for an error transformers raised while loading ``path`` (the folder or hub id of ``name``)."""
    text = str(err)
    if "trust_remote_code" in text:
        return GlotkitError(f"{path}: the model needs its own code; set model.trust_remote_code: true to let "
                            "transformers run the Python files that come with it (they can do anything, so it is off by "
                            "default for safety)")
    if "use_safetensors" in text:
        return GlotkitError(f"model.name: '{name}' has no safetensors weights; glotkit loads safetensors only (a pickle "
                            "can run code when it is loaded)")
    if type(err).__name__ == "SafetensorError":
        return GlotkitError(f"{path}: a safetensors file is truncated or corrupt ({_first_line(err)})")
    if not os.path.isdir(path):
        return GlotkitError(f"model.name: '{name}' is not a local folder and could not be fetched from the hub: "
                            f"{_first_line(err)}")
    return GlotkitError(f"model.name: could not load '{name}': {_first_line(err)}")


def _check_folder(path: str, cfg: ModelSection) -> None:
    if os.path.isdir(path):
        check_remote_code(path, cfg.trust_remote_code)


def pick_device(spec: str = "auto") -> str:
    """``auto`` -> the GPU when there is one, else cpu; a named device must exist on this machine."""
    import torch

    if spec == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        # in a multi-process launch each process has its own GPU
        return f"cuda:{os.environ['LOCAL_RANK']}" if os.environ.get("LOCAL_RANK") else "cuda"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise GlotkitError(f"model.device: '{spec}' is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cpu":
        return spec
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n and (dev.index is None or dev.index < n):
            return spec
        why = (f"this torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible" if not n else f"this machine has {n} CUDA GPU{'s' if n > 1 else ''}")
    elif dev.type == "mps":
        if torch.backends.mps.is_available():
            return spec
        why = "MPS (Apple GPU) is not available here"
    else:
        backend = getattr(torch, dev.type, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return spec
        why = f"no {dev.type} device is available here"
    raise GlotkitError(f"model.device: '{spec}' is not available ({why}); available: {', '.join(available_devices())}"
                       " (auto picks the GPU when there is one)")


def available_devices() -> list[str]:
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def pick_dtype(spec: str, device: str):
    """fp32 on CPU, bf16 on CUDA, unless the recipe says otherwise."""
    import torch

    if spec == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec)


def load_tokenizer(path: str, cfg: ModelSection):
    from transformers import AutoTokenizer

    _check_folder(path, cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **_hub_kwargs(path)
        )
    except (OSError, ValueError) as err:
        raise _load_error(err, cfg.name, path) from None
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
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    device = pick_device(cfg.device)
    path = resolve_model_path(cfg.name, log=log)
    dtype = pick_dtype(cfg.dtype, device)
    quant = quantization_config(cfg, dtype)
    tokenizer = load_tokenizer(path, cfg)
    hub = _hub_kwargs(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            use_safetensors=True,  # never unpickle: a pickle can run code (safety.check_weights says so for folders)
            attn_implementation="sdpa",
            quantization_config=quant,
            device_map={"": device} if quant is not None else None,
            **hub,
            # transformers does not pass local_files_only on to its adapter lookup, which then retries the hub
            **({"adapter_kwargs": dict(hub)} if hub else {}),
        )
    except (OSError, ValueError, SafetensorError) as err:
        raise _load_error(err, cfg.name, path) from None
    if quant is None:
        model.to(device)
    elif device == "cpu":
        keep_4bit_trainable(model)
        release_file_mapping(model)
    return model, tokenizer, device


def keep_4bit_trainable(model) -> int:
    """Stop bitsandbytes from switching 4-bit weights to its CPU inference layout; returns the
    number of layers touched.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight the first time the
    layer runs in eval mode without gradients (an evaluation pass) and keeps it so; from then on
    its forward is an op with no backward, and gradients through the frozen 4-bit layers are
    silently wrong.  Measured: after one evaluation pass, the LoRA gradients of layer 0 of a
    4-bit model differed 100 % from those of the same weights dequantized to fp32 (equal without
    the pass) — QLoRA trained only the adapters whose output joins the residual stream directly.
    glotkit evaluates the base model before training, so the repacking is switched off."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def release_file_mapping(model) -> int:
    """Copy the tensors that still point into the memory-mapped weights file into the process's own
    memory, so that the mapping closes; returns the bytes copied.

    Loading a 4-bit model on CPU reads every full-precision weight through the safetensors file
    mapping to quantize it; the unquantized tensors (Gemma's 262k-row embedding: 640 of its
    1023 MB) stay views into that mapping, which keeps it open — and with it every page of the
    file read so far, the full-precision linear weights included, counted in resident memory.
    Measured on Gemma 3 270M in NF4: file-backed RSS 1139 MB after loading, 116 MB after this."""
    import ctypes
    import gc

    import torch

    regions = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    regions.append((lo, hi))
    except OSError:
        return 0  # not Linux: nothing known to release
    if not regions:
        return 0
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is None or t.device.type != "cpu":
                        continue
                    ptr = t.untyped_storage().data_ptr()
                    if any(lo <= ptr < hi for lo, hi in regions):
                        t.data = t.data.clone()
                        copied += t.numel() * t.element_size()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return copied
