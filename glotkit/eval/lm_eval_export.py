"""Suite tasks as lm-evaluation-harness tasks, so that anyone can reproduce a glotkit figure there.

``glotkit eval --export-lm-eval DIR`` writes, for each selected task and number of shots, a task
YAML ``glotkit_<task>_<k>shot.yaml``; the data each reads (``<task>/test.jsonl``: glotkit's test
items in glotkit's order, cut to ``--limit``; ``<task>/train.jsonl``: the demonstration pool in
glotkit's order); and ``glotkit_lm_eval.py``, which loads that data and holds ``GlotkitSampler``,
the few-shot sampler that draws each item's demonstrations as :func:`glotkit.eval.suite.draw_shots`
does (a pure function of the suite seed and the item's index).  Every record carries the prompt
text glotkit builds (``glotkit_text``: the task's template filled), its answer as a demonstration
(``glotkit_answer``), the options glotkit scores (``glotkit_choices``) and the gold option
(``glotkit_gold``).

What lm-evaluation-harness then computes, and how it relates to glotkit's figures:

* classification and multiple choice (``multiple_choice``): the same contexts and continuations
  as glotkit's log-likelihood mode (the option after ``target_delimiter``: a space, or nothing
  when the template ends in whitespace, whose trailing whitespace lm-eval moves into the
  continuation just as glotkit does), hence the same option log-likelihoods and choices; lm-eval
  reports accuracy (``acc``), glotkit also macro-F1 / exact set match, computed from the same choices;
* regression: lm-eval scores the options ``0`` … ``5`` (same log-likelihoods as glotkit) and
  reports the accuracy of the most likely one against the rounded gold score; glotkit's figure is
  the Spearman correlation of the expected score under those probabilities;
* QA and summarization (``generate_until``): greedy generation to the same stop strings and
  token limit; lm-eval's ``exact_match`` compares raw strings, while glotkit's QA EM/F1 normalize
  per language (Romanian diacritics, comma-below letters, articles) and its summaries are scored
  with ROUGE — compare the generations, not those figures.

The runtime module is written as text: it runs inside lm-evaluation-harness (which it imports),
not inside glotkit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from glotkit.errors import GlotkitError

RUNTIME = "glotkit_lm_eval.py"

_RUNTIME_SOURCE = '''"""Data and few-shot sampler of the tasks glotkit exported here (written by glotkit eval --export-lm-eval).

The demonstrations of test item i at seed s are random.Random(s * 100003 + i).sample(train, k),
as glotkit draws them; lm-evaluation-harness hands the sampler the item being evaluated because
each task's fewshot split is its test split, and the sampler then draws from the task's own
train.jsonl (never from the test items).
"""

import json
import random
from pathlib import Path

from lm_eval.api.samplers import ContextSampler

HERE = Path(__file__).resolve().parent
_POOLS = {}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pool(task):
    if task not in _POOLS:
        _POOLS[task] = _read(HERE / task / "train.jsonl")
    return _POOLS[task]


def load(glotkit_task, **kwargs):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_read(HERE / glotkit_task / "test.jsonl"))})


class GlotkitSampler(ContextSampler):
    def sample(self, n, eval_doc=None, df=None, **kwargs):
        if n == 0:
            return []
        if eval_doc is None:
            raise ValueError("glotkit tasks draw demonstrations per test item: keep fewshot_split equal to test_split")
        train = pool(eval_doc["glotkit_task"])
        if n > len(train):
            raise ValueError(f"{n} demonstrations asked, the pool has {len(train)}")
        return random.Random(eval_doc["glotkit_seed"] * 100003 + eval_doc["glotkit_index"]).sample(train, n)
'''


def _record(task, r: dict, *, index: int | None, seed: int) -> dict:
    """One exported record: the task's own fields and what lm-eval reads (``glotkit_*``)."""
    from glotkit.eval.suite import split_continuation

    options = _options(task)
    rec = {k: v for k, v in r.items() if not k.startswith("glotkit_")}
    rec.update(glotkit_task=task.name, glotkit_seed=seed, glotkit_index=-1 if index is None else index,
               glotkit_text=task.template.format(**r), glotkit_answer=task.answer(r), glotkit_choices=options)
    if options:
        rec["glotkit_gold"] = _gold_index(task, r, options)
    # the context glotkit scores options after (its trailing whitespace goes into the continuation)
    rec["glotkit_context"] = split_continuation(rec["glotkit_text"], "")[0]
    return rec


def _options(task) -> list[str]:
    if task.kind in ("classification", "multichoice"):
        return task.options()
    if task.kind == "regression":
        return [str(v) for v in range(6)]
    return []


def _gold_index(task, r: dict, options: Sequence[str]) -> int:
    if task.kind == "regression":
        return min(5, max(0, int(round(float(r["score"])))))
    if task.kind == "multichoice":
        gold = task.gold(r)
        for i, o in enumerate(options):
            if frozenset(x.strip() for x in o.split(",")) == gold:
                return i
        raise GlotkitError(f"task '{task.name}': gold answer {sorted(gold)} is not one of the scored options")
    return list(options).index(task.gold(r))


