"""The prompt formats of the HIPE-2026 pair task, and how each one's answer is parsed.

A prompt shows the article (an excerpt of ``max_chars`` characters around the mentions when the
article is longer: see :func:`glotkit.hipe.data.excerpt`), its publication date, the person's and
the place's mentions and the two relation definitions, then asks for the answer in one format:

- ``json``            only a JSON object ``{"at": ..., "isAt": ...}``
- ``explain-json``    a short explanation after "Explanation:", then the JSON object after "Answer:"
- ``plain``           only two lines ``at: ...`` and ``isAt: ...``
- ``explain-plain``   an explanation, then the two lines

The model's turn begins with a cue ("Answer:" or "Explanation:") that we write ourselves; a model
with a chat template gets the question as the user's message and the cue at the start of its
reply.  The same functions build the training examples (teacher, student) and the evaluation
prompts, so training and evaluation cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glotkit.errors import GlotkitError
from glotkit.hipe.parse import AT_LABELS, ISAT_LABELS, VALID_LABELS, Parsed, parse_answer

FORMATS = ("json", "explain-json", "plain", "explain-plain")

DEFINITIONS = (
    "at: TRUE if the text shows the person was at the place at some time before the publication date, "
    "PROBABLE if it suggests so without saying it, FALSE otherwise.\n"
    "isAt: TRUE if the person was at the place within about a month before the publication date, FALSE otherwise."
)

_JSON_SHAPE = '{"at": "TRUE|PROBABLE|FALSE", "isAt": "TRUE|FALSE"}'
_PLAIN_SHAPE = 'two lines, "at: TRUE|PROBABLE|FALSE" and "isAt: TRUE|FALSE"'
_ASK = {
    "json": f"Answer only with a JSON object like {_JSON_SHAPE}.",
    "explain-json": "Explain briefly in one or two sentences after \"Explanation:\", then give the answer after "
                    f"\"Answer:\" as a JSON object like {_JSON_SHAPE}.",
    "plain": f"Answer only with {_PLAIN_SHAPE}.",
    "explain-plain": "Explain briefly in one or two sentences after \"Explanation:\", then give the answer after "
                     f"\"Answer:\" as {_PLAIN_SHAPE}.",
}


def check_format(fmt: str, where: str = "format") -> str:
    if fmt not in FORMATS:
        raise GlotkitError(f"{where}: unknown prompt format '{fmt}' (formats: {', '.join(FORMATS)})")
    return fmt


def explains(fmt: str) -> bool:
    return fmt.startswith("explain-")


def labels_text(at: str, is_at: str, fmt: str) -> str:
    if fmt.endswith("json"):
        return f'{{"at": "{at}", "isAt": "{is_at}"}}'
    return f"at: {at}\nisAt: {is_at}"


LAYOUTS = ("pair", "article", "marked", "facts")


def question(doc: dict, pair: dict, fmt: str, max_chars: int, layout: str = "pair") -> str:
    """The user's text for one pair.

    ``layout="pair"``: the excerpt around this pair's mentions, the pair, then the definitions
    and the request.  ``layout="article"``: the excerpt around the mentions of all the document's
    pairs, the definitions and the request, then the pair last — every pair of a document then
    starts with the same text, which training computes once per document (shared-prefix rows).
    ``layout="marked"``: the definitions and the request first (the same text for every pair: a
    shared prefix in training batches), then the excerpt centred where this pair's person and
    place come closest, its mentions marked (:func:`glotkit.hipe.data.marked_excerpt`), then the pair.
    ``layout="facts"``: as ``marked``, with one sentence after the excerpt of where the whole
    article mentions the pair (:func:`glotkit.hipe.data.mention_facts`)."""
    from glotkit.hipe.data import excerpt, marked_excerpt, mention_facts

    head = f"Article (published {doc.get('date') or 'at an unknown date'}):\n"
    pair_text = f"Person: {_mention(pair, 'pers_mentions_list')}\nPlace: {_mention(pair, 'loc_mentions_list')}"
    if layout == "article":
        mentions = [m for p in doc.get("sampled_pairs") or [pair]
                    for m in list(p["pers_mentions_list"]) + list(p["loc_mentions_list"])]
        return (f"{head}{excerpt(doc['text'], mentions, max_chars)}\n\n{DEFINITIONS}\n{_ASK[fmt]}\n\n"
                f"{pair_text}")
    if layout in ("marked", "facts"):
        text = marked_excerpt(doc["text"], pair["pers_mentions_list"], pair["loc_mentions_list"], max_chars)
        if layout == "facts":
            text += "\n\n" + mention_facts(doc["text"], pair["pers_mentions_list"], pair["loc_mentions_list"])
        return (f"{DEFINITIONS}\n{_ASK[fmt]}\n\n{head}{text}\n\n{pair_text}")
    if layout != "pair":
        raise GlotkitError(f"prompt layout: unknown '{layout}' (layouts: {', '.join(LAYOUTS)})")
    mentions = list(pair["pers_mentions_list"]) + list(pair["loc_mentions_list"])
    return f"{head}{excerpt(doc['text'], mentions, max_chars)}\n\n{pair_text}\n\n{DEFINITIONS}\n{_ASK[fmt]}"


def _mention(pair: dict, field: str) -> str:
    return " / ".join(" ".join(m.split()) for m in pair[field])


def rationalization(doc: dict, pair: dict, fmt: str, max_chars: int, layout: str = "pair") -> tuple[str, str, str]:
    """The question with the gold answer written at the start of the model's turn, followed by
    "Explanation: According to the article, <person>" for the model to go on: (user text, turn
    start, the explanation's first words).  Without that start a 270M model copies instructions
    or worked examples instead of explaining."""
    opening = f"According to the article, {' '.join(pair['pers_mentions_list'][0].split())}"
    return (question(doc, pair, fmt, max_chars, layout),
            f"Answer: {labels_text(pair['at'], pair['isAt'], fmt)}\nExplanation: {opening}", opening)


def cue(fmt: str) -> str:
    """What the model's turn starts with (written by us, not generated)."""
    return "Explanation:" if explains(fmt) else "Answer:"


def response(fmt: str, at: str, is_at: str, explanation: str | None = None) -> str:
    """The model's turn after the cue: the training target."""
    if explains(fmt):
        if not explanation:
            raise GlotkitError(f"format '{fmt}' needs an explanation for its training target")
        return f" {' '.join(explanation.split())}\nAnswer: {labels_text(at, is_at, fmt)}"
    return f" {labels_text(at, is_at, fmt)}"


@dataclass(frozen=True)
class Decoding:
    """How long the answer may be and where generation stops (the stop string is kept)."""

    max_new_tokens: int
    stop: tuple[str, ...]


def decoding(fmt: str, label_tokens: int, explain_tokens: int) -> Decoding:
    if fmt.endswith("json"):  # the answer ends with its closing brace
        return Decoding(explain_tokens if explains(fmt) else label_tokens, ("}",))
    # plain: the isAt line ends the answer
    return Decoding(explain_tokens if explains(fmt) else label_tokens, ("isAt: TRUE", "isAt: FALSE"))


_PLAIN = {"at": re.compile(r"(?im)^\W*at\s*[:=]\s*\W*(TRUE|PROBABLE|FALSE)\b"),
          "isAt": re.compile(r"(?im)^\W*is\s*_?at\s*[:=]\s*\W*(TRUE|FALSE)\b")}


def parse(fmt: str, text: str) -> Parsed:
    """The labels in a model's answer (the text after the cue) in format ``fmt``; for the explain
    formats only what follows "Answer:" counts when the model wrote it."""
    if explains(fmt):
        cut = text.rfind("Answer:")
        text = text[cut + len("Answer:"):] if cut >= 0 else text
    if fmt.endswith("json"):
        return parse_answer(text)
    found = {k: rx.search(text) for k, rx in _PLAIN.items()}
    if not found["at"] or not found["isAt"]:
        missing = "at" if not found["at"] else "isAt"
        return Parsed("FALSE", "FALSE", False, error=f"no '{missing}: LABEL' line")
    at, is_at = found["at"].group(1).upper(), found["isAt"].group(1).upper()
    assert at in AT_LABELS and is_at in ISAT_LABELS
    if is_at == "TRUE" and at == "FALSE":
        return Parsed("TRUE", is_at, True, corrected=True)
    return Parsed(at, is_at, True)


def label_options(fmt: str) -> list[str]:
    """What log-likelihood decoding compares after "Answer:": each valid (at, isAt) combination
    written as the training target writes it (:func:`response`), in :data:`VALID_LABELS` order."""
    return [f" {labels_text(at, is_at, fmt)}" for at, is_at in VALID_LABELS]


def explanation_of(text: str) -> str:
    """The explanation part of an explain-format answer (before "Answer:"), one line."""
    cut = text.find("Answer:")
    return " ".join((text[:cut] if cut >= 0 else text).split())


class PromptBuilder:
    """Token ids of prompts and training examples for one tokenizer: the question as plain text
    (with the tokenizer's BOS) or, for a model with a chat template, as the user's message."""

    def __init__(self, tokenizer, chat: bool | None = None):
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat

    def prompt_ids(self, user_text: str, fmt: str, after_cue: str = "", turn: str | None = None) -> list[int]:
        """The question, then the start of the model's turn: the format's cue followed by
        ``after_cue``, or ``turn`` instead of both."""
        start = turn if turn is not None else cue(fmt) + after_cue
        if self.chat:
            head = self.tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                                add_generation_prompt=True)
            return self.tok(head + start, add_special_tokens=False)["input_ids"]
        return self.tok(user_text + "\n" + start)["input_ids"]

    def example(self, user_text: str, fmt: str, target: str, group=None):
        """A training example: the prompt (no loss) and ``target`` + EOS (loss)."""
        from glotkit.data.prompts import IGNORE, Encoded

        prompt = self.prompt_ids(user_text, fmt)
        eos = self.tok.eos_token_id
        ids = self.tok(target, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        return Encoded(prompt + ids, [IGNORE] * len(prompt) + ids, group=group)
