"""XL-LoRA triplet synthesis: two generator adapters on one base model write, for each anchor
sentence, a positive (a sentence it entails) and a hard negative (a contradiction).

* One prompt template (:func:`pair_prompt`) serves training and generation, so the adapters see
  at generation exactly the prompt they were trained on; it names the output language.
* Both adapters sit on one loaded base (PEFT ``load_adapter`` / ``set_adapter``): switching is
  free, the base is never reloaded.
* Generations are appended to ``generations.jsonl`` batch by batch (flushed and fsynced); a
  killed run restarts where it stopped: finished (anchor, kind) pairs are skipped and a torn last
  line is cut off, so nothing is lost or written twice.
* Filters, each counted: empty output, a copy of the anchor, too short / too long, positive equal
  to negative, optionally the wrong language (a stopword-profile language check) and a positive
  that a reference embedding model finds less similar to the anchor than the negative.  Anchors
  dropped as duplicates or empty lines are counted when the anchors are read.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from glotkit.errors import GlotkitError
from glotkit.generate import Generator
from glotkit.logs import say

KINDS = ("positive", "negative")

INSTRUCTIONS = {
    "positive": "Write one sentence in {language} that is true whenever the sentence below is true "
                "(an entailed paraphrase).",
    "negative": "Write one sentence in {language} that contradicts the sentence below.",
}
TEMPLATE = "{instruction}\nSentence: {anchor}\n{language} sentence:"


def pair_prompt(kind: str, anchor: str, language: str) -> str:
    """The one prompt of the generator adapters, for training and for generation."""
    if kind not in KINDS:
        raise GlotkitError(f"generator kind '{kind}': expected one of {', '.join(KINDS)}")
    return TEMPLATE.format(instruction=INSTRUCTIONS[kind].format(language=language), anchor=anchor, language=language)


def encode_pairs(pairs: Sequence[tuple[str, str]], kind: str, language: str, tokenizer, max_length: int):
    """Training examples: the prompt (no loss) + " output" + EOS (loss on the completion only).
    Returns (examples, dropped as longer than ``max_length``)."""
    from glotkit.data.prompts import IGNORE, Encoded

    out, dropped = [], 0
    eos = tokenizer.eos_token_id
    for anchor, output in pairs:
        prompt = tokenizer(pair_prompt(kind, anchor, language))["input_ids"]
        target = tokenizer(" " + output, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(prompt) + len(target) > max_length:
            dropped += 1
            continue
        out.append(Encoded(prompt + target, [IGNORE] * len(prompt) + target))
    return out, dropped


# ---------------------------------------------------------------- language check

_STOPWORDS = {
    "en": "the a an of and to in is that it was for on are with as his her they be at this have from or by not but "
          "what all were when we there can your which their has will would been if them she he you i its".split(),
    "ro": "și în de la a cu pe nu că se o un este care din pentru mai ce sunt sau fost au am dar le lui ei el ea "
          "acest această fi după noi ne foarte".split(),
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus "
          "er hat dass sie nach wird bei einer um noch wie ich".split(),
    "fr": "le la les de des et en un une du est que qui pas pour dans ce il elle au sur se ne plus par avec je "
          "nous vous mais sont ont été cette".split(),
    "es": "el la de que y en los se del las un por con no una su para es al lo como más pero sus le ya o este "
          "fue ha muy".split(),
    "it": "il di che e la per un in è una del non sono le con si da al lo della ma come anche gli nel alla più "
          "ha questo".split(),
}
_SHARED = {w: sum(w in set(v) for v in _STOPWORDS.values()) for ws in _STOPWORDS.values() for w in ws}
CHECKABLE_LANGUAGES = tuple(_STOPWORDS)  # what guess_language can tell apart
LANGUAGE_NAMES = {"english": "en", "romanian": "ro", "german": "de", "french": "fr", "spanish": "es", "italian": "it"}


def guess_language(text: str) -> tuple[str | None, float]:
    """(language code, weighted share of the words that are its stopwords); (None, score) when
    there are too few clues.  A stopword listed for several languages ("a", "in", "la") counts
    1/n for each of them, so shared words do not decide."""
    words = re.findall(r"[^\W\d_]+", text.casefold())
    if len(words) < 3:
        return None, 0.0
    best, score = None, 0.0
    for code, sw in _STOPWORDS.items():
        s = sum(1.0 / _SHARED[w] for w in words if w in sw) / len(words)
        if code == "ro":
            s += 0.5 * sum(ch in "ăâîșțşţ" for ch in text.casefold()) / len(words)
        if s > score:
            best, score = code, s
    return (best, score) if score >= 0.08 else (None, score)


# ---------------------------------------------------------------- filters

@dataclass
class FilterConfig:
    min_chars: int = 10
    max_chars: int = 400
    copy_ratio: float = 0.9  # difflib similarity to the anchor at or above which an output is a copy
    language: str | None = None  # code of the language outputs must be in (None: no check)
    reference_margin: float | None = None  # cos(a, pos) - cos(a, neg) must exceed it (None: no check)

    def __post_init__(self):
        if not 0.0 < self.copy_ratio <= 1.0:
            raise GlotkitError(f"synth.copy_ratio={self.copy_ratio}: must be in (0, 1]")
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise GlotkitError(f"synth.min_chars={self.min_chars}, max_chars={self.max_chars}: need 0 ≤ min < max")
        if self.reference_margin is not None and not -2.0 <= self.reference_margin <= 2.0:
            raise GlotkitError(f"synth.reference_margin={self.reference_margin}: must be in [-2, 2] (a cosine difference)")
        if self.language is not None and self.language not in _STOPWORDS:
            raise GlotkitError(f"synth.language_check='{self.language}': no profile for it (known: {', '.join(_STOPWORDS)})")


def _norm(s: str) -> str:
    return " ".join(re.findall(r"\w+", s.casefold()))


def clean_output(text: str) -> str:
    """The first line of a generation, stripped of quotes."""
    line = text.strip().split("\n", 1)[0].strip()
    return line.strip('"“”„«»\'').strip()


def first_failure(anchor: str, output: str, cfg: FilterConfig) -> str | None:
    if not output.strip():
        return "empty"
    a, o = _norm(anchor), _norm(output)
    if o == a or difflib.SequenceMatcher(None, a, o).ratio() >= cfg.copy_ratio:
        return "copy_of_anchor"
    if len(output) < cfg.min_chars:
        return "too_short"
    if len(output) > cfg.max_chars:
        return "too_long"
    if cfg.language:
        lang, _ = guess_language(output)
        if lang is not None and lang != cfg.language:
            return "wrong_language"
    return None


# ---------------------------------------------------------------- the run

@dataclass
class SynthConfig:
    language: str = "English"  # the language named in the prompt (what the outputs are written in)
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    batch_size: int = 16
    seed: int = 42
    baseline_anchors: int = 8  # anchors generated one at a time with plain model.generate, for the speed ratio
    filters: FilterConfig = field(default_factory=FilterConfig)


def _read_done(path: Path) -> dict[tuple[int, str], dict]:
    """Rows already written; a torn last line (a kill mid-write) is cut off the file."""
    from glotkit.io import read_appended

    return read_appended(path, lambda r: (r["id"], r["kind"]))


def local_generators(model, tokenizer, device: str = "cpu") -> dict[str, Generator]:
    """The two generators of a PeftModel holding adapters named "positive" and "negative"."""
    from glotkit.generate.local import LocalGenerator

    return {kind: LocalGenerator(model, tokenizer, device, adapter=kind) for kind in KINDS}


def generate_pairs(generators: Mapping[str, Generator], anchors: Sequence[str], cfg: SynthConfig, out_dir: Path, *,
                   progress: bool = True, log: Callable[[str], None] = say) -> dict:
    """Positives and negatives for every anchor, appended to ``out_dir/generations.jsonl``;
    ``generators`` maps each kind to its generator (the local adapter of that name, see
    :func:`local_generators`, or a served one: the same prompts as text, the same sampling
    settings).  Returns timing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "generations.jsonl"
    done = _read_done(path)
    if done:
        log(f"synthesis: {len(done)} generations already written, continuing")
    seconds, new_tokens, n = 0.0, 0, 0
    with path.open("a", encoding="utf-8") as fh:
        for kind in KINDS:
            todo = [i for i in range(len(anchors)) if (i, kind) not in done]
            if not todo:
                continue
            texts = [pair_prompt(kind, anchors[i], cfg.language) for i in todo]

            def write(batch_idx: list[int], texts: list[str], kind=kind, todo=todo) -> None:
                for j, t in zip(batch_idx, texts):
                    i = todo[j]
                    fh.write(json.dumps({"id": i, "kind": kind, "anchor": anchors[i], "raw": t,
                                         "output": clean_output(t)}, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

            t0 = time.perf_counter()
            sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, seed=cfg.seed + KINDS.index(kind), progress=progress,
                            desc=f"synth {kind}", on_batch=write)
            gen = generators[kind]
            prompts = [gen.tokenizer(t)["input_ids"] for t in texts]
            result = gen.sample(prompts, texts=texts, batch_size=cfg.batch_size, **sampling)
            texts, produced = result.texts, result.new_tokens
            seconds += time.perf_counter() - t0
            new_tokens += produced
            n += len(texts)
    return {"generations": n, "seconds": round(seconds, 2), "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / seconds, 1) if seconds else None}


def baseline_speed(model, tokenizer, anchors: Sequence[str], cfg: SynthConfig, device: str = "cpu") -> dict:
    """Plain one-prompt-at-a-time ``model.generate`` on the first anchors (positive adapter,
    same sampling settings): the anchor the batched speed is compared with.  Tokens are counted
    as the batched path counts them: every generated token (the batched path counts EOS as
    ending, not as a token, so this favours the baseline slightly)."""
    import torch

    model.set_adapter("positive")
    model.eval()
    seconds, tokens = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i, a in enumerate(anchors[: cfg.baseline_anchors]):
        ids = tokenizer(pair_prompt("positive", a, cfg.language), return_tensors="pt")["input_ids"].to(device)
        torch.manual_seed(cfg.seed + i)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                                 do_sample=cfg.temperature > 0, temperature=cfg.temperature or None,
                                 top_p=cfg.top_p if cfg.temperature > 0 else None,
                                 top_k=cfg.top_k if cfg.temperature > 0 else None, pad_token_id=pad)
        seconds += time.perf_counter() - t0
        tokens += int(out.shape[1] - ids.shape[1])  # every generated token, EOS included
    n = min(cfg.baseline_anchors, len(anchors))
    return {"prompts": n, "seconds": round(seconds, 2), "new_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None}


def build_triplets(out_dir: Path, anchors: Sequence[str], cfg: FilterConfig, anchor_stats: dict,
                   reference=None, reference_prompt: str | None = None) -> dict:
    """Filter the generations and join them on the anchor into ``triplets.jsonl``; returns the
    summary (every filter's count) also written to ``summary.json``."""
    from glotkit.io import atomic_write_json, atomic_write_jsonl

    rows = _read_done(out_dir / "generations.jsonl")
    counts = {"anchors_read": anchor_stats.get("lines", len(anchors)),
              "empty_or_short_anchor_lines": anchor_stats.get("empty_or_short", 0),
              "duplicate_anchors": anchor_stats.get("duplicate_anchors", 0), "anchors": len(anchors),
              "missing_generation": 0}
    reasons: dict[str, int] = {}
    kept = []
    for i, a in enumerate(anchors):
        pos, neg = rows.get((i, "positive")), rows.get((i, "negative"))
        if pos is None or neg is None:
            counts["missing_generation"] += 1
            continue
        why = None
        for kind, r in (("positive", pos), ("negative", neg)):
            f = first_failure(a, r["output"], cfg)
            if f:
                why = f"{kind}: {f}"
                break
        if why is None and _norm(pos["output"]) == _norm(neg["output"]):
            why = "positive equals negative"
        if why:
            reasons[why] = reasons.get(why, 0) + 1
            continue
        kept.append({"anchor": a, "positive": pos["output"], "hard_negative": neg["output"]})
    if reference is not None and cfg.reference_margin is not None and kept:
        from glotkit.models.encoders import encode

        ea = encode(reference, [t["anchor"] for t in kept], prompt=reference_prompt)
        ep = encode(reference, [t["positive"] for t in kept], prompt=reference_prompt)
        en = encode(reference, [t["hard_negative"] for t in kept], prompt=reference_prompt)
        margin = (ea * ep).sum(1) - (ea * en).sum(1)
        before = len(kept)
        kept = [t | {"margin": round(float(m), 4)} for t, m in zip(kept, margin) if m > cfg.reference_margin]
        reasons["positive not closer than negative (reference model)"] = before - len(kept)
    counts["filtered"] = reasons
    counts["triplets"] = len(kept)
    atomic_write_jsonl(out_dir / "triplets.jsonl", kept)
    atomic_write_json(out_dir / "summary.json", counts)
    return counts
