"""Reports: the run's metrics.json, merged predictions.jsonl, report.md and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path

from glotkit.config import Recipe
from glotkit.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, new_figure, save_figure
from glotkit.io import read_jsonl as _read_jsonl


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def plot_loss(log: list[dict], path: Path, title: str = "training loss", ylabel: str = "loss per answer token") -> Path | None:
    if not log:
        return None
    fig, ax = new_figure()
    ax.plot([h["step"] for h in log], [h["loss"] for h in log], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def write_report(run_dir: Path, recipe: Recipe) -> Path:
    base = _read_json(run_dir / "eval_base" / "metrics.json")
    tuned = _read_json(run_dir / "eval_tuned" / "metrics.json")
    tr = _read_json(run_dir / "train" / "result.json")
    versions = _read_json(run_dir / "versions.json") or {}
    metrics = {k: v for k, v in (("base", base), ("tuned", tuned)) if v is not None}
    atomic_write_json(run_dir / "metrics.json", metrics)

    # merged predictions, one line per test example
    base_p = {r["id"]: r for r in _read_jsonl(run_dir / "eval_base" / "predictions.jsonl")}
    tuned_p = {r["id"]: r for r in _read_jsonl(run_dir / "eval_tuned" / "predictions.jsonl")}
    ids = list(tuned_p or base_p)
    merged = []
    for i in ids:
        src = tuned_p.get(i) or base_p.get(i)
        row = {"id": i, "question": src["question"], "gold": src["gold"]}
        for tag, table in (("base", base_p), ("tuned", tuned_p)):
            if i in table:
                r = table[i]
                row[tag] = {k: r[k] for k in ("generation", "prediction", "em", "f1", "em_raw", "f1_raw")}
        merged.append(row)
    atomic_write_jsonl(run_dir / "predictions.jsonl", merged)

    log = _read_jsonl(run_dir / "train" / "log.jsonl")
    what = "loss per token" if recipe.task == "pretrain" else "loss per answer token"
    png = plot_loss(log, run_dir / "loss.png", f"{recipe.name}: {what}", what)

    lines = [f"# glotkit run `{recipe.name}`", ""]
    quant = " (NF4, QLoRA)" if recipe.model.quantization == "nf4" else ""
    lines.append(f"Model `{recipe.model.name}`{quant} on {versions.get('device', '?')}; "
                 f"LoRA r={recipe.lora.r}, alpha={recipe.lora.resolved_alpha():g}, "
                 f"targets {recipe.lora.target_modules}; language "
                 f"`{recipe.pretrain.language if recipe.task == 'pretrain' else recipe.data.language}`.")
    if recipe.task == "pretrain":
        lines += ["", "## Held-out text", "",
                  "| model | perplexity | bits per byte | NLL per token | tokens | bytes |", "|---|---:|---:|---:|---:|---:|"]
        for tag, m in metrics.items():
            lines.append(f"| {tag} | {m['perplexity']:.3f} | {m['bits_per_byte']:.4f} | {m['nll_per_token']:.4f} | "
                         f"{m['tokens']} | {m['bytes']} |")
        lines += ["", "Held-out documents are a seeded split by document; packed rows never attend across "
                  "documents. Bits per byte compare models with different tokenizers."]
    else:
        lines += ["", "## Test-set scores (%)", "",
                  "| model | EM | F1 | EM raw | F1 raw | n |", "|---|---:|---:|---:|---:|---:|"]
        for tag, m in metrics.items():
            lines.append(f"| {tag} | {_fmt(m['em'])} | {_fmt(m['f1'])} | {_fmt(m['em_raw'])} | {_fmt(m['f1_raw'])} | {m['n']} |")
        if base and tuned:
            lines += ["", f"Change: EM {tuned['em'] - base['em']:+.2f}, F1 {tuned['f1'] - base['f1']:+.2f} points."]
        lines += ["", "EM/F1 use language-aware normalization (NFC, Romanian cedilla → comma-below, case, "
                  "Unicode punctuation, whitespace; English articles only for English); *raw* compares the "
                  "stripped strings as generated."]
    if tr:
        lines += ["", "## Training", "",
                  f"- {tr['trainable_line']}",
                  f"- {tr['steps']} steps over {tr['examples']} examples "
                  f"(encoding: {tr['encode']['truncated']} truncated, {tr['encode']['dropped']} dropped as too long)",
                  f"- {tr['seconds']:.0f} s, **{tr['tokens_per_s']:.0f} tokens/s** "
                  f"({tr['supervised_tokens_per_s']:.0f} supervised tokens/s), final loss {tr['final_loss']}",
                  f"- peak memory: {', '.join(f'{k} {v:.0f}' for k, v in tr['memory'].items())}",
                  f"- loss on answer tokens only, LM head at answer positions only: {tr['fast_loss']}"
                  if recipe.task == "qa" else "- loss on every token of the packed documents"]
        if png:
            lines += ["", "![training loss](loss.png)"]
    gen = [(t, m) for t, m in metrics.items() if "examples_per_s" in m]
    if gen:
        lines += ["", "## Generation", ""]
    for tag, m in gen:
        if "examples_per_s" in m:
            lines.append(f"- generation ({tag}): {m['examples_per_s']:.2f} examples/s, "
                         f"{m['generated_tokens_per_s']:.1f} new tokens/s, {m['seconds']:.0f} s")
    changed = [r for r in merged if "base" in r and "tuned" in r and r["base"]["prediction"] != r["tuned"]["prediction"]]
    if changed:
        lines += ["", "## Sample predictions", "", "| question | gold | base | tuned |", "|---|---|---|---|"]
        for r in changed[:8]:
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:80]
            lines.append(f"| {cell(r['question'])} | {cell(r['gold'][0])} | {cell(r['base']['prediction'])} | "
                         f"{cell(r['tuned']['prediction'])} |")
    lines += _suite_section(run_dir) + _memory_section(run_dir)
    lines += ["", "## Environment", "", "```", json.dumps(versions, indent=1), "```", ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out


def _suite_section(run_dir: Path) -> list[str]:
    results = _read_json(run_dir / "suite" / "results.json")
    if not results:
        return []
    from glotkit.eval.suite import suite_table

    r0 = results[0]
    items = "all test items" if r0["limit"] is None else f"the first {r0['limit']} test items (seeded order)"
    secs = sum(r.get("seconds", 0) for r in results)
    return ["", "## Task suite (base vs adapted)", "",
            f"Main metric of each task ×100; seed {r0['seed']}, batch size {r0['batch_size']}, "
            f"{items}; "
            f"{secs / 60:.1f} min in all. Mode 'loglik': the most likely option (classification, multiple "
            "choice) or the expected score 0–5 (STS); 'generate': greedy generation parsed by the task. "
            "Every figure, its template and predictions are in suite/.", "", suite_table(results), "",
            "![task suite](suite/results.png)"]


def _memory_section(run_dir: Path) -> list[str]:
    mem = _read_json(run_dir / "memory.json")
    if not mem:
        return []
    est = mem["estimate_before_loading"]
    lines = ["", "## Memory", "", mem["table"], "",
             f"M1: resident memory after loading; M2: peak while generating from a {mem['rows'][0].get('prompt_tokens', '~1000')}"
             "-token prompt; each mode in a fresh process; CPU figures are RSS (CUDA: max allocated). "
             f"Estimates come from the config alone (the model built on the meta device): "
             f"{est['linear_params']:,} parameters in linear layers, {est['other_params']:,} others, of which the "
             f"embedding {est['embedding_params']:,} ({est['vocab_size']:,} × {est['hidden_size']})."]
    if mem.get("trim_vocab_to"):
        lines.append(f"The trimmed-vocabulary column keeps the {mem['trim_vocab_to']:,} token ids the training corpus uses.")
    t = mem.get("training")
    if t:
        meas = t["measured_peak_rss_mb"]
        gap = f", measured peak RSS {meas:.0f} MB ({meas / t['estimate_mb']:.2f}× the estimate; RSS also holds " \
              "the Python/torch runtime)" if meas else ""
        lines += ["", f"Training ({t['mode']}, {t['tokens_per_forward']} tokens per forward pass), estimate: weights "
                  f"{t['weights_mb']:.0f} + LoRA with AdamW state {t['lora_and_adam_mb']:.0f} + activations "
                  f"{t['activations_mb']:.0f} + LM head {t['lm_head_mb']:.0f} = **{t['estimate_mb']:.0f} MB**{gap}."]
    return lines


def write_xllora_report(run_dir: Path, recipe: Recipe) -> Path:
    """report.md of an XL-LoRA run: generator training, filter counts, sample triplets, speed,
    and the embedding evaluation before/after."""
    from glotkit.eval.embeddings import comparison_table

    lines = [f"# glotkit run `{recipe.name}` (XL-LoRA)", "",
             f"Generator base `{recipe.model.name}`, LoRA r={recipe.lora.r}, alpha={recipe.lora.resolved_alpha():g}, "
             f"dropout {recipe.lora.dropout}, targets {recipe.lora.target_modules}; embedding model `{recipe.embed.model}` "
             f"({recipe.embed.pooling} pooling)."]
    gens = [(k, _read_json(run_dir / "generators" / f"train-{k}" / "result.json")) for k in ("positive", "negative")]
    if any(g for _, g in gens):
        lines += ["", "## Generator adapters", "", "| adapter | pairs | steps | seconds | tokens/s | final loss |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k, g in gens:
            if g:
                lines.append(f"| {k} | {g['pairs']} | {g['steps']} | {g['seconds']:.0f} | {g['tokens_per_s']:.0f} | "
                             f"{g['final_loss']} |")
    summ = _read_json(run_dir / "synth" / "summary.json")
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
        sample = _read_jsonl(run_dir / "synth" / "triplets.jsonl")[:5]
        if sample:
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:90]
            lines += ["", "| anchor | positive | hard negative |", "|---|---|---|"]
            lines += [f"| {cell(t['anchor'])} | {cell(t['positive'])} | {cell(t['hard_negative'])} |" for t in sample]
    base = _read_json(run_dir / "embed" / "base.json")
    trained = _read_json(run_dir / "embed" / "trained.json")
    res = _read_json(run_dir / "embed" / "result.json")
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
                  "recall@10, ×100)."]
    lines.append("")
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out


def write_distill_report(run_dir: Path, recipe: Recipe) -> Path:
    """report.md of a distillation run: splits, the prompt comparison, teacher, traces kept per
    language and label, students, the efficiency–accuracy table with ranks, and the answer to
    'does the student stay within N points of the teacher in every language'."""
    d = recipe.distill
    lines = [f"# glotkit run `{recipe.name}` (HIPE-2026 distillation)", "",
             f"Teacher `{recipe.model.name}`{' (NF4, QLoRA)' if recipe.model.quantization == 'nf4' else ''} with LoRA "
             f"r={recipe.lora.r}, alpha={recipe.lora.resolved_alpha():g}, targets {recipe.lora.target_modules}; "
             f"students: " + ", ".join(f"`{s.name}` = `{s.model}`{' with a trimmed vocabulary' if s.trim_vocab else ''}"
                                        for s in d.students) + f"; {d.level}-level distillation.",
             f"Articles longer than {d.max_chars} characters are shown as the excerpt of that length that covers "
             "the most mentions of the pair (cut at whitespace, marked with …)."]
    split = _read_json(run_dir / "split" / "summary.json")
    if split:
        lines += ["", "## Data", "", "Seeded split by document of the gold train files (test documents are never "
                  "trained on nor used to pick prompts); pairs are a seeded sample per language.", "",
                  "| split | " + " | ".join(sorted(split["train"])) + " |", "|---|" + "---:|" * len(split["train"])]
        for name, per in split.items():
            lines.append(f"| {name} | " + " | ".join(f"{per[x]['documents']} docs / {per[x]['pairs']} pairs"
                                                     if x in per else "–" for x in sorted(split["train"])) + " |")
        if "silver" in split:
            lines.append("")
            lines.append("The silver (automatically annotated `sandbox/`) pairs were added to the teacher's training.")
    table = run_dir / "compare" / "table.md"
    if table.is_file():
        lines += ["", "## 1. Prompt comparison (dev split, untuned models)", "", table.read_text(encoding="utf-8").rstrip(),
                  "", "Score: mean over languages of (macro recall of at + macro recall of isAt) / 2, ×100. Binary: "
                  "PROBABLE counted as TRUE. A parse failure counts as FALSE/FALSE."]
    teach = _read_json(run_dir / "teacher" / "train" / "result.json")
    traces = _read_json(run_dir / "traces" / "summary.json")
    if teach or traces:
        lines += ["", "## 2. Teacher and its traces", ""]
        if teach:
            lines.append(f"- teacher ({d.teacher_format} answers on the gold labels): {teach['examples']} examples, "
                         f"{teach['steps']} steps in {teach['seconds']:.0f} s, {teach['tokens_per_s']:.0f} tokens/s, "
                         f"final loss {teach['final_loss']}")
        if traces:
            lines.append(f"- traces: the teacher explains each gold label (given in the prompt), then answers again "
                         f"after its explanation without it; **{traces['kept']} of {traces['written']} kept** "
                         f"({traces['new_tokens']} tokens in {traces['seconds']:.0f} s, {traces['tokens_per_s']} tokens/s)")
            lines += ["", "| source:language | written | kept | dropped | kept per label (at/isAt) |", "|---|---:|---:|---|---|"]
            for k, v in sorted(traces["counts"].items()):
                lines.append(f"| {k} | {v['written']} | {v['kept']} | "
                             + ", ".join(f"{r}: {n}" for r, n in v["dropped"].items())
                             + " | " + ", ".join(f"{lab} {c['kept']}/{c['written']}" for lab, c in sorted(v["by_label"].items()))
                             + " |")
            sample = _read_jsonl(run_dir / "traces" / "traces.jsonl")[:3]
            if sample:
                lines += ["", "Sample traces:", ""]
                lines += [f"- {t['language']} {t['at']}/{t['isAt']}: {t['explanation'][:300]}" for t in sample]
    studs = [(s.name, _read_json(run_dir / "students" / s.name / "train" / "result.json")) for s in d.students]
    if any(r for _, r in studs):
        lines += ["", "## 3. Students", ""]
        for name, r in studs:
            if r:
                trim = _read_json(run_dir / "students" / name / "model" / "glotkit-trim.json")
                extra = (f"; vocabulary trimmed {trim['vocab_before']:,} -> {trim['vocab_after']:,} tokens, "
                         f"{trim['params_before']:,} -> {trim['params_after']:,} parameters" if trim else "")
                lines.append(f"- `{name}`: {r['examples']} traces, {r['steps']} steps in {r['seconds']:.0f} s, "
                             f"{r['tokens_per_s']:.0f} tokens/s, final loss {r['final_loss']}{extra}")
    eff = _read_json(run_dir / "evaluate" / "table.json")
    if eff:
        lines += ["", "## Efficiency and accuracy (held-out test split)", "", eff["markdown"].rstrip(), "",
                  "Params: the model's plus the adapter's. Disk: the weight files shipped (model safetensors + "
                  "adapter). Peak RSS: a process that loads only this model and labels the test pairs (`served`: the "
                  "model answered from a server (`generate.backend: openai`), whose memory is not measured here; its "
                  "pairs/s is the server's, with `generate.concurrency` requests in flight). Ranks as in "
                  "HIPE-2026: by accuracy, by parameters, by size, and by the mean of the three (1 = best).", "",
                  f"**Does the student stay within {eff['within_points']:g} points of the teacher in every language?**", ""]
        lines += [f"- {a}" for a in eff["answer"]] or ["- no student was evaluated"]
        lines += _confusions(run_dir, [r["label"] for r in eff["rows"] if r["role"] in ("teacher", "student")])
    lines.append("")
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out


def _confusions(run_dir: Path, labels) -> list[str]:
    """Per-label confusion matrices (gold rows, predicted columns), summed over the languages."""
    from glotkit.hipe.distill import model_slug

    out = ["", "### Confusion matrices (test split, all languages; rows gold, columns predicted)", ""]
    for label in labels:
        r = _read_json(run_dir / "evaluate" / model_slug(label) / "result.json")
        if not r:
            continue
        for rel in ("at", "isAt"):
            names = next(iter(r["languages"].values()))["confusion"][rel]["labels"]
            total = [[sum(v["confusion"][rel]["matrix"][i][j] for v in r["languages"].values()) for j in range(len(names))]
                     for i in range(len(names))]
            out += [f"`{label}`, {rel}:", "", "| gold \\ predicted | " + " | ".join(names) + " |",
                    "|---|" + "---:|" * len(names)]
            out += [f"| {g} | " + " | ".join(str(x) for x in row) + " |" for g, row in zip(names, total)]
            out.append("")
    return out
