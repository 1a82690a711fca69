"""Generation, whichever backend runs it: one interface, :class:`Generator`.

    local.py   LocalGenerator: the model loaded in this process, one of its LoRA adapters active
               or all switched off; option log-likelihoods with the prompt computed once
    decode.py  its decoding loop: batches by a token budget, shared prompt prefixes computed once,
               finished rows leaving the batch; greedy or seeded sampling
    server.py  ServerGenerator: a model on an OpenAI-compatible server (vLLM, TGI, llama.cpp's
               server), sent the same prompts as text

A stage asks :func:`for_role` for the generator of a model role ('base', 'tuned', 'positive',
'teacher', ...) and never asks which backend it got: the served model of that role with
``generate.backend: openai``, the local one otherwise.  Prompts are token ids (what the local
model reads); the server backend sends their text, or ``texts`` where the caller has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

OnBatch = Callable[[list[int], list[str]], None]  # (indices of the prompts, their texts) as each batch ends


@dataclass
class Generations:
    """Texts in the prompts' order and the number of tokens generated for them."""

    texts: list[str]
    new_tokens: int


class Generator(Protocol):
    """A model that continues prompts and scores options."""

    tokenizer: Any
    backend: str  # "local", or "openai URL MODEL" (recorded beside results)

    def greedy(self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
               stop: Sequence[str] | None = ("\n",), texts: Sequence[str] | None = None, progress: bool = True,
               desc: str = "generate", on_batch: OnBatch | None = None) -> Generations:
        """Greedy continuations, cut before the first stop string."""

    def sample(self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
               temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
               stop: Sequence[str] | None = ("\n",), keep_stop: bool = False, texts: Sequence[str] | None = None,
               progress: bool = True, desc: str = "generate", on_batch: OnBatch | None = None) -> Generations:
        """Seeded sampling (``temperature=0``: greedy, in the loop where finished rows leave the batch)."""

    def option_logliks(self, prompts: Sequence[list[int]], options: Sequence[str], *, batch_size: int = 8,
                       texts: Sequence[str] | None = None, progress: bool = True,
                       desc: str = "loglik") -> list[list[float]]:
        """Sum of the log-probabilities of each option's tokens after each prompt."""


def for_role(cfg, role: str, local: Callable[[], Generator] | None, *, tokenizer, log: Callable[[str], None],
             what: str, optional: bool = False) -> Generator:
    """The generator of model ``role``: with ``cfg.backend`` 'openai' the server's model of that
    role (checked to be served), else ``local()``.  An ``optional`` role without a served name
    answers locally (and says so)."""
    if cfg.backend == "openai" and (role in cfg.models or not optional):
        from glotkit.generate.server import ServerGenerator

        return ServerGenerator.connect(cfg, role, log, what, tokenizer=tokenizer)
    if cfg.backend == "openai":
        log(f"{what}: no generate.models.{role}: that model answers locally")
    if local is None:
        raise ValueError(f"{what}: no local model for role '{role}'")
    gen = local()
    return gen.configure(cfg) if hasattr(gen, "configure") else gen


def served(cfg, role: str, optional: bool = False) -> bool:
    """Whether ``role``'s model answers from a server (so no local model need be loaded for it)."""
    return cfg.backend == "openai" and (role in cfg.models or not optional)
