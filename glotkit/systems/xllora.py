"""XL-LoRA (MISSION.md system C, ``system: xllora``): generator adapters -> triplets -> sentence embeddings.

``runs/<name>/``::

    generators/positive/, generators/negative/   the two LoRA adapters (PEFT folders) + train logs
    synth/generations.jsonl   every generation, appended as it is made (resumable)
    synth/triplets.jsonl      (anchor, positive, hard_negative) after the filters
    synth/summary.json        anchor counts, each filter's count, speed against one-at-a-time generate()
    embed/base.json, embed/trained.json   evaluation of the embedding model before and after
    embed/model/              the trained sentence-transformers model
    report.md

Every stage skips what its files say is done, so the same command resumes.  Synthesis and
embedding settings may change on a finished run: each stage keeps its settings in
``settings.json``; a change that invalidates the generations (sampling, prompt language,
anchors file, max new tokens) moves ``synth/`` aside to ``synth.previous-N/`` and starts again,
a larger ``max_anchors`` only generates the missing anchors, a filter change only re-filters;
any change of the triplets or of the embedding settings moves ``embed/`` aside and redoes it.
Nothing is deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, StrictInt, field_validator

from glotkit.config import RecipeBase, _Section
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json, atomic_write_text
from glotkit.io import read_jsonl as _read_jsonl
from glotkit.systems.base import Run, RunFolder, Stage, Verb
from glotkit.systems.runner import settle


class PairsSection(_Section):
    """XL-LoRA generator adapters: the pair files they learn from (anchor -> positive / negative)."""

    positive: str | None = None  # CSV/TSV/JSONL with anchor and positive columns
    negative: str | None = None  # ... with anchor and hard-negative columns
    anchor_field: str = "sent0"
    positive_field: str = "sent1"
    negative_field: str = "hard_neg"
    max_pairs: StrictInt | None = Field(None, gt=0)  # a seeded sample of each file
    language: str = "English"  # the language of the outputs in the pair files (named in the prompt)


class SynthSection(_Section):
    """Triplet synthesis with the two generator adapters."""

    anchors: str | None = None  # text file (one sentence per line), JSONL or CSV
    anchor_field: str = "text"
    max_anchors: StrictInt | None = Field(None, gt=0)
    language: str = "English"  # the language the prompt asks the outputs to be in
    max_new_tokens: StrictInt = Field(128, gt=0)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: StrictInt = Field(50, ge=0)  # 0: no top-k cut
    batch_size: StrictInt = Field(32, gt=0)
    min_chars: StrictInt = Field(10, ge=0)
    max_chars: StrictInt = Field(400, gt=0)
    copy_ratio: float = 0.9  # similarity to the anchor (difflib) at or above which an output is a copy
    language_check: str | None = "en"  # language code the outputs must be in; null: no check

    @field_validator("language_check")
    @classmethod
    def _checkable(cls, v: str | None) -> str | None:
        """A language the stopword check knows (a name maps to its code), else the check would drop every output."""
        if v is None:
            return None
        from glotkit.languages import language_code
        from glotkit.synth.triplets import CHECKABLE_LANGUAGES

        code = language_code(v).split("-")[0].lower()
        if code not in CHECKABLE_LANGUAGES:
            raise ValueError(f"the output language check knows {', '.join(CHECKABLE_LANGUAGES)}, not {v!r} "
                             "(set null to keep outputs in any language)")
        return code
    reference_margin: float | None = 0.0  # cos(anchor, positive) - cos(anchor, negative) must exceed it; null: off
    baseline_anchors: StrictInt = Field(8, ge=0)  # one-at-a-time generate() for the speed ratio


class ParallelEval(_Section):
    """Retrieval pairs: two line-aligned files (source, target) or one pair file (CSV/TSV/JSONL)
    with two columns; query i's one relevant document is document i, scored both ways."""

    name: str  # "ro-en": queries in the first language, documents in the second
    source: str | None = None
    target: str | None = None
    file: str | None = None
    source_field: str = "sent0"
    target_field: str = "sent1"

    def model_post_init(self, __context) -> None:
        if not (self.file or (self.source and self.target)) or (self.file and (self.source or self.target)):
            raise GlotkitError(f"embed.parallel '{self.name}': give either 'file' (a pair file) or 'source' and 'target' "
                               "(line-aligned files)")


