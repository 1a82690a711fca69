"""The XL-LoRA recipe (``task: xllora``): generator adapters -> triplets -> sentence embeddings.

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
from typing import Callable, Sequence

from glotkit.config import Recipe
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json


def _filters(recipe: Recipe):
    from glotkit.synth.triplets import FilterConfig

    s = recipe.synth
    return FilterConfig(min_chars=s.min_chars, max_chars=s.max_chars, copy_ratio=s.copy_ratio,
                        language=s.language_check, reference_margin=s.reference_margin)


def check_inputs(recipe: Recipe) -> None:
    """Fail on bad input before any model is loaded."""
    stages = set(recipe.stages)
    _filters(recipe)  # thresholds in range
    if "generators" in stages:
        from glotkit.data.pairs import read_pairs

        p = recipe.pairs
        if not p.positive or not p.negative:
            raise GlotkitError("pairs.positive / pairs.negative: both pair files are needed to train the generators")
        read_pairs(p.positive, p.anchor_field, p.positive_field, where="pairs.positive", max_pairs=1)
        read_pairs(p.negative, p.anchor_field, p.negative_field, where="pairs.negative", max_pairs=1)
    if "synth" in stages:
        from glotkit.data.pairs import read_anchors

        if not recipe.synth.anchors:
            raise GlotkitError("synth.anchors: no anchors file given")
        read_anchors(recipe.synth.anchors, recipe.synth.anchor_field, min_chars=1)
    if "embed" in stages:
        from glotkit.train.embeddings import resolve_encoder_path

        if not Path(recipe.embed.model).exists() and recipe.embed.model.startswith((".", "/", "~")):
            raise GlotkitError(f"embed.model: {recipe.embed.model}: folder not found")
        if Path(recipe.embed.model).exists():
            resolve_encoder_path(recipe.embed.model, log=lambda m: None)


def run_xllora(recipe: Recipe, run_dir: Path, log: Callable[[str], None] = print, progress: bool = True) -> None:
    """Run the XL-LoRA stages; the caller has run :func:`check_inputs`."""
    import torch

    stages = set(recipe.stages)
    gen_dir, synth_dir, embed_dir = run_dir / "generators", run_dir / "synth", run_dir / "embed"
    need_generators = "generators" in stages and not all(
        (gen_dir / k / "adapter_config.json").is_file() for k in ("positive", "negative"))
    model = tok = device = None
    if need_generators:
        from glotkit.models.loading import load_model

        torch.manual_seed(recipe.seed)
        model, tok, device = load_model(recipe.model, log=log)
        model = _train_generators(recipe, model, tok, device, gen_dir, log, progress)
    if "synth" in stages:  # after training: the settings include the adapters' hash
        _settle_settings(synth_dir, _synth_settings(recipe), _GENERATION_KEYS, log)
        if not (synth_dir / "summary.json").is_file():
            if recipe.generate.backend == "openai":  # the server generates: the tokenizer is enough
                from glotkit.models.loading import tokenizer_for

                model, device, tok = None, "cpu", tokenizer_for(recipe.model, log=log)
            elif model is None:
                from glotkit.models.loading import load_model

                model, tok, device = load_model(recipe.model, log=log)
            _synthesize(recipe, model, tok, device, gen_dir, synth_dir, log, progress)
    del model
    if "embed" in stages:
        _embed(recipe, synth_dir, embed_dir, log, progress)
    if "report" in stages:
        from glotkit.report import write_xllora_report

        path = write_xllora_report(run_dir, recipe)
        log(f"[glotkit] report: {path}")


# synthesis settings whose change makes the existing generations wrong
_GENERATION_KEYS = ("anchors", "anchor_field", "language", "max_new_tokens", "temperature", "top_p", "top_k",
                    "seed", "generators", "backend")


def _synth_settings(recipe: Recipe) -> dict:
    from glotkit.io import sha256_of_files

    gen = recipe.run_dir() / "generators"
    g = recipe.generate
    return recipe.synth.model_dump(mode="json") | {
        "seed": recipe.seed, "reference_model": recipe.embed.model, "reference_prompt": recipe.embed.prompt,
        "generators": sha256_of_files(sorted(gen.glob("*/adapter_model.safetensors"))),
        "backend": "local" if g.backend == "local" else f"openai {g.models.get('positive')} {g.models.get('negative')}"}


def _embed_settings(recipe: Recipe, synth_dir: Path) -> dict:
    from glotkit.io import sha256_of_files

    return recipe.embed.model_dump(mode="json") | {"seed": recipe.seed,
                                                   "triplets": sha256_of_files([synth_dir / "triplets.jsonl"])}


def _settle_settings(folder: Path, settings: dict, restart_keys: Sequence[str] | None, log) -> None:
    """Compare a stage's saved settings with the recipe's.  A change of a ``restart_keys`` key
    (all keys when None) moves the folder aside; any other change only removes the stage's
    'done' marker (summary.json) so that it runs again on what it has."""
    import json
    import shutil

    path = folder / "settings.json"
    if folder.is_dir() and path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if not changed:
            return
        if restart_keys is None or any(k in restart_keys for k in changed):
            n = 1
            while folder.with_name(f"{folder.name}.previous-{n}").exists():
                n += 1
            aside = folder.with_name(f"{folder.name}.previous-{n}")
            shutil.move(str(folder), str(aside))
            log(f"[glotkit] {folder.name}: settings changed ({', '.join(changed)}); earlier outputs moved to {aside}")
        else:
            (folder / "summary.json").unlink(missing_ok=True)
            log(f"[glotkit] {folder.name}: settings changed ({', '.join(changed)}); continuing on the existing generations")
    elif folder.is_dir() and any(folder.iterdir()) and not path.is_file():
        return  # made before settings were recorded: keep as is
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def _train_generators(recipe, model, tok, device, gen_dir: Path, log, progress):
    import torch

    from glotkit.data.pairs import read_pairs
    from glotkit.models.lora import apply_lora
    from glotkit.synth.triplets import encode_pairs
    from glotkit.train.engine import train_adapter

    p = recipe.pairs
    for kind, path, out_field in (("positive", p.positive, p.positive_field), ("negative", p.negative, p.negative_field)):
        out = gen_dir / kind
        if (out / "adapter_config.json").is_file():
            log(f"[glotkit] generator '{kind}': done before, kept")
            continue
        pairs = read_pairs(path, p.anchor_field, out_field, where=f"pairs.{kind}", max_pairs=p.max_pairs,
                           seed=recipe.seed)
        examples, dropped = encode_pairs(pairs, kind, p.language, tok, recipe.train.max_length)
        if dropped:
            log(f"[glotkit] warning: generator '{kind}': {dropped} of {len(pairs)} pairs longer than "
                f"train.max_length={recipe.train.max_length} were dropped")
        if not examples:
            raise GlotkitError(f"pairs.{kind}: no pair fits train.max_length={recipe.train.max_length}")
        torch.manual_seed(recipe.seed)
        peft_model = apply_lora(model, recipe.lora)
        train_adapter(peft_model, examples, recipe.train, what=f"generator '{kind}'", out=out,
                      work_dir=gen_dir / f"train-{kind}", seed=recipe.seed, pad_id=tok.pad_token_id, device=device,
                      log=log, progress=progress, info={"pairs": len(pairs), "dropped_too_long": dropped})
        model = peft_model.unload()  # the bare base again (LoRA layers removed, nothing merged)
    return model


def _synthesize(recipe, model, tok, device, gen_dir: Path, synth_dir: Path, log, progress) -> None:
    from peft import PeftModel

    from glotkit.data.pairs import read_anchors
    from glotkit.synth.triplets import SynthConfig, baseline_speed, build_triplets, generate_pairs

    for kind in ("positive", "negative"):
        if not (gen_dir / kind / "adapter_config.json").is_file():
            raise GlotkitError(f"{gen_dir / kind}: no '{kind}' generator adapter; add 'generators' to stages")
    s = recipe.synth
    anchors, stats = read_anchors(s.anchors, s.anchor_field, min_chars=1, limit=s.max_anchors)
    log(f"[glotkit] synthesis: {len(anchors)} anchors ({stats['duplicate_anchors']} duplicates and "
        f"{stats['empty_or_short']} empty lines dropped), outputs in {s.language}")
    servers = None
    if model is None:  # generate.backend: openai
        from glotkit.generate.server import ServerGenerator

        servers = {k: ServerGenerator.connect(recipe.generate, k, log, "synthesis") for k in ("positive", "negative")}
    else:
        if hasattr(model, "peft_config"):
            model = model.unload()
        model = PeftModel.from_pretrained(model, str(gen_dir / "positive"), adapter_name="positive")
        model.load_adapter(str(gen_dir / "negative"), adapter_name="negative")
    cfg = SynthConfig(language=s.language, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                      top_p=s.top_p, top_k=s.top_k, batch_size=s.batch_size, seed=recipe.seed, baseline_anchors=s.baseline_anchors,
                      filters=_filters(recipe))
    speed = generate_pairs(model, tok, anchors, cfg, synth_dir, device=device, progress=progress, log=log,
                           servers=servers)
    base = baseline_speed(model, tok, anchors, cfg, device) if s.baseline_anchors and not servers else None
    reference = None
    if s.reference_margin is not None:
        from glotkit.train.embeddings import load_encoder

        reference = load_encoder(recipe.embed.model, pooling=recipe.embed.pooling,
                                 max_seq_length=recipe.embed.max_seq_length, log=log)
    summary = build_triplets(synth_dir, anchors, cfg.filters, stats, reference, recipe.embed.prompt)
    summary["speed"] = {"batched": speed, "one_at_a_time": base, "batch_size": s.batch_size}
    if base and speed.get("tokens_per_s") and base.get("tokens_per_s"):
        summary["speed"]["ratio"] = round(speed["tokens_per_s"] / base["tokens_per_s"], 2)
    if speed["seconds"]:
        summary["speed"]["triplets_per_minute"] = round(60 * summary["triplets"] / speed["seconds"], 1)
    atomic_write_json(synth_dir / "summary.json", summary)
    log(f"[glotkit] synthesis: {summary['triplets']} triplets kept of {len(anchors)} anchors; filtered: "
        + (", ".join(f"{k} {v}" for k, v in summary["filtered"].items()) or "none"))
    if summary["speed"].get("ratio"):
        log(f"[glotkit] generation speed: batched {speed['tokens_per_s']} tokens/s vs one at a time "
            f"{base['tokens_per_s']} tokens/s = {summary['speed']['ratio']}×")


def _embed(recipe, synth_dir: Path, embed_dir: Path, log, progress) -> None:
    from glotkit.eval.embeddings import evaluate_embeddings
    from glotkit.train.embeddings import load_encoder, read_triplets, train_embeddings

    e = recipe.embed
    _settle_settings(embed_dir, _embed_settings(recipe, synth_dir), None, log)
    embed_dir.mkdir(parents=True, exist_ok=True)
    parallel = list(e.parallel)

    def evaluate(model, tag: str) -> None:
        path = embed_dir / f"{tag}.json"
        if path.is_file():
            return
        r = evaluate_embeddings(model, sts=Path(e.sts) if e.sts else None, parallel=parallel, prompt=e.prompt,
                                limit=e.eval_limit)
        atomic_write_json(path, r)
        log(f"[glotkit] embeddings ({tag}): " + "; ".join(
            f"{k} " + ", ".join(f"{m} {v:.2f}" for m, v in s.items() if m != "n") for k, s in r.items()))

    model_dir = embed_dir / "model"
    if not (embed_dir / "base.json").is_file() or not (embed_dir / "result.json").is_file():
        model = load_encoder(e.model, pooling=e.pooling, max_seq_length=e.max_seq_length, log=log)
        evaluate(model, "base")
        if not (embed_dir / "result.json").is_file():
            triplets_path = synth_dir / "triplets.jsonl"
            if not triplets_path.is_file():
                raise GlotkitError(f"{triplets_path}: no triplets; add 'synth' to stages")
            triplets = read_triplets(triplets_path)
            log(f"[glotkit] embedding training: {len(triplets)} triplets, batch {e.batch_size}, "
                f"{'CachedMNRL' if e.cached else 'MNRL'} scale {e.scale}, pooling {e.pooling}")
            result = train_embeddings(model, triplets, model_dir, epochs=e.epochs, batch_size=e.batch_size, lr=e.lr,
                                      warmup_ratio=e.warmup_ratio, scale=e.scale, cached=e.cached,
                                      mini_batch_size=e.mini_batch_size, seed=recipe.seed, prompt=e.prompt,
                                      max_steps=e.max_steps, progress=progress, log=log)
            atomic_write_json(embed_dir / "result.json", result.to_dict())
            log(f"[glotkit] embedding training: {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss}")
    if not (embed_dir / "trained.json").is_file():
        from sentence_transformers import SentenceTransformer

        evaluate(SentenceTransformer(str(model_dir), device="cpu"), "trained")
