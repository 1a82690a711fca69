"""Cheap checks on a local model folder before transformers is handed it.

glotkit loads weights from safetensors only: a pickle (``pytorch_model.bin``) can run code when it
is unpickled, so a folder that has nothing else is refused with one line saying how to convert
it.  A truncated or corrupt ``*.safetensors`` file is found by its header (8-byte little-endian
length, a JSON table of tensors whose data offsets must exactly cover the rest of the file), and a
folder whose model needs its own Python code (``auto_map`` in config.json, a model type
transformers does not know) is refused unless ``model.trust_remote_code`` is on.  Each problem is
one :class:`GlotkitError` line naming the folder or file; nothing here imports torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from glotkit.errors import GlotkitError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "adapter_model.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
MAX_HEADER = 100 * 2**20  # safetensors itself refuses headers over 100 MB

_CONVERT_HINT = ("python -c \"from transformers import AutoModelForCausalLM as M; "
                 "M.from_pretrained('{src}', use_safetensors=False).save_pretrained('{src}-safetensors')\" "
                 "(only for a file you trust)")


def first_line(err: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's text (its class name when there is none), cut to ``limit``."""
    text = str(err).strip()
    line = next((s.strip() for s in text.splitlines() if s.strip()), "") or type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_safetensors(path: str | Path) -> None:
    """Raise one line naming ``path`` when its safetensors header does not describe the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise GlotkitError(f"{path}: truncated or corrupt safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise GlotkitError(f"{path}: truncated or corrupt safetensors file (header says {n:,} bytes of "
                                   f"metadata, the file has {size:,} bytes)")
            raw = fh.read(n)
    except OSError as err:
        raise GlotkitError(f"{path}: cannot be read ({err.strerror or first_line(err)})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        ends = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError(f"bad data offsets for tensor {name!r}")
            ends.append(end)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise GlotkitError(f"{path}: truncated or corrupt safetensors file (header unreadable: "
                           f"{first_line(err, 120)})") from None
    data = size - 8 - n
    need = max(ends, default=0)
    if need > data:
        raise GlotkitError(f"{path}: truncated or corrupt safetensors file (its tensors need {need:,} bytes of data, "
                           f"the file has {data:,}); download or copy it again")
    if need < data:
        raise GlotkitError(f"{path}: truncated or corrupt safetensors file ({data - need:,} bytes after the last "
                           "tensor)")


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors weight files: those its index names, else every top-level one."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
            raise GlotkitError(f"{index}: corrupt index ({first_line(err, 120)})") from None
        files = [folder / str(n) for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise GlotkitError(f"{index}: names {missing[0]}, which is not in {folder}"
                               + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return files
    return sorted(folder.glob("*.safetensors"))


def check_weights(folder: str | Path) -> None:
    """Refuse a folder whose only weights are pickles; check every safetensors header.

    Works for a model folder and for a PEFT adapter folder (``adapter_model.safetensors``)."""
    folder = Path(folder)
    files = safetensors_files(folder)
    if not files:
        pickles = sorted({p.name for pat in PICKLE_PATTERNS for p in folder.glob(pat) if p.is_file()})
        if (folder / "pytorch_model.bin.index.json").is_file() or pickles:
            shown = pickles[0] if pickles else "pytorch_model.bin.index.json"
            raise GlotkitError(f"{folder}: has only pickle weights ({shown}); glotkit loads safetensors only "
                               "(a pickle can run code when it is loaded) — convert it, e.g. "
                               + _CONVERT_HINT.format(src=str(folder).rstrip("/")))
        return  # no weights at all: transformers says so (and a tokenizer-only use needs none)
    for f in files:
        check_safetensors(f)


def read_config(folder: str | Path) -> dict:
    """``folder/config.json`` as a dict, or one line naming it."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GlotkitError(f"{folder}: not a Hugging Face model folder (no config.json)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise GlotkitError(f"{path}: not valid JSON ({first_line(err, 120)})") from None
    except OSError as err:
        raise GlotkitError(f"{path}: cannot be read ({err.strerror or first_line(err)})") from None
    if not isinstance(data, dict):
        raise GlotkitError(f"{path}: not a JSON object")
    return data


def check_remote_code(folder: str | Path, trust_remote_code: bool, key: str | None = "model.trust_remote_code") -> None:
    """Refuse, in one line, a folder whose model transformers can only build with the folder's own code.

    ``key`` names the setting that would allow it (None where there is none, as in trim-vocab)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(folder)
    config = read_config(folder)
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if known or trust_remote_code:
        return
    auto_map = config.get("auto_map")
    shown = f"'{model_type}'" if model_type else "(none)"
    if auto_map:
        allow = (f"set {key}: true to let transformers run the Python files that come with the model (they can do "
                 "anything, so it is off by default for safety)" if key
                 else "trim-vocab does not run a model's own Python files (they can do anything)")
        raise GlotkitError(f"{folder}: the model needs its own code (config.json auto_map, model type {shown} unknown "
                           f"to transformers {transformers.__version__}); {allow}")
    raise GlotkitError(f"{folder / 'config.json'}: model type {shown} is not known to transformers "
                       f"{transformers.__version__} (a newer transformers may know it)")


def unpickling_reason(err: BaseException) -> str:
    """The useful line of torch's weights-only refusal (which global or opcode), not its advice."""
    text = str(err)
    if not text.startswith("Weights only load failed"):
        return first_line(err, 160)
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith(skip)]
    lines = [s.removeprefix("WeightsUnpickler error:").strip() for s in lines]
    return next((s for s in lines if s), "not plain tensors")[:160]


def torch_load_weights(path: str | Path):
    """``torch.load`` with ``weights_only=True``; anything it refuses or cannot read is one line."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise GlotkitError(f"{path}: refused: not plain weights ({unpickling_reason(err)}); glotkit never "
                           "unpickles code") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise GlotkitError(f"{path}: truncated or corrupt weights file ({first_line(err, 160)})") from None
    except OSError as err:
        raise GlotkitError(f"{path}: cannot be read ({err.strerror or first_line(err)})") from None
