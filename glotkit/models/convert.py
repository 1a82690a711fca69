"""Turn a registry model's GGUF file into a normal Hugging Face folder in the cache.

transformers reads GGUF and dequantizes it to fp32, but a model loaded that way refuses
``save_pretrained``; so we rebuild a plain model of the same class from its config, load the
state dict, and save safetensors.  The GGUF's sha256 is checked before it is parsed, and the
folder is written to a temporary name and renamed only when complete, so an interrupted
conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from glotkit.errors import GlotkitError
from glotkit.logs import say
from glotkit.models.registry import BuiltinModel

MANIFEST = "glotkit-manifest.json"


def cache_dir() -> Path:
    """Where converted models live: ``$GLOTKIT_CACHE`` or ``~/.cache/glotkit``."""
    root = os.environ.get("GLOTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "glotkit")
    return Path(root)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_folder(folder: Path) -> bool:
    """True when the folder's manifest exists and every listed file has its recorded hash."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False  # a damaged manifest: the folder is converted again
    for name, expected in files.items():
        f = folder / name
        if not f.is_file() or sha256_file(f) != expected:
            return False
    return True


def ensure_converted(model: BuiltinModel, log=say) -> Path:
    """Return the Hugging Face folder for a built-in model, converting it on first use."""
    folder = cache_dir() / "models" / model.name
    if folder.is_dir():
        if _verify_folder(folder):
            return folder
        log(f"cached model at {folder} failed its checksum; converting again")
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log(f"first use of '{model.name}': assembling and converting to {folder} (about a minute)")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{model.name}.") as tmp:
        tmp_path = Path(tmp)
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        gguf_path = gguf_dir / "model.gguf"
        model.write_gguf(gguf_path)
        actual = sha256_file(gguf_path)
        if actual != model.gguf_sha256:
            raise GlotkitError(
                f"{model.package}: assembled GGUF sha256 {actual} != expected {model.gguf_sha256}; "
                "refusing to load it"
            )
        out = tmp_path / "hf"
        _gguf_to_hf(gguf_dir, gguf_path.name, out)
        files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
        (out / MANIFEST).write_text(
            json.dumps(
                {"source": model.package, "gguf_sha256": actual, "files": files}, indent=2
            )
        )
        os.replace(out, folder)
    log(f"converted '{model.name}' in {time.time() - started:.0f}s")
    return folder


def _gguf_to_hf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied weights (lm_head = embeddings) may be absent from the state dict; anything else is a bug.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise GlotkitError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    del loaded
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    tokenizer.save_pretrained(out)
