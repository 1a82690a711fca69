"""Continued pretraining (MISSION.md system B, RoQLlama): LoRA or QLoRA on plain text packed into
rows that never attend across documents, held-out perplexity and bits per byte before and after,
and optionally the Romanian task suite and the memory table (M1/M2 for fp32, bf16, NF4)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, StrictInt, field_validator

from glotkit.config import MemorySection, RecipeBase, SuiteSection, _Section
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json
from glotkit.languages import language_code
from glotkit.systems.base import Run, Verb
from glotkit.systems.finetune import FinetuneSystem, Kind


class PretrainSection(_Section):
    """Continued pretraining: which corpus, how it is cut, and how much is held out."""

    corpus: list[str] = Field(default_factory=list)  # .txt / .jsonl / TEI .xml files or folders
    text_field: str = "text"
    language: str = "ro"  # ISO 639 code or a known name
    fix_diacritics: bool = True  # Romanian: legacy ş/ţ -> ș/ț
    block_size: StrictInt = Field(512, gt=8)
    heldout_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    max_docs: StrictInt | None = Field(None, gt=0)
    max_train_tokens: StrictInt | None = Field(None, gt=0)
    max_heldout_tokens: StrictInt | None = Field(20000, gt=0)
    heldout_doc_tokens: StrictInt | None = Field(None, gt=0)  # at most this many from each held-out document

    _language = field_validator("language")(classmethod(lambda cls, v: language_code(v)))

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class PretrainRecipe(RecipeBase):
    """A continued-pretraining recipe: the shared sections plus pretrain, suite and memory."""

    system: Literal["pretrain"] = "pretrain"
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    suite: SuiteSection = Field(default_factory=SuiteSection)
    memory: MemorySection = Field(default_factory=MemorySection)

    default_stages: ClassVar[tuple[str, ...]] = ("eval_base", "train", "eval_tuned", "report")
    all_stages: ClassVar[tuple[str, ...]] = ("eval_base", "train", "eval_tuned", "suite", "memory", "report")
    path_keys: ClassVar[tuple[tuple[str, str], ...]] = (
        ("pretrain", "corpus"), ("suite", "data_root"), ("suite", "task_files"), ("suite", "task_data"))


def _read(recipe: PretrainRecipe, log) -> Any:
    if not recipe.pretrain.corpus:
        raise GlotkitError("pretrain.corpus: no corpus given (files or folders of .txt, .jsonl or TEI .xml)")
    from glotkit.data.corpus import read_documents

    docs = read_documents(recipe.pretrain.corpus, recipe.pretrain.text_field, recipe.pretrain.language,
                          recipe.pretrain.fix_diacritics)
    return docs[: recipe.pretrain.max_docs] if recipe.pretrain.max_docs else docs


def training_texts(recipe: RecipeBase, log=print) -> list[str]:
    """The texts a pretrain recipe trains on: its corpus without the held-out documents (the run's
    own seeded split), e.g. to trim a vocabulary without looking at the held-out text."""
    from glotkit.data.corpus import split_documents

    if not isinstance(recipe, PretrainRecipe):
        raise GlotkitError(f"{recipe.name}: system '{recipe.system}' has no corpus to train on; give a pretrain recipe")
    train_docs, held_docs = split_documents(_read(recipe, log), recipe.pretrain.heldout_ratio, recipe.seed)
    log(f"corpus: {len(train_docs)} training documents ({len(held_docs)} held out, not used)")
    return [d.text for d in train_docs]


def _prepare(run: Run, state) -> Any:
    """Packed training rows and held-out rows (whole documents, up to the token budget); writes corpus.json."""
    from glotkit.data.corpus import pack_documents, split_documents, tokenize_documents

    recipe, docs, tok, log = run.recipe, run.checked, state.tok, run.log
    cfg = recipe.pretrain
    train_docs, held_docs = split_documents(docs, cfg.heldout_ratio, recipe.seed)
    held_tok, held_bytes, total = [], 0, 0
    for d, ids in zip(held_docs, tokenize_documents(held_docs, tok)):
        kept = ids[: cfg.heldout_doc_tokens] if cfg.heldout_doc_tokens else ids
        if cfg.max_heldout_tokens and total and total + len(kept) > cfg.max_heldout_tokens:
            break
        held_tok.append(kept[: cfg.max_heldout_tokens] if cfg.max_heldout_tokens else kept)
        # bytes of the text those tokens cover (a document cut by a budget counts only its part)
        covered = held_tok[-1] if len(held_tok[-1]) < len(ids) else None
        held_bytes += len((tok.decode(covered, skip_special_tokens=True) if covered else d.text).encode("utf-8"))
        total += len(held_tok[-1])
    train_tok = tokenize_documents(train_docs, tok)
    distinct = set().union(*map(set, train_tok), *map(set, held_tok)) if train_tok or held_tok else set()
    if run.parallel.is_main:
        atomic_write_json(run.folder.corpus, {
            "train_documents": len(train_docs), "train_tokens_all": sum(map(len, train_tok)),
            "heldout_documents": len(held_tok), "heldout_tokens": total, "heldout_bytes": held_bytes,
            "distinct_token_ids": len(distinct), "vocab_size": len(tok)})
    if cfg.max_train_tokens:
        kept, n = [], 0
        for ids in train_tok:
            if n >= cfg.max_train_tokens:
                break
            kept.append(ids[: cfg.max_train_tokens - n])
            n += len(kept[-1])
        train_tok = kept
    train_rows = pack_documents(train_tok, cfg.block_size)
    held_rows = pack_documents(held_tok, cfg.block_size)
    log(f"corpus: {len(train_docs)} train documents -> {sum(len(t) for t in train_tok)} tokens in "
        f"{len(train_rows)} rows of {cfg.block_size}; held out {len(held_tok)} documents, {total} tokens, {held_bytes} bytes")
    return train_rows, held_rows, held_bytes


def _rows(run: Run, state, prepared) -> tuple[list, Any]:
    from glotkit.data.prompts import EncodeStats

    return prepared[0], EncodeStats()


def _evaluate(run: Run, state, tag: str) -> None:
    import contextlib

    from glotkit.eval.perplexity import heldout_scores, with_intervals
    from glotkit.eval.uncertainty import fmt

    _, held_rows, held_bytes = state.prepared
    out_dir = run.folder.eval_dir(tag)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (state.base() if tag == "base" else contextlib.nullcontext(state.tuned())) as model:
        r = heldout_scores(model, held_rows, held_bytes, state.tok.pad_token_id, progress=run.progress,
                           desc=f"held-out {tag}", per_row=True)
    # each row's share of the held-out bytes: its text's bytes, scaled so that the rows add up to the total
    raw = [len(state.tok.decode(row.input_ids, skip_special_tokens=True).encode("utf-8")) for row in held_rows]
    scale = held_bytes / max(sum(raw), 1)
    r = with_intervals(r, [b * scale for b in raw])
    atomic_write_json(run.folder.eval_metrics(tag), r)
    run.log(f"{tag} model, held-out: perplexity {fmt(r['perplexity'], r.get('perplexity_ci'), 3)}, "
            f"bits/byte {fmt(r['bits_per_byte'], r.get('bits_per_byte_ci'), 4)} ({r['tokens']} tokens, {r['bytes']} bytes)")


def _report(run: Run, metrics: dict) -> list[str]:
    from glotkit.eval.perplexity import paired_change
    from glotkit.eval.uncertainty import fmt, fmt_change

    lines = ["", "## Held-out text", "",
             "| model | perplexity | bits per byte | NLL per token | tokens | bytes |", "|---|---:|---:|---:|---:|---:|"]
    for tag, m in metrics.items():
        lines.append(f"| {tag} | {fmt(m['perplexity'], m.get('perplexity_ci'), 3)} | "
                     f"{fmt(m['bits_per_byte'], m.get('bits_per_byte_ci'), 4)} | "
                     f"{fmt(m['nll_per_token'], m.get('nll_per_token_ci'), 4)} | {m['tokens']} | {m['bytes']} |")
    if "base" in metrics and "tuned" in metrics:
        d = paired_change(metrics["base"], metrics["tuned"]).get("bits_per_byte")
        if d:
            rel = 100 * d["difference"] / metrics["base"]["bits_per_byte"]
            lines += ["", f"Change in bits per byte, tuned − base: {fmt_change(d, 4)} ({rel:+.2f} % relative)"
                      + ("" if d["significant"] else " (the interval includes zero)")]
    return lines + ["", "Held-out documents are a seeded split by document; packed rows never attend across "
                    "documents. Bits per byte compare models with different tokenizers. […]: 95 % interval, "
                    "percentile bootstrap over held-out rows (1000 resamples, seed 0); the change is a paired "
                    "bootstrap on the same rows, * where its interval excludes zero."]


KIND = Kind(
    read=_read, describe=lambda run: f"continued pretraining on {len(run.checked)} documents", prepare=_prepare,
    rows=_rows, evaluate=_evaluate, data_files=lambda r: list(r.pretrain.corpus), report=_report,
    loss_label="loss per token", train_note=lambda tr: "- loss on every token of the packed documents",
    headline=("perplexity", "bits_per_byte"))

SYSTEM = FinetuneSystem(
    name="pretrain", title="continued pretraining", schema=PretrainRecipe, kind=KIND,
    verbs=(Verb("pretrain", "continued pretraining: run a recipe whose system is 'pretrain'", launchable=True),
           Verb("train", "only the training stage of a recipe", stages=("train",), launchable=True)))
