"""Generation on a model loaded in this process: :class:`LocalGenerator`, over the decoding loop
of :mod:`glotkit.generate.decode` (batches by a token budget, shared prompt prefixes computed
once, finished rows leaving the batch) and the option scoring of :mod:`glotkit.models.lm`.

A sequence stops once its generated text holds a stop string after some non-blank text (a
leading newline does not stop it: base models often start their answer on a new line); the text
is cut before the stop string.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from glotkit.generate.decode import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_ROWS, DecodeStats, cut_at_stop, decode

__all__ = ["LocalGenerator", "cut_at_stop", "generate_greedy", "generate_sampled"]


def generate_greedy(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
                    batch_tokens: int = 0, device: str = "cpu", stop: Sequence[str] | None = ("\n",),
                    progress: bool = True, desc: str = "generate",
                    on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """Greedy continuations of token-id prompts, cut before the first stop string (``stop=None``:
    only end-of-sequence and the length end them); at most ``batch_size`` prompts a batch, and
    with ``batch_tokens`` at most that many prompt + new tokens."""
    return decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop, batch_tokens=batch_tokens,
                  max_rows=batch_size, device=device, progress=progress, desc=desc, on_batch=on_batch)[0]


def generate_sampled(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
                     temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
                     stop: Sequence[str] | None = ("\n",), keep_stop: bool = False, batch_tokens: int = 0,
                     device: str = "cpu", progress: bool = True, desc: str = "generate",
                     on_batch: Callable[[list[int], list[str]], None] | None = None,
                     stats: DecodeStats | None = None, vocab: set[int] | None = None) -> tuple[list[str], int]:
    """Sampling (temperature, top-k, top-p; ``temperature=0`` is greedy); each prompt draws from
    its own generator, seeded with ``seed`` and its index.  Returns the texts (input order, cut
    before the stop string, or after it with ``keep_stop``) and the number of tokens generated."""
    return decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  top_k=top_k, seed=seed, stop=stop, keep_stop=keep_stop, batch_tokens=batch_tokens,
                  max_rows=batch_size, device=device, progress=progress, desc=desc, on_batch=on_batch, stats=stats,
                  vocab=vocab)


_VOCABS: dict[tuple, set[int]] = {}


def corpus_vocab(tokenizer, paths: Sequence[str]) -> set[int]:
    """The token ids the documents under ``paths`` use (read once per process and tokenizer)."""
    from glotkit.data.corpus import read_documents
    from glotkit.models.trim_vocab import used_ids

    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), tuple(paths))
    if key not in _VOCABS:
        _VOCABS[key] = used_ids(tokenizer, [d.text for d in read_documents(list(paths))])
    return _VOCABS[key]


class LocalGenerator:
    """The :class:`~glotkit.generate.Generator` of a model loaded in this process.  ``adapter``
    names the LoRA adapter to make active before each call (a PeftModel holding several);
    ``adapter_off`` runs the base model with its adapters switched off.  Switching adapters on
    and off for generation happens here and nowhere else."""

    backend = "local"

    def __init__(self, model, tokenizer, device: str = "cpu", *, adapter: str | None = None, adapter_off: bool = False,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, max_rows: int = DEFAULT_MAX_ROWS,
                 vocab: set[int] | None = None):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.adapter, self.adapter_off = adapter, adapter_off
        # generation batches: as many prompts as fit in batch_tokens (prompt + new tokens per row),
        # at most max_rows; batch_tokens 0: the caller's batch_size prompts a batch
        self.batch_tokens, self.max_rows = batch_tokens, max_rows
        self.stats = DecodeStats()  # what the generation calls of this generator did, summed
        # token ids generation may choose from (with the prompts' own and end-of-sequence), the LM
        # head computed on those rows only: restrict_vocab()
        self.vocab = vocab

    def configure(self, cfg) -> LocalGenerator:
        """Take the batch budget and the vocabulary corpus of a recipe's ``generate`` section."""
        self.batch_tokens, self.max_rows = cfg.batch_tokens, cfg.max_rows
        if getattr(cfg, "vocab_corpus", None):
            self.vocab = corpus_vocab(self.tokenizer, tuple(cfg.vocab_corpus))
        return self

    def restrict_vocab(self, texts: Sequence[str]) -> int:
        """Let generation choose only among the tokens ``texts`` use (a corpus of the language
        the model should write), the prompts' own tokens and end-of-sequence; returns their
        number.  Greedy text stays the same wherever the whole head's choice is among them."""
        from glotkit.models.trim_vocab import used_ids

        self.vocab = used_ids(self.tokenizer, texts)
        return len(self.vocab)

    def restrict_to_corpus(self, paths: Sequence[str]) -> int:
        """:meth:`restrict_vocab` to the documents under ``paths`` (files or folders)."""
        self.vocab = corpus_vocab(self.tokenizer, paths)
        return len(self.vocab)

    def _rows(self, batch_size: int) -> tuple[int, int]:
        return (self.batch_tokens, self.max_rows) if self.batch_tokens else (0, batch_size)

    @contextmanager
    def _active(self) -> Iterator[None]:
        if self.adapter_off and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
            return
        if self.adapter is not None:
            self.model.set_adapter(self.adapter)
        yield

    def greedy(self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
               stop: Sequence[str] | None = ("\n",), texts: Sequence[str] | None = None, progress: bool = True,
               desc: str = "generate", on_batch: Callable[[list[int], list[str]], None] | None = None):
        """Greedy continuations (``texts`` is for servers: unused)."""
        return self.sample(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=0.0, stop=stop,
                           progress=progress, desc=desc, on_batch=on_batch)

    def sample(self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
               temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
               stop: Sequence[str] | None = ("\n",), keep_stop: bool = False, texts: Sequence[str] | None = None,
               progress: bool = True, desc: str = "generate",
               on_batch: Callable[[list[int], list[str]], None] | None = None):
        """Seeded sampling (``temperature=0``: greedy)."""
        from glotkit.generate import Generations

        budget, rows = self._rows(batch_size)
        with self._active():
            out, produced = generate_sampled(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                             batch_size=rows, batch_tokens=budget, temperature=temperature,
                                             top_p=top_p, top_k=top_k, seed=seed, stop=stop, keep_stop=keep_stop,
                                             device=self.device, progress=progress, desc=desc, on_batch=on_batch,
                                             stats=self.stats, vocab=self.vocab)
        return Generations(out, produced)

    def option_logliks(self, prompts: Sequence[list[int]], options: Sequence[str], *, batch_size: int = 8,
                       texts: Sequence[str] | None = None, progress: bool = True,
                       desc: str = "loglik") -> list[list[float]]:
        """Each option (text, tokenized without special tokens) scored after each prompt, the
        prompt computed once for all its options where the model allows."""
        from glotkit.models.lm import option_logliks

        option_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        with self._active():
            return option_logliks(self.model, self.tokenizer, prompts, option_ids, batch_size, self.device)
