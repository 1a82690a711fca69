"""Instruction and chat data: read it in any of the usual formats, render it with a chat template,
and mark the tokens the model learns to write.

Formats (``format: auto`` tells them apart by the first record's fields and says which it chose):

    alpaca             instruction, input (optional), output, system (optional)
    sharegpt           conversations: [{from: human|gpt|system, value}, ...]
    messages           messages: [{role: user|assistant|system, content}, ...] (OpenAI style)
    prompt_completion  prompt, completion: plain text, no template (the completion is supervised);
                       a prompt given as a list of messages with a completion as one is a conversation

Files: JSONL, JSON (a list of records), CSV/TSV (a list-valued field written as JSON text),
parquet, or a folder saved with ``datasets``.  Field names are configurable.  Every record is
checked on the way in: no assistant turn, roles out of order, an empty message or an unknown
role is a one-line error naming the file and the record.

Supervised tokens (:class:`ChatEncoder`): each assistant turn is what the template writes between
the conversation so far rendered with ``add_generation_prompt=True`` and the conversation up to
and including that turn — the answer and the template's end-of-turn marker after it.  Tokens whose
characters fall in those spans carry the loss (``loss: assistant``; ``last``: only the final
assistant turn; ``all``: every token).  This is the set transformers marks for a template with
``{% generation %}`` blocks around the same text (what TRL's ``assistant_only_loss`` trains on);
it needs no such blocks, so it works with any model's own template.  A template that drops or
rewrites the assistant text is caught: the supervised tokens must decode to the assistant's words.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from glotkit.data.prompts import IGNORE, Encoded, EncodeStats
from glotkit.errors import GlotkitError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
DEFAULT_FIELDS = {
    "instruction": "instruction", "input": "input", "output": "output", "system": "system",
    "conversations": "conversations", "from": "from", "value": "value",
    "messages": "messages", "role": "role", "content": "content",
    "prompt": "prompt", "completion": "completion", "id": "id",
}
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system"}


@dataclass
class Conversation:
    """One training example: ``messages`` ({role, content}; roles system, user, assistant), or for
    plain prompt–completion data ``prompt`` and ``completion`` with no messages."""

    id: str
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str | None = None
    completion: str | None = None

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    @property
    def turns(self) -> int:
        """Assistant turns."""
        return sum(1 for m in self.messages if m["role"] == "assistant") if self.is_chat else 1

    def answer(self) -> str:
        """The text of the last assistant turn (the completion for plain data)."""
        if not self.is_chat:
            return self.completion or ""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")

    def context(self) -> list[dict[str, str]]:
        """The messages before the last assistant turn (what a model answers in evaluation)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]


@dataclass
class ChatData:
    train: list[Conversation]
    test: list[Conversation]
    format: str  # the format read (detected or given)
    detected: bool
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def _parquet_records(path: Path):
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise GlotkitError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"row {i + 1}", rec