def _yaml(task, k: int, limit_note: str) -> dict:
    from glotkit.eval.suite import answer_separator

    cfg: dict = {
        "task": f"glotkit_{task.name.replace('-', '_')}_{k}shot",
        "custom_dataset": "!function glotkit_lm_eval.load",
        "dataset_kwargs": {"glotkit_task": task.name},
        "test_split": "test",
        "fewshot_split": "test",
        "fewshot_config": {"sampler": "!function glotkit_lm_eval.GlotkitSampler", "doc_to_target": "glotkit_answer"},
        "num_fewshot": k,
        "doc_to_text": "glotkit_text",
        "target_delimiter": answer_separator(task.template),
        "fewshot_delimiter": "\n\n",
        "metadata": {"version": 1.0, "glotkit_kind": task.kind, "note": limit_note},
    }
    if _options(task):
        cfg |= {"output_type": "multiple_choice", "doc_to_choice": "glotkit_choices", "doc_to_target": "glotkit_gold",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    else:
        cfg |= {"output_type": "generate_until", "doc_to_target": "glotkit_answer",
                "generation_kwargs": {"until": list(task.stop), "max_gen_toks": task.max_new_tokens, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    return cfg


def _dump_yaml(cfg: dict) -> str:
    """YAML with lm-eval's ``!function`` tags left unquoted."""
    import yaml

    text = yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False, width=1000)
    return text.replace("'!function glotkit_lm_eval.load'", "!function glotkit_lm_eval.load").replace(
        "'!function glotkit_lm_eval.GlotkitSampler'", "!function glotkit_lm_eval.GlotkitSampler")


def export_tasks(tasks, *, shots: Sequence[int], seed: int, limit: int | None, data_root: Path,
                 task_data: dict[str, Path], out_dir: Path) -> list[str]:
    """Write the tasks (see the module's text) into ``out_dir``; returns the lm-eval task names."""
    from glotkit.eval.suite import check_template, test_items
    from glotkit.io import atomic_write_jsonl, atomic_write_text

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GlotkitError(f"--export-lm-eval {out_dir}: is a file; give a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        data = task.load(Path(task_data.get(task.name, data_root)))
        test = test_items(task, data, limit)
        if not test:
            raise GlotkitError(f"task '{task.name}': empty test split")
        check_template(task, test[0])
        folder = out_dir / task.name
        folder.mkdir(exist_ok=True)
        atomic_write_jsonl(folder / "test.jsonl", [_record(task, r, index=i, seed=seed) for i, r in enumerate(test)])
        atomic_write_jsonl(folder / "train.jsonl", [_record(task, r, index=None, seed=seed) for r in data.get("train") or []])
        note = (f"glotkit's first {limit} test items of its seeded order" if limit else "glotkit's whole test split") + \
            f"; demonstrations drawn as glotkit draws them with seed {seed}"
        for k in shots:
            cfg = _yaml(task, k, note)
            atomic_write_text(out_dir / f"{cfg['task']}.yaml", _dump_yaml(cfg))
            names.append(cfg["task"])
    atomic_write_text(out_dir / RUNTIME, _RUNTIME_SOURCE)
    atomic_write_text(out_dir / "README.md", _readme(names, [t.name for t in tasks], out_dir))
    return names


def _readme(names: Sequence[str], folders: Sequence[str], out_dir: Path) -> str:
    return "\n".join([
        "# glotkit tasks for lm-evaluation-harness", "",
        "Written by `glotkit eval --export-lm-eval`. Run them with:", "",
        "```",
        f"lm_eval --model hf --model_args pretrained=MODEL --include_path {out_dir} --tasks {','.join(names)} "
        "--log_samples --output_path lm-eval-out",
        "```", "",
        "Keep each task's `num_fewshot` (the number in its name): `GlotkitSampler` draws the demonstrations glotkit "
        "drew for that item; another `--num_fewshot` draws that many the same way. "
        "Per-item option log-likelihoods are in the samples file (`resps`), to compare with glotkit's "
        "`option_logliks` in its predictions files. See glotkit/eval/lm_eval_export.py for where the two tools' "
        "metrics differ (glotkit's macro-F1, Spearman of the expected score, language-aware QA normalization).", "",
        "Data: " + ", ".join(f"`{f}/`" for f in folders) + " (each: test.jsonl, train.jsonl).",
        ""])


def lm_eval_logliks(samples: Sequence[dict]) -> dict[int, list[float]]:
    """From lm-eval's logged samples of a multiple-choice task: glotkit index -> each option's
    log-likelihood."""
    out = {}
    for s in samples:
        out[int(s["doc"]["glotkit_index"])] = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0])
                                              for r in s["resps"]]
    return out