class EmbedSection(_Section):
    """Sentence-embedding training on the triplets, and its evaluation before and after."""

    model: str = "multilingual-e5-small"
    pooling: Literal["mean", "cls", "avg_first_last"] = "mean"
    prompt: str | None = "query: "  # prepended to every text (e5 expects "query: " for symmetric tasks)
    max_seq_length: StrictInt = Field(128, gt=0)
    batch_size: StrictInt = Field(32, ge=2)
    epochs: StrictInt = Field(1, gt=0)
    max_steps: StrictInt | None = Field(None, gt=0)
    lr: float = Field(2e-5, gt=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    scale: float = Field(20.0, gt=0.0)  # MNRL scale = 1 / temperature
    cached: bool = False  # CachedMultipleNegativesRankingLoss (GradCache) for large batches
    mini_batch_size: StrictInt = Field(16, gt=0)
    sts: str | None = None  # score<TAB>s1<TAB>s2 file (RO-STS dev)
    parallel: list[ParallelEval] = Field(default_factory=list)
    eval_limit: StrictInt | None = Field(None, gt=0)
    # add this many (anchor, positive, hard negative) triplets of the pair files themselves (rows of the
    # positive and negative files aligned) to the synthetic ones: the original cross-lingual data
    mix_pairs: StrictInt = Field(0, ge=0)




class XlloraRecipe(RecipeBase):
    """An XL-LoRA recipe: the shared sections (the generators' base model, their LoRA and
    training) plus pairs, synth and embed."""

    system: Literal["xllora"] = "xllora"
    pairs: PairsSection = Field(default_factory=PairsSection)
    synth: SynthSection = Field(default_factory=SynthSection)
    embed: EmbedSection = Field(default_factory=EmbedSection)

    default_stages: ClassVar[tuple[str, ...]] = ("generators", "synth", "embed", "report")
    all_stages: ClassVar[tuple[str, ...]] = ("generators", "synth", "embed", "report")
    path_keys: ClassVar[tuple[tuple[str, str], ...]] = (
        ("pairs", "positive"), ("pairs", "negative"), ("synth", "anchors"), ("embed", "sts"), ("embed", "model"))
    served: ClassVar[bool] = True

    def served_roles(self) -> list[str]:
        return ["positive", "negative"]

    def served_needs(self) -> list[tuple[str, str]]:
        return [("synth", "positive"), ("synth", "negative")] if "synth" in self.stages else []

    @classmethod
    def resolve_paths(cls, raw: dict[str, Any], resolve) -> None:
        emb = raw.get("embed")
        model = emb.get("model") if isinstance(emb, dict) else None
        super().resolve_paths(raw, resolve)
        if model is not None and not str(model).startswith((".", "/", "~")):
            emb["model"] = model  # a built-in name or hub id, not a path
        if isinstance(emb, dict) and isinstance(emb.get("parallel"), list):
            for item in emb["parallel"]:
                if isinstance(item, dict):
                    for k in ("source", "target", "file"):
                        if k in item:
                            item[k] = resolve(item[k])


class XlloraFolder(RunFolder):
    """The paths of an XL-LoRA run (see the module docstring)."""

    generators = property(lambda self: self.root / "generators")
    synth = property(lambda self: self.root / "synth")
    embed = property(lambda self: self.root / "embed")

    def generator(self, kind: str) -> Path:
        return self.generators / kind

    def generator_result(self, kind: str) -> Path:
        return self.generators / f"train-{kind}" / "result.json"


def _filters(recipe: XlloraRecipe):
    from glotkit.synth.triplets import FilterConfig

    synth_cfg = recipe.synth
    return FilterConfig(min_chars=synth_cfg.min_chars, max_chars=synth_cfg.max_chars, copy_ratio=synth_cfg.copy_ratio,
                        language=synth_cfg.language_check, reference_margin=synth_cfg.reference_margin)


def check_inputs(recipe: XlloraRecipe) -> None:
    """Fail on bad input before any model is loaded."""
    stages = set(recipe.stages)
    _filters(recipe)  # thresholds in range
    if "generators" in stages:
        from glotkit.data.pairs import read_pairs

        pairs_cfg = recipe.pairs
        if not pairs_cfg.positive or not pairs_cfg.negative:
            raise GlotkitError("pairs.positive / pairs.negative: both pair files are needed to train the generators")
        read_pairs(pairs_cfg.positive, pairs_cfg.anchor_field, pairs_cfg.positive_field, where="pairs.positive", max_pairs=1)
        read_pairs(pairs_cfg.negative, pairs_cfg.anchor_field, pairs_cfg.negative_field, where="pairs.negative", max_pairs=1)
    if "synth" in stages:
        from glotkit.data.pairs import read_anchors

        if not recipe.synth.anchors:
            raise GlotkitError("synth.anchors: no anchors file given")
        read_anchors(recipe.synth.anchors, recipe.synth.anchor_field, min_chars=1)
    if "embed" in stages:
        from glotkit.models.encoders import resolve_encoder_path

        if not Path(recipe.embed.model).exists() and recipe.embed.model.startswith((".", "/", "~")):
            raise GlotkitError(f"embed.model: {recipe.embed.model}: folder not found")
        if Path(recipe.embed.model).exists():
            resolve_encoder_path(recipe.embed.model, log=lambda m: None)


def _model(run: Run, tokenizer_only: bool = False):
    """The generators' base model, loaded once for the stages of this process (seeded first);
    with ``tokenizer_only`` (a server generates) no model: (None, tokenizer, "cpu")."""
    if tokenizer_only:
        from glotkit.models.loading import tokenizer_for

        return None, tokenizer_for(run.recipe.model, log=run.log), "cpu"
    if "model" not in run.shared:
        import torch

        from glotkit.models.loading import load_model

        torch.manual_seed(run.recipe.seed)
        run.shared["model"] = load_model(run.recipe.model, log=run.log)
    return run.shared["model"]


def _generators_done(run: Run) -> bool:
    return all((run.folder.generator(k) / "adapter_config.json").is_file() for k in ("positive", "negative"))


def _generators_stage(run: Run) -> None:
    model, tok, device = _model(run)
    model = _train_generators(run.recipe, model, tok, device, run.folder.generators, run.log, run.progress,
                              tracker=run.shared.get("tracker"))
    run.shared["model"] = (model, tok, device)


def _synth_stage(run: Run) -> None:
    recipe, f = run.recipe, run.folder
    # after training: the settings include the adapters' hash
    settle(f.synth, _synth_settings(recipe), _GENERATION_KEYS, run.log)
    if (f.synth / "summary.json").is_file():
        return
    from glotkit.generate import for_role, served
    from glotkit.generate.local import LocalGenerator
    from glotkit.synth.triplets import KINDS

    for kind in KINDS:
        if not (f.generator(kind) / "adapter_config.json").is_file():
            raise GlotkitError(f"{f.generator(kind)}: no '{kind}' generator adapter; add 'generators' to stages")
    model, tok, device = _model(run, tokenizer_only=all(served(recipe.generate, k) for k in KINDS))
    if model is not None:  # both adapters on the one base model, switched per kind
        from peft import PeftModel

        if hasattr(model, "peft_config"):
            model = model.unload()
        model = PeftModel.from_pretrained(model, str(f.generator("positive")), adapter_name="positive")
        model.load_adapter(str(f.generator("negative")), adapter_name="negative")
    generators = {kind: for_role(recipe.generate, kind, lambda kind=kind: LocalGenerator(model, tok, device, adapter=kind),
                                 tokenizer=tok, log=run.log, what="synthesis") for kind in KINDS}
    _synthesize(recipe, generators, model, f.synth, run.log, run.progress)


def _embed_stage(run: Run) -> None:
    run.shared.pop("model", None)  # the generators' model is not needed any more
    _embed(run.recipe, run.folder.synth, run.folder.embed, run.log, run.progress)


def _report_stage(run: Run) -> None:
    run.log(f"report: {write_report(run.folder, run.recipe)}")


class XlloraSystem:
    """XL-LoRA as a system (see :class:`glotkit.systems.base.System`)."""

    name = "xllora"
    title = "XL-LoRA"
    schema = XlloraRecipe
    folder_type = XlloraFolder
    verbs = (Verb("train", "only the training stage of a recipe (XL-LoRA: the two generator adapters)",
                  stages=("generators",)),
             Verb("synth", "synthetic data: 'glotkit synth triplets RECIPE' (XL-LoRA)",
                  choices={"triplets": ("synth",)}),
             Verb("embed", "train and evaluate the sentence-embedding model on a recipe's triplets",
                  stages=("embed", "report")))
    result_neutral = ()
    redone_by_settings = ("synth.", "embed.")  # each of those stages records and settles its settings
    multi_process = False

    def stages(self, recipe: XlloraRecipe) -> list[Stage]:
        return [Stage("generators", _generators_stage, done=_generators_done), Stage("synth", _synth_stage),
                Stage("embed", _embed_stage), Stage("report", _report_stage)]

    def check(self, recipe: XlloraRecipe, folder: XlloraFolder, log) -> None:
        if recipe.finetune != "lora":
            raise GlotkitError("finetune: full is not supported by system 'xllora' (its two generators are LoRA "
                               "adapters on one base model); use finetune: lora")
        check_inputs(recipe)

    def describe(self, run: Run) -> str:
        return f"XL-LoRA, stages {', '.join(run.recipe.stages)}"

    def summary(self, folder: XlloraFolder) -> dict[str, Any]:
        """The trained embedding model's figures (STS Spearman, retrieval), with the base model's."""
        trained = folder.read_json(folder.embed / "trained.json")
        if not trained:
            return {}
        base = folder.read_json(folder.embed / "base.json") or {}
        synth = folder.read_json(folder.synth / "summary.json") or {}
        out: dict[str, Any] = {"triplets": synth.get("triplets")}
        for prefix, res in (("", trained), ("base_", base)):
            for evaluation, scores in res.items():
                for metric, v in scores.items():
                    if metric not in ("n", "items", "ci_method"):
                        out[f"{prefix}{evaluation}.{metric}"] = v
        return out


SYSTEM = XlloraSystem()


# synthesis settings whose change makes the existing generations wrong
_GENERATION_KEYS = ("anchors", "anchor_field", "language", "max_new_tokens", "temperature", "top_p", "top_k",
                    "seed", "generators", "backend")


def _synth_settings(recipe: XlloraRecipe) -> dict:
    from glotkit.io import sha256_of_files

    gen = recipe.run_dir() / "generators"
    gen_cfg = recipe.generate
    return recipe.synth.model_dump(mode="json") | {
        "seed": recipe.seed, "reference_model": recipe.embed.model, "reference_prompt": recipe.embed.prompt,
        "generators": sha256_of_files(sorted(gen.glob("*/adapter_model.safetensors"))),
        "backend": ("local" if gen_cfg.backend == "local"
                    else f"openai {gen_cfg.models.get('positive')} {gen_cfg.models.get('negative')}")}


def _embed_settings(recipe: XlloraRecipe, synth_dir: Path) -> dict:
    from glotkit.io import sha256_of_files

    return recipe.embed.model_dump(mode="json") | {"seed": recipe.seed,
                                                   "triplets": sha256_of_files([synth_dir / "triplets.jsonl"])}


def _train_generators(recipe, model, tok, device, gen_dir: Path, log, progress, tracker=None):
    import torch

    from glotkit.data.pairs import read_pairs
    from glotkit.models.lora import apply_lora
    from glotkit.synth.triplets import encode_pairs
    from glotkit.train.engine import train_adapter

    pairs_cfg = recipe.pairs
    for kind, path, out_field in (("positive", pairs_cfg.positive, pairs_cfg.positive_field),
                                  ("negative", pairs_cfg.negative, pairs_cfg.negative_field)):
        out = gen_dir / kind
        if (out / "adapter_config.json").is_file():
            log(f"generator '{kind}': done before, kept")
            continue
        pairs = read_pairs(path, pairs_cfg.anchor_field, out_field, where=f"pairs.{kind}", max_pairs=pairs_cfg.max_pairs,
                           seed=recipe.seed)
        examples, dropped = encode_pairs(pairs, kind, pairs_cfg.language, tok, recipe.train.max_length)
        if dropped:
            log(f"warning: generator '{kind}': {dropped} of {len(pairs)} pairs longer than "
                f"train.max_length={recipe.train.max_length} were dropped")
        if not examples:
            raise GlotkitError(f"pairs.{kind}: no pair fits train.max_length={recipe.train.max_length}")
        torch.manual_seed(recipe.seed)
        peft_model = apply_lora(model, recipe.lora)
        train_adapter(peft_model, examples, recipe.train, what=f"generator '{kind}'", out=out,
                      work_dir=gen_dir / f"train-{kind}", seed=recipe.seed, pad_id=tok.pad_token_id, device=device,
                      log=log, progress=progress, info={"pairs": len(pairs), "dropped_too_long": dropped},
                      on_log=tracker.step_of(kind) if tracker is not None else None)
        if recipe.lora.changes_base():  # PiSSA/OLoRA rewrote the base weights: the original again
            from glotkit.models.loading import load_model

            del peft_model
            model, _, _ = load_model(recipe.model, log=log)
        else:
            model = peft_model.unload()  # the bare base again (LoRA layers removed, nothing merged)
    return model


def _synthesize(recipe, generators: dict, model, synth_dir: Path, log, progress) -> None:
    """Triplets from the two generators; ``model`` (the local PeftModel holding both adapters,
    None when a server generates) also gives the one-at-a-time speed baseline."""
    from glotkit.data.pairs import read_anchors
    from glotkit.synth.triplets import SynthConfig, baseline_speed, build_triplets, generate_pairs

    synth_cfg = recipe.synth
    anchors, stats = read_anchors(synth_cfg.anchors, synth_cfg.anchor_field, min_chars=1, limit=synth_cfg.max_anchors)
    log(f"synthesis: {len(anchors)} anchors ({stats['duplicate_anchors']} duplicates and "
        f"{stats['empty_or_short']} empty lines dropped), outputs in {synth_cfg.language}")
    cfg = SynthConfig(language=synth_cfg.language, max_new_tokens=synth_cfg.max_new_tokens, temperature=synth_cfg.temperature,
                      top_p=synth_cfg.top_p, top_k=synth_cfg.top_k, batch_size=synth_cfg.batch_size, seed=recipe.seed,
                      baseline_anchors=synth_cfg.baseline_anchors,
                      filters=_filters(recipe))
    speed = generate_pairs(generators, anchors, cfg, synth_dir, progress=progress, log=log)
    local = generators["positive"]
    base = (baseline_speed(model, local.tokenizer, anchors, cfg, local.device)
            if synth_cfg.baseline_anchors and model is not None else None)
    reference = None
    if synth_cfg.reference_margin is not None:
        from glotkit.models.encoders import load_encoder

        reference = load_encoder(recipe.embed.model, pooling=recipe.embed.pooling,
                                 max_seq_length=recipe.embed.max_seq_length, log=log)
    summary = build_triplets(synth_dir, anchors, cfg.filters, stats, reference, recipe.embed.prompt)
    summary["speed"] = {"batched": speed, "one_at_a_time": base, "batch_size": synth_cfg.batch_size}
    if base and speed.get("tokens_per_s") and base.get("tokens_per_s"):
        summary["speed"]["ratio"] = round(speed["tokens_per_s"] / base["tokens_per_s"], 2)
    if speed["seconds"]:
        summary["speed"]["triplets_per_minute"] = round(60 * summary["triplets"] / speed["seconds"], 1)
    atomic_write_json(synth_dir / "summary.json", summary)
    log(f"synthesis: {summary['triplets']} triplets kept of {len(anchors)} anchors; filtered: "
        + (", ".join(f"{k} {v}" for k, v in summary["filtered"].items()) or "none"))
    if summary["speed"].get("ratio"):
        log(f"generation speed: batched {speed['tokens_per_s']} tokens/s vs one at a time "
            f"{base['tokens_per_s']} tokens/synth_cfg = {summary['speed']['ratio']}×")


def _embed(recipe, synth_dir: Path, embed_dir: Path, log, progress) -> None:
    from glotkit.eval.embeddings import evaluate_embeddings, metrics_of
    from glotkit.eval.uncertainty import fmt
    from glotkit.models.encoders import load_encoder
    from glotkit.train.embeddings import read_triplets, train_embeddings

    embed_cfg = recipe.embed
    settle(embed_dir, _embed_settings(recipe, synth_dir), None, log)
    embed_dir.mkdir(parents=True, exist_ok=True)
    parallel = list(embed_cfg.parallel)

    def evaluate(model, tag: str) -> None:
        path = embed_dir / f"{tag}.json"
        if path.is_file():
            return
        r = evaluate_embeddings(model, sts=Path(embed_cfg.sts) if embed_cfg.sts else None, parallel=parallel,
                                prompt=embed_cfg.prompt, limit=embed_cfg.eval_limit)
        atomic_write_json(path, r)
        log(f"embeddings ({tag}): " + "; ".join(
            f"{k} " + ", ".join(f"{m} {fmt(v, s.get(m + '_ci'))}" for m, v in metrics_of(s).items())
            for k, s in r.items()))

    model_dir = embed_dir / "model"
    if not (embed_dir / "base.json").is_file() or not (embed_dir / "result.json").is_file():
        model = load_encoder(embed_cfg.model, pooling=embed_cfg.pooling, max_seq_length=embed_cfg.max_seq_length, log=log)
        evaluate(model, "base")
        if not (embed_dir / "result.json").is_file():
            triplets_path = synth_dir / "triplets.jsonl"
            if not triplets_path.is_file():
                raise GlotkitError(f"{triplets_path}: no triplets; add 'synth' to stages")
            triplets = read_triplets(triplets_path)
            if embed_cfg.mix_pairs:
                from glotkit.data.pairs import read_row_triplets

                p = recipe.pairs
                if not (p.positive and p.negative):
                    raise GlotkitError("embed.mix_pairs: needs pairs.positive and pairs.negative")
                extra = read_row_triplets(Path(p.positive), Path(p.negative), p.anchor_field, p.positive_field,
                                          p.negative_field, where="embed.mix_pairs", limit=embed_cfg.mix_pairs,
                                          seed=recipe.seed)
                log(f"embedding training: {len(extra)} triplets of the pair files mixed in (embed.mix_pairs)")
                triplets = triplets + extra
            log(f"embedding training: {len(triplets)} triplets, batch {embed_cfg.batch_size}, "
                f"{'CachedMNRL' if embed_cfg.cached else 'MNRL'} scale {embed_cfg.scale}, pooling {embed_cfg.pooling}")
            result = train_embeddings(model, triplets, model_dir, epochs=embed_cfg.epochs,
                                      batch_size=embed_cfg.batch_size, lr=embed_cfg.lr,
                                      warmup_ratio=embed_cfg.warmup_ratio, scale=embed_cfg.scale, cached=embed_cfg.cached,
                                      mini_batch_size=embed_cfg.mini_batch_size, seed=recipe.seed, prompt=embed_cfg.prompt,
                                      max_steps=embed_cfg.max_steps, progress=progress, log=log)
            atomic_write_json(embed_dir / "result.json", result.to_dict())
            log(f"embedding training: {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss}")
    if not (embed_dir / "trained.json").is_file():
        from sentence_transformers import SentenceTransformer

        evaluate(SentenceTransformer(str(model_dir), device="cpu"), "trained")


def write_report(folder: XlloraFolder, recipe: XlloraRecipe) -> Path:
    """report.md of an XL-LoRA run: generator training, filter counts, sample triplets, speed,
    and the embedding evaluation before/after."""
    from glotkit.eval.embeddings import comparison_table

    lines = [f"# glotkit run `{recipe.name}` (XL-LoRA)", "",
             f"Generator base `{recipe.model.name}`, LoRA r={recipe.lora.r}, alpha={recipe.lora.resolved_alpha():g}, "
             f"dropout {recipe.lora.dropout}, targets {recipe.lora.target_modules}; embedding model `{recipe.embed.model}` "
             f"({recipe.embed.pooling} pooling)."]
    gens = [(k, folder.read_json(folder.generator_result(k))) for k in ("positive", "negative")]
    if any(g for _, g in gens):
        lines += ["", "## Generator adapters", "", "| adapter | pairs | steps | seconds | tokens/s | final loss |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k, g in gens:
            if g:
                lines.append(f"| {k} | {g['pairs']} | {g['steps']} | {g['seconds']:.0f} | {g['tokens_per_s']:.0f} | "
                             f"{g['final_loss']} |")
    summ = folder.read_json(folder.synth / "summary.json")
    if summ:
        lines += ["", "## Synthesis", "",
                  f"- anchors: {summ['anchors_read']} read, {summ['empty_or_short_anchor_lines']} empty lines and "
                  f"{summ['duplicate_anchors']} duplicates dropped, {summ['anchors']} used",
                  f"- triplets kept: **{summ['triplets']}** (missing generations: {summ['missing_generation']})"]
        for reason, n in summ["filtered"].items():
            lines.append(f"- filtered, {reason}: {n}")
        sp = summ.get("speed") or {}
        b, o = sp.get("batched") or {}, sp.get("one_at_a_time") or {}
        if b:
            lines.append(f"- generation: {b['generations']} outputs in {b['seconds']:.0f} s, {b['tokens_per_s']} new "
                         f"tokens/s at batch {sp.get('batch_size')}, {sp.get('triplets_per_minute')} kept triplets/minute")
        if o:
            lines.append(f"- one prompt at a time (plain `model.generate`, {o['prompts']} prompts, same run): "
                         f"{o['tokens_per_s']} tokens/s → batching gives **{sp.get('ratio')}×**")
        sample = _read_jsonl(folder.synth / "triplets.jsonl")[:5]
        if sample:
            def cell(text: str) -> str:
                return text.replace("|", "\\|").replace("\n", " ")[:90]

            lines += ["", "| anchor | positive | hard negative |", "|---|---|---|"]
            lines += [f"| {cell(t['anchor'])} | {cell(t['positive'])} | {cell(t['hard_negative'])} |" for t in sample]
    base = folder.read_json(folder.embed / "base.json")
    trained = folder.read_json(folder.embed / "trained.json")
    res = folder.read_json(folder.embed / "result.json")
    if base or trained:
        lines += ["", "## Sentence embeddings before and after", ""]
        if res:
            lines.append(f"Trained {res['steps']} steps on {res['examples']} triplets in {res['seconds']:.0f} s "
                         f"(final loss {res['final_loss']}).")
            lines.append("")
        table = {k: v for k, v in (("base", base), ("trained", trained)) if v}
        lines += [comparison_table(table), "",
                  "STS: Spearman ×100 of cosine similarity against the gold scores. Retrieval on line-aligned "
                  "pairs: the query's own translation is the one relevant document (accuracy@1, MRR@10, nDCG@10, "
                  "recall@10, ×100). […]: 95 % interval, percentile bootstrap over sentence pairs (STS) or queries "
                  "(retrieval; the document pool stays whole), 1000 resamples, seed 0. Δ: trained − base on the "
                  "same items, paired bootstrap; * where its interval excludes zero."]
    lines.append("")
    atomic_write_text(folder.report, "\n".join(lines))
    return folder.report
