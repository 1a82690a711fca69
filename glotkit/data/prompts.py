"""Prompts: how a QA example becomes token ids, for training and for generation.

Training and generation use the *same* prompt: the training input is ``prompt ids + target ids``
with labels only on the target, and generation starts from exactly the prompt ids.  The prompt
is tokenized with the tokenizer's special tokens (BOS for Gemma/Llama) and the target without,
so the model learns to continue the prompt the way it is asked to at evaluation time.
"""

from __future__ import annotations

from dataclasses import dataclass

from glotkit.config import PromptSection
from glotkit.data.qa import QAExample

IGNORE = -100


@dataclass
class Encoded:
    """One training example: ``labels`` is ``IGNORE`` on the prompt and the ids on the target."""

    input_ids: list[int]
    labels: list[int]
    group: str | None = None  # examples of one group (same context) may share their prompt prefix

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class EncodeStats:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def line(self, max_length: int) -> str | None:
        if not (self.truncated or self.dropped):
            return None
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} had their context truncated")
        if self.dropped:
            parts.append(f"{self.dropped} were dropped")
        return (
            f"train.max_length={max_length}: of {self.total} training examples longer than that, "
            + " and ".join(parts)
        )


class PromptFormatter:
    """Render and tokenize prompts and targets for one model's tokenizer."""

    def __init__(self, cfg: PromptSection, tokenizer, chat_template: bool = False):
        self.cfg = cfg
        self.tok = tokenizer
        self.chat = bool(chat_template)
        if self.chat and not getattr(tokenizer, "chat_template", None):
            from glotkit.errors import GlotkitError

            raise GlotkitError("model.chat_template: true, but this model's tokenizer has no chat template")

    # -- text
    def prompt_text(self, ex: QAExample, context: str | None = None) -> str:
        text = self.cfg.template.format(context=ex.context if context is None else context, question=ex.question)
        if self.chat:
            return self.tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        return text

    def target_text(self, ex: QAExample) -> str:
        target = self.cfg.target.format(answer=ex.answer)
        return target.lstrip() if self.chat else target

    # -- ids
    def prompt_ids(self, ex: QAExample, context: str | None = None) -> list[int]:
        # A chat template already writes the special tokens into the text.
        return self.tok(self.prompt_text(ex, context), add_special_tokens=not self.chat)["input_ids"]

    def target_ids(self, ex: QAExample) -> list[int]:
        return self.tok(self.target_text(ex), add_special_tokens=False)["input_ids"]

    def encode_train(self, ex: QAExample, max_length: int, too_long: str, stats: EncodeStats) -> Encoded | None:
        """Prompt + target with prompt-masked labels; ``None`` when dropped as too long."""
        stats.total += 1
        target = self.target_ids(ex)
        prompt = self.prompt_ids(ex)
        if len(prompt) + len(target) > max_length:
            if too_long == "drop":
                stats.dropped += 1
                return None
            prompt = self._fit_context(ex, max_length - len(target))
            if prompt is None:
                stats.dropped += 1
                return None
            stats.truncated += 1
        stats.kept += 1
        return Encoded(prompt + target, [IGNORE] * len(prompt) + list(target), group=ex.context)

    def _fit_context(self, ex: QAExample, budget: int) -> list[int] | None:
        """Shorten the context (keeping a window around the answer) until the prompt fits."""
        context = ex.context
        for _ in range(12):
            ids = self.prompt_ids(ex, context)
            if len(ids) <= budget:
                return ids
            if len(context) < 20:
                return None
            keep = max(10, int(len(context) * min(0.9, budget / len(ids))))
            at = context.find(ex.answer)
            centre = at + len(ex.answer) // 2 if at >= 0 else 0
            start = max(0, min(centre - keep // 2, len(context) - keep))
            context = context[start : start + keep]
        return None