def _dataset_records(path: Path, split: str):
    try:
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a non-dataset folder
        raise GlotkitError(f"{path}: not a saved datasets folder ({type(err).__name__}: {err})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise GlotkitError(f"{path}: the DatasetDict has no '{split}' split (splits: {', '.join(ds)})")
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield f"row {i + 1}", rec


def read_records(path: str | Path, split: str = "train") -> list[tuple[str, dict]]:
    """``(location, record)`` of a JSONL, JSON, CSV/TSV or parquet file, or a saved datasets folder."""
    from glotkit.io import read_table_records

    path = Path(path)
    if not path.exists():
        raise GlotkitError(f"{path}: data file not found (data.{split})")
    if path.is_dir():
        recs = list(_dataset_records(path, split))
    elif path.suffix.lower() == ".parquet":
        recs = list(_parquet_records(path))
    elif path.suffix.lower() == ".json":
        from glotkit.io import read_json_file

        doc = read_json_file(path)
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise GlotkitError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
        recs = [(f"record {i + 1}", r) for i, r in enumerate(doc)]
    else:
        recs, _ = read_table_records(path, f"data.{split}", (".jsonl", ".csv", ".tsv"))
    if not recs:
        raise GlotkitError(f"{path}: no records in the data set (data.{split})")
    return recs


def detect_format(rec: dict, fields: dict[str, str]) -> str | None:
    """The format a record is written in, from its fields (None when none fits)."""
    if fields["messages"] in rec:
        return "messages"
    if fields["conversations"] in rec:
        return "sharegpt"
    if fields["instruction"] in rec and fields["output"] in rec:
        return "alpaca"
    if fields["prompt"] in rec and fields["completion"] in rec:
        return "prompt_completion"
    return None


def _text(value: Any, where: str, name: str, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise GlotkitError(f"{where}: field '{name}' must be text, got {type(value).__name__}")
    return value


def _listed(value: Any, where: str, name: str) -> list:
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise GlotkitError(f"{where}: field '{name}' must be a list of messages (or its JSON text)") from None
    if not isinstance(value, list):
        raise GlotkitError(f"{where}: field '{name}' must be a list of messages, got {type(value).__name__}")
    return value


def _messages(items: list, where: str, name: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    out = []
    for k, m in enumerate(items):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise GlotkitError(f"{where}: {name}[{k}] must be an object with '{role_key}' and '{content_key}' "
                               f"(set data.fields.{'role' if role_key != 'from' else 'from'} / content names)")
        raw = str(m[role_key]).strip().lower()
        role = _ROLES.get(raw)
        if role is None:
            raise GlotkitError(f"{where}: {name}[{k}]: unknown role '{m[role_key]}' "
                               f"(known: {', '.join(sorted(_ROLES))})")
        out.append({"role": role, "content": _text(m[content_key], f"{where}: {name}[{k}]", content_key)})
    return out


def check_messages(messages: list[dict[str, str]], where: str) -> None:
    """Roles in order (an optional system message first, then user and assistant taking turns,
    ending with the assistant), no empty message: a one-line error naming the message."""
    if not messages:
        raise GlotkitError(f"{where}: empty conversation")
    for k, m in enumerate(messages):
        if not m["content"].strip():
            raise GlotkitError(f"{where}: message {k} ({m['role']}) is empty")
        if m["role"] == "system" and k > 0:
            raise GlotkitError(f"{where}: message {k}: a system message may only come first")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns:
        raise GlotkitError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    for k, role in enumerate(turns):
        want = "user" if k % 2 == 0 else "assistant"
        if role != want:
            order = " → ".join(turns[: k + 1])
            raise GlotkitError(f"{where}: roles out of order at turn {k} ({order}): user and assistant must "
                               "take turns, starting with the user")
    if turns[-1] != "assistant":
        raise GlotkitError(f"{where}: the conversation ends with a user turn that no assistant answers")


def to_conversation(rec: dict, fmt: str, fields: dict[str, str], where: str, default_id: str) -> Conversation:
    """One record in format ``fmt`` as a checked :class:`Conversation`."""
    f = fields
    cid = str(rec.get(f["id"], default_id))
    if fmt == "alpaca":
        instruction = _text(rec.get(f["instruction"]), where, f["instruction"])
        extra = _text(rec.get(f["input"]), where, f["input"], optional=True)
        system = _text(rec.get(f["system"]), where, f["system"], optional=True)
        user = instruction.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": _text(rec.get(f["output"]), where, f["output"])}]
    elif fmt == "sharegpt":
        items = _listed(rec.get(f["conversations"]), where, f["conversations"])
        role_key = f["from"] if all(isinstance(m, dict) and f["from"] in m for m in items) else f["role"]
        content_key = f["value"] if role_key == f["from"] else f["content"]
        messages = _messages(items, where, f["conversations"], role_key, content_key)
    elif fmt == "messages":
        messages = _messages(_listed(rec.get(f["messages"]), where, f["messages"]), where, f["messages"],
                             f["role"], f["content"])
    elif fmt == "prompt_completion":
        prompt, completion = rec.get(f["prompt"]), rec.get(f["completion"])
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt–completion
            messages = (_messages(_listed(prompt, where, f["prompt"]), where, f["prompt"], f["role"], f["content"])
                        + _messages(_listed(completion, where, f["completion"]), where, f["completion"],
                                    f["role"], f["content"]))
        else:
            prompt, completion = _text(prompt, where, f["prompt"]), _text(completion, where, f["completion"])
            if not completion.strip():
                raise GlotkitError(f"{where}: field '{f['completion']}' is empty (nothing to learn)")
            if not prompt.strip():
                raise GlotkitError(f"{where}: field '{f['prompt']}' is empty")
            return Conversation(cid, prompt=prompt, completion=completion)
    else:
        raise GlotkitError(f"data.format: '{fmt}' is not a format ({', '.join(FORMATS)})")
    check_messages(messages, where)
    return Conversation(cid, messages)


def read_conversations(path: str | Path, fmt: str = "auto", fields: dict[str, str] | None = None,
                       split: str = "train") -> tuple[list[Conversation], str]:
    """Every conversation of a file or folder, and the format read (``fmt``, or detected)."""
    from glotkit.io import check_unique

    fields = {**DEFAULT_FIELDS, **(fields or {})}
    records = read_records(path, split)
    if fmt == "auto":
        fmt = detect_format(records[0][1], fields)
        if fmt is None:
            present = ", ".join(sorted(map(str, records[0][1]))) or "none"
            raise GlotkitError(f"{path}: {records[0][0]}: cannot tell the format from the fields ({present}); "
                               f"set data.format ({', '.join(FORMATS)}) or data.fields")
    out = [to_conversation(rec, fmt, fields, f"{path}: {loc}", str(n)) for n, (loc, rec) in enumerate(records)]
    check_unique([(loc, c.id) for (loc, _), c in zip(records, out)], Path(path), "id",
                 f"; ids (field '{fields['id']}', set by data.fields.id) must be unique")
    return out, fmt


def split_conversations(convs: list[Conversation], test_ratio: float, seed: int) -> tuple[list, list]:
    """A seeded split into train and held-out, in input order."""
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(convs) * test_ratio))
    if n >= len(convs):
        raise GlotkitError(f"data.test_ratio={test_ratio}: only {len(convs)} conversations, too few to hold some out")
    held = set(order[:n])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def load_chat_data(train: str | None, test: str | None, fmt: str, fields: dict[str, str] | None, test_ratio: float,
                   seed: int, max_train: int | None = None, max_test: int | None = None) -> ChatData:
    """Train and held-out conversations as a recipe gives them (``test`` absent: a seeded split)."""
    if not train:
        raise GlotkitError("data.train: no data given (a JSONL/JSON/CSV/parquet file or a datasets folder)")
    detected = fmt == "auto"
    train_c, fmt = read_conversations(train, fmt, fields, "train")
    if test:
        test_c, test_fmt = read_conversations(test, "auto" if detected else fmt, fields, "test")
        if test_fmt != fmt:
            raise GlotkitError(f"{test}: written as {test_fmt}, data.train as {fmt}; give data.format")
    else:
        train_c, test_c = split_conversations(train_c, test_ratio, seed)
    if max_train:
        train_c = train_c[:max_train]
    if max_test:
        test_c = test_c[:max_test]
    return ChatData(train_c, test_c, fmt, detected)


# --------------------------------------------------------------------------- templates and masks


def read_template(path: str | Path) -> str:
    """A Jinja chat template from a file (``.jinja``, or a tokenizer_config-style JSON holding
    ``chat_template``)."""
    from glotkit.io import read_user_text

    path = Path(path)
    if not path.is_file():
        raise GlotkitError(f"{path}: chat template file not found (chat.template)")
    text = read_user_text(path)
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        text = doc.get("chat_template") if isinstance(doc, dict) else None
        if not isinstance(text, str):
            raise GlotkitError(f"{path}: no 'chat_template' text in this JSON file")
    if "messages" not in text:
        raise GlotkitError(f"{path}: does not look like a chat template (it never reads 'messages')")
    return text


class ChatEncoder:
    """Turns conversations into training examples (token ids, labels on what the model writes)
    and into generation prompts, through one chat template.

    ``template``: Jinja text, or None for the tokenizer's own.  ``loss``: 'assistant' (every
    assistant turn), 'last' (the final assistant turn), 'all' (every token).  Plain
    prompt–completion examples use no template: BOS + prompt + completion + EOS, the completion
    and EOS supervised."""

    def __init__(self, tokenizer, template: str | None = None, loss: str = "assistant"):
        self.tok = tokenizer
        self.template = template
        self.loss = loss
        self._stop: list[int] | None = None
        if loss not in ("assistant", "last", "all"):
            raise GlotkitError(f"chat.loss: '{loss}' is not one of assistant, last, all")

    @property
    def has_template(self) -> bool:
        return bool(self.template or getattr(self.tok, "chat_template", None))

    def render(self, messages: Sequence[dict], generation_prompt: bool = False) -> str:
        if not self.has_template:
            raise GlotkitError("this model's tokenizer has no chat template: give one with chat.template "
                               "(a .jinja file), or use prompt–completion data")
        try:
            return self.tok.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja errors of the template itself (raise_exception, syntax)
            raise GlotkitError(f"chat template: cannot render the conversation ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''})") from None

    def spans(self, conv: Conversation, where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        text = self.render(conv.messages)
        spans = []
        idx = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
        for i in idx:
            before = self.render(conv.messages[:i], generation_prompt=True)
            through = self.render(conv.messages[: i + 1]) if i + 1 < len(conv.messages) else text
            if not (through.startswith(before) and text.startswith(through)):
                raise GlotkitError(
                    f"{where}chat template: the conversation rendered through turn {i} is not the start of "
                    "the whole rendered conversation (the template rewrites earlier turns); "
                    "set chat.loss: last or use another template")
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, conv: Conversation, where: str = "") -> tuple[list[int], list[bool]]:
        """Token ids of the whole example and which of them carry the loss."""
        if not conv.is_chat:
            bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
            prompt = bos + self.tok(conv.prompt, add_special_tokens=False)["input_ids"]
            ids = self.tok(conv.prompt + conv.completion, add_special_tokens=False)["input_ids"]
            ids = bos + ids
            if ids[: len(prompt)] != prompt:  # the prompt's last token merged with the completion's first
                ids = prompt + self.tok(conv.completion, add_special_tokens=False)["input_ids"]
            if self.tok.eos_token_id is not None:
                ids = ids + [self.tok.eos_token_id]
            mask = [False] * len(prompt) + [True] * (len(ids) - len(prompt))
            return ids, ([True] * len(ids) if self.loss == "all" else mask)
        if self.loss == "last":
            text = self.render(conv.messages)
            before = self.render(conv.context(), generation_prompt=True)
            if not text.startswith(before):
                raise GlotkitError(f"{where}chat template: the prompt rendered for the last answer is not the "
                                   "start of the whole rendered conversation")
            spans = [(len(before), len(text))]
        else:
            text, spans = self.spans(conv, where)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if self.loss == "all":
            return ids, [True] * len(ids)
        mask = [False] * len(ids)
        for start, end in spans:
            for t, (a, b) in enumerate(offsets):
                if b > a and a < end and b > start:  # the token's characters meet the span
                    mask[t] = True
        self._check(conv, ids, mask, spans, text, where)
        return ids, mask

    def _check(self, conv: Conversation, ids: list[int], mask: list[bool], spans, text: str, where: str) -> None:
        """Every assistant answer must be in the text the model learns to write."""
        answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        if self.loss == "last":
            answers = answers[-1:]
        supervised = self.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        flat = " ".join(supervised.split())
        for k, a in enumerate(answers):
            if " ".join(a.split()) not in flat:
                shown = " ".join(text[spans[k][0]: spans[k][1]].split())[:80] if k < len(spans) else ""
                raise GlotkitError(f"{where}chat template drops or rewrites the assistant's text (answer {k}: "
                                   f"{' '.join(a.split())[:60]!r}; the template writes {shown!r}); "
                                   "fix the template (chat.template)")

    def example(self, conv: Conversation, max_length: int, too_long: str, stats: EncodeStats,
                where: str = "") -> Encoded | None:
        """A training example (labels on the supervised tokens), or None when dropped as too long."""
        stats.total += 1
        ids, mask = self.encode(conv, where)
        if len(ids) > max_length:
            if too_long == "drop" or not any(mask[:max_length]):
                stats.dropped += 1
                return None
            ids, mask = ids[:max_length], mask[:max_length]
            stats.truncated += 1
        stats.kept += 1
        return Encoded(list(ids), [t if m else IGNORE for t, m in zip(ids, mask)])

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """What the model reads before it writes the last answer (generation, evaluation)."""
        if not conv.is_chat:
            bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
            return bos + self.tok(conv.prompt, add_special_tokens=False)["input_ids"]
        return self.tok(self.render(conv.context(), generation_prompt=True), add_special_tokens=False)["input_ids"]

    def prompt_text(self, conv: Conversation) -> str:
        return conv.prompt if not conv.is_chat else self.render(conv.context(), generation_prompt=True)

    def stop_ids(self, sample: Conversation | None = None) -> list[int]:
        """The special tokens the template writes to end an assistant turn (generation stops
        there), found in a rendered sample turn; EOS always."""
        if self._stop is not None:
            return self._stop
        stop = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        if self.has_template:
            conv = sample or Conversation("probe", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
            first = [m["role"] for m in conv.messages].index("assistant")
            text = self.render(conv.messages[: first + 1])
            before = self.render(conv.messages[:first], generation_prompt=True)
            tail = self.tok(text[len(before):], add_special_tokens=False)["input_ids"]
            special = set(getattr(self.tok, "all_special_ids", []) or [])
            special |= {i for i, t in getattr(self.tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
            stop += [t for t in tail if t in special and t not in stop]
        self._stop = stop
        return stop


# --------------------------------------------------------------------------- packing


def pack_examples(examples: Sequence[Encoded], max_length: int, seed: int = 0) -> list:
    """Short examples packed into rows of at most ``max_length`` tokens: each example its own
    segment, attending only to itself, positions from 0 (the same loss and gradients as the
    examples one per row).  First fit over the examples longest first; returns
    :class:`glotkit.models.lm.Row` objects (the engine trains on them as they are)."""
    from glotkit.models.lm import Row

    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        j = next((b for b, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([i])
            room.append(max_length - n)
        else:
            bins[j].append(i)
            room[j] -= n
    random.Random(seed).shuffle(bins)
    rows = []
    for members in bins:
        ids, pos, seg, tg = [], [], [], []
        for k, i in enumerate(members, 1):
            e = examples[i]
            n = len(e.input_ids)
            ids += e.input_ids
            pos += range(n)
            seg += [k] * n
            tg += list(e.labels[1:]) + [IGNORE]
        rows.append(Row(ids, pos, seg, tg, n_examples=len(members), n_tokens=len(ids)))
    return rows


def describe(data: ChatData) -> str:
    convs = data.train + data.test
    multi = sum(1 for c in convs if c.turns > 1)
    how = "detected" if data.detected else "given"
    return (f"{len(data.train)} train / {len(data.test)} held-out conversations, format {data.format} ({how}); "
            f"{multi} of {len(convs)} multi-turn")


def iter_supervised_text(ids: Iterable[int], labels: Iterable[int], tokenizer) -> str:
    """The text of an example's supervised tokens (for checks and reports)."""
    return tokenizer.decode([t for t, y in zip(ids, labels) if y != IGNORE], skip_special_tokens=False)
