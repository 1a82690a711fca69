"""Generation and option-scoring speed: glotkit against what users would run instead, same model,
same prompts, same machine, each engine in its own fresh process.

    python benchmarks/generate_speed.py [--scenarios qa,options,labels,hipe,sample] [--model gemma-3-270m]
                                        [--trimmed DIR] [--n-qa 48] [--repeats 1]

Scenarios (the prompts are the ones glotkit's stages build):
  qa       XQuAD-ro questions in the QA evaluation's prompt (context first), greedy, up to 24 new
           tokens, stop at a newline after the answer.  Engines: ``hf1`` (Hugging Face
           ``model.generate``, one prompt at a time: the anchor), ``hfbatch`` (``generate`` on
           length-sorted batches of ``--hf-batch`` prompts: the best plain alternative), ``glotkit``
           (LocalGenerator.greedy: token budget, shared prefixes, finished rows leaving),
           ``glotkit-vocab`` (the same, the LM head restricted to the tokens the Romanian corpus
           uses: ``restrict_vocab``), ``glotkit-trimmed`` (the same on ``--trimmed``, a model
           made by ``glotkit trim-vocab``; its tokenizer splits words outside its corpus
           differently, so its outputs may differ).
           Greedy outputs are compared with the anchor's (identical: counted).
  options  the suite's 3-shot sentiment task (LaRoSeDa; items × 2 labels): ``plain`` (each
           (prompt, option) one sequence through the model, one at a time) against ``glotkit``
           (the suite's option scoring); the largest log-likelihood difference is printed.
  labels   the distillation's label scoring: the HIPE prompts (json format) with the five valid
           (at, isAt) options, ``plain`` against ``glotkit`` (pairs of one article share it).
  hipe     the distillation's explanation prompts (article layout, explain-json; 64 new tokens,
           greedy, stop at "Answer:"): ``hf1``, ``hfbatch``, ``glotkit``.
  sample   XL-LoRA synthesis prompts (RO-STS anchors), top-k 50 / top-p 0.9 / temperature 0.7,
           128 new tokens, batch 32: ``hfbatch`` (``generate(do_sample=True)``) against ``glotkit``.

Opt-in engines (``--engines``, qa only): ``hfbatch-compile`` (``generate`` with a static cache and
``torch.compile``, Hugging Face's recipe) and ``glotkit-compile`` (glotkit's loop on a compiled
forward); their compile time is the warm-up, printed apart.

Each worker loads the model, warms up on two prompts (not timed), then times the whole set.
Printed per engine: seconds, prompts/s, new tokens/s, peak resident memory and the ratio to the
scenario's anchor.  Run it alone: on a busy machine torch's threads stall.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QA_TEMPLATE = "Context: {context}\nÎntrebare: {question}\nRăspuns:"
ENGINES = {"qa": ["hf1", "hfbatch", "glotkit", "glotkit-vocab", "glotkit-trimmed"], "options": ["plain", "glotkit"],
           "labels": ["plain", "glotkit"],
           "hipe": ["hf1", "hfbatch", "glotkit"], "sample": ["hfbatch", "glotkit"]}
ANCHOR = {"qa": "hf1", "options": "plain", "labels": "plain", "hipe": "hf1", "sample": "hfbatch"}
# opt-in (--engines): a static KV cache with torch.compile of the forward pass.  ``hfbatch-compile``
# is Hugging Face's own way (generate with cache_implementation="static" and a compile config);
# ``glotkit-compile`` compiles the model's forward (dynamic shapes) under glotkit's loop.  Their
# warm-up, which includes compiling, is timed separately ("warm-up s").
OPT_IN = {"qa": ["hfbatch-compile", "glotkit-compile"]}


# --------------------------------------------------------------------------- prompts


def qa_prompts(tok, n: int) -> list[list[int]]:
    from glotkit.config import DataSection, PromptSection
    from glotkit.data.prompts import PromptFormatter
    from glotkit.data.qa import read_examples

    path = DATA / "xquad" / "xquad.ro.dev.json"
    if not path.is_file():
        sys.exit(f"benchmark: {path} not found (../shared/data)")
    fmt = PromptFormatter(PromptSection(template=QA_TEMPLATE, answer_marker="Răspuns:"), tok)
    return [fmt.prompt_ids(e) for e in read_examples(path, DataSection())[:n]]


def hipe_prompts(tok, n: int, fmt: str = "explain-json") -> list[list[int]]:
    from glotkit.hipe.data import read_hipe
    from glotkit.hipe.formats import PromptBuilder, question

    docs = read_hipe(DATA / "hipe-2026" / "newspapers" / "HIPE-2026-v1.0-impresso-train-en.jsonl")
    builder = PromptBuilder(tok)
    items = [(d, p) for d in docs for p in d.get("sampled_pairs") or []][:n]
    return [builder.prompt_ids(question(d, p, fmt, 1000, "article"), fmt) for d, p in items]


def sample_prompts(tok, n: int) -> list[list[int]]:
    from glotkit.data.pairs import read_anchors
    from glotkit.synth.triplets import pair_prompt

    anchors, _ = read_anchors(DATA / "ro-sts" / "ro-en" / "RO-STS.train.ro", "text", limit=n)
    return [tok(pair_prompt("positive", a, "English"))["input_ids"] for a in anchors]


SETTINGS = {  # max_new_tokens, stop, sampling
    "qa": (24, ("\n",), None),
    "hipe": (64, ("Answer:",), None),
    "sample": (128, ("\n",), dict(temperature=0.7, top_k=50, top_p=0.9)),
}


# --------------------------------------------------------------------------- engines


class _Stops:
    """Hugging Face stopping criterion with glotkit's rule (a stop string after non-blank text)."""

    def __init__(self, tok, width, stop):
        self.tok, self.width, self.stop = tok, width, stop

    def __call__(self, input_ids, scores, **kw):
        import torch

        from glotkit.generate.decode import cut_at_stop

        texts = self.tok.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([cut_at_stop(t, self.stop) is not None for t in texts], dtype=torch.bool)


def hf_generate(model, tok, prompts, batch: int, new: int, stop, sampling, **extra) -> tuple[list[str], int]:
    """``model.generate`` on length-sorted, left-padded batches (batch 1: one prompt at a time)."""
    import torch
    from transformers import StoppingCriteriaList

    from glotkit.generate.decode import _left_pad, cut_at_stop

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out, produced = [""] * len(prompts), 0
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        ids, mask = _left_pad([prompts[i] for i in idx], pad)
        w = ids.shape[1]
        kw = dict(do_sample=True, **sampling) if sampling else dict(do_sample=False, temperature=None, top_p=None,
                                                                    top_k=None)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([_Stops(tok, w, stop)]), **kw, **extra)
        for r, i in enumerate(idx):
            toks = gen[r, w:]
            produced += int((toks != pad).sum())
            t = tok.decode(toks, skip_special_tokens=True)
            out[i] = c if (c := cut_at_stop(t, stop)) is not None else t
    return out, produced


def plain_option_scores(model, tok, contexts, options) -> list[list[float]]:
    """Each (prompt, option) as one sequence through the model, one at a time."""
    import torch

    rows = []
    for c in contexts:
        row = []
        for o in options:
            oids = tok(o, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([c + oids])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, len(c) - 1:-1].float().log_softmax(-1)
            row.append(float(logp.gather(1, torch.tensor(oids)[:, None]).sum()))
        rows.append(row)
    return rows


def worker(a) -> dict:
    import torch

    from glotkit.config import ModelSection
    from glotkit.generate.local import LocalGenerator
    from glotkit.models.loading import load_model
    from glotkit.models.memory import peak_memory

    name = a.trimmed if a.engine == "glotkit-trimmed" else a.model
    model, tok, device = load_model(ModelSection(name=name))
    model.eval()
    torch.manual_seed(0)
    res: dict = {"engine": a.engine, "scenario": a.scenario}
    if a.scenario == "options":
        from glotkit.config import SuiteSection
        from glotkit.eval.suite import build_prompt, draw_shots, resolve_suite, run_task, split_continuation, test_items

        tasks, task_data, root = resolve_suite(SuiteSection(tasks=["sentiment"], shots=[3], limit=a.n_options))
        task = tasks[0]
        data = task.load(Path(task_data.get(task.name, root)))
        if a.engine == "glotkit":
            run_task(LocalGenerator(model, tok, device), task, data, shots=3, seed=1234, mode="loglik", limit=2,
                     batch_size=8)  # warm-up
            t0 = time.perf_counter()
            out = run_task(LocalGenerator(model, tok, device), task, data, shots=3, seed=1234, mode="loglik",
                           limit=a.n_options, batch_size=8)
            res["seconds"] = time.perf_counter() - t0
            res["scores"] = [p["option_logliks"] for p in out["predictions"]]
        else:
            test = test_items(task, data, a.n_options)
            texts = [build_prompt(task, r, draw_shots(data["train"], 3, 1234, i)) for i, r in enumerate(test)]
            parts = [split_continuation(t, "") for t in texts]
            contexts = [tok(c)["input_ids"] for c, _ in parts]
            options = task.options()
            plain_option_scores(model, tok, contexts[:2], [parts[0][1] + o for o in options])  # warm-up
            t0 = time.perf_counter()
            res["scores"] = [plain_option_scores(model, tok, [c], [tail + o for o in options])[0]
                             for c, (_, tail) in zip(contexts, parts)]
            res["seconds"] = time.perf_counter() - t0
        res["prompts"] = len(res["scores"])
        res["new_tokens"] = 0
    elif a.scenario == "labels":
        from glotkit.hipe.formats import label_options

        prompts = hipe_prompts(tok, a.n, fmt="json")
        texts = label_options("json")
        if a.engine == "glotkit":
            gen = LocalGenerator(model, tok, device)
            gen.option_logliks(prompts[:2], texts, progress=False)  # warm-up
            t0 = time.perf_counter()
            res["scores"] = gen.option_logliks(prompts, texts, progress=False)
        else:
            plain_option_scores(model, tok, prompts[:2], texts)  # warm-up
            t0 = time.perf_counter()
            res["scores"] = plain_option_scores(model, tok, prompts, texts)
        res["seconds"] = time.perf_counter() - t0
        res["prompts"], res["new_tokens"] = len(prompts), 0
        res["prompt_tokens"] = sum(map(len, prompts))
    else:
        make = {"qa": qa_prompts, "hipe": hipe_prompts, "sample": sample_prompts}[a.scenario]
        prompts = make(tok, a.n)
        new, stop, sampling = SETTINGS[a.scenario]
        if a.engine.endswith("-compile") and a.engine.startswith("glotkit"):
            model.forward = torch.compile(model.forward, dynamic=True)
        if a.engine.startswith("glotkit"):
            if a.trimmed and a.engine == "glotkit-trimmed":  # the same text, in the trimmed model's ids
                from glotkit.models.loading import load_tokenizer, resolve_model_path

                full = load_tokenizer(resolve_model_path(a.model), ModelSection(name=a.model))
                prompts = [tok(full.decode(p, skip_special_tokens=True))["input_ids"] for p in make(full, a.n)]
            gen = LocalGenerator(model, tok, device, batch_tokens=a.batch_tokens, max_rows=a.max_rows)
            if a.engine == "glotkit-vocab":  # the ids restrict_vocab takes from the corpus, read by the parent
                gen.vocab = set(json.loads(Path(a.vocab_file).read_text()))
                res["vocab"] = len(gen.vocab)
            kw = dict(max_new_tokens=new, stop=stop, progress=False)
            if sampling:
                gen.sample(prompts[:2], **kw, **sampling)
                gen.stats.__init__()
                t0 = time.perf_counter()
                out = gen.sample(prompts, **kw, **sampling, seed=1)
            else:
                t0 = time.perf_counter()
                gen.greedy(prompts[:2], **kw)
                res["warmup_seconds"] = time.perf_counter() - t0
                gen.stats.__init__()
                t0 = time.perf_counter()
                out = gen.greedy(prompts, **kw)
            res["seconds"] = time.perf_counter() - t0
            res["texts"], res["new_tokens"] = out.texts, out.new_tokens
            res["computed_prompt_tokens"] = gen.stats.computed_prompt_tokens
            res["batches"] = gen.stats.batches
            res["prefill_seconds"], res["decode_seconds"] = gen.stats.prefill_seconds, gen.stats.decode_seconds
            res["steps"] = gen.stats.steps
        else:
            batch = 1 if a.engine == "hf1" else a.hf_batch
            extra = {}
            if a.engine == "hfbatch-compile":
                from transformers import CompileConfig

                cc = CompileConfig(fullgraph=False, dynamic=None, mode="default")
                cc._compile_all_devices = True  # transformers compiles on GPUs only unless told
                extra = dict(cache_implementation="static", compile_config=cc)
            t0 = time.perf_counter()
            hf_generate(model, tok, prompts[:2], batch, new, stop, sampling, **extra)
            res["warmup_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            res["texts"], res["new_tokens"] = hf_generate(model, tok, prompts, batch, new, stop, sampling, **extra)
            res["seconds"] = time.perf_counter() - t0
        res["prompts"] = len(prompts)
        res["prompt_tokens"] = sum(map(len, prompts))
    res["peak_mb"] = peak_memory(device).get("peak_rss_mb")
    res["device"] = device
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="qa,options,labels,hipe,sample")
    p.add_argument("--engines", default=None, help="only these engines (comma-separated)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--trimmed", default=None, help="a trimmed-vocabulary model folder (glotkit trim-vocab)")
    p.add_argument("--n-qa", type=int, default=48)
    p.add_argument("--n-options", type=int, default=40)
    p.add_argument("--n-hipe", type=int, default=24)
    p.add_argument("--n-sample", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=8, help="hfbatch: prompts per generate() call")
    p.add_argument("--batch-tokens", type=int, default=16384, help="glotkit: the batch's token budget")
    p.add_argument("--max-rows", type=int, default=64, help="glotkit: at most this many prompts a batch")
    p.add_argument("--repeats", type=int, default=1, help="run every engine this many times (median)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--vocab-file", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.worker:
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        print("RESULT " + json.dumps(worker(a)))
        return
    only = set(a.engines.split(",")) if a.engines else None
    vocab_file = None
    if "qa" in a.scenarios.split(",") and (not only or "glotkit-vocab" in only):
        vocab_file = _corpus_vocab(a.model)
    everything = {}
    for scenario in a.scenarios.split(","):
        n = getattr(a, f"n_{'hipe' if scenario == 'labels' else scenario}")
        results: dict[str, dict] = {}
        for engine in ENGINES[scenario] + [e for e in OPT_IN.get(scenario, []) if only and e in only]:
            if (only and engine not in only) or (engine == "glotkit-trimmed" and not a.trimmed):
                continue
            runs = []
            for _ in range(a.repeats):
                cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--scenario", scenario, "--n", str(n),
                       "--n-options", str(a.n_options), "--model", a.model, "--hf-batch", str(a.hf_batch),
                       "--batch-tokens", str(a.batch_tokens), "--max-rows", str(a.max_rows)]
                cmd += ["--trimmed", a.trimmed] if a.trimmed else []
                cmd += ["--vocab-file", vocab_file] if vocab_file else []
                print(f"[bench] {scenario}: {engine} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
                line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
                if proc.returncode or not line:
                    sys.exit(f"benchmark: {scenario}/{engine} failed:\n{proc.stderr[-3000:]}")
                runs.append(json.loads(line[7:]))
                print(f"[bench] {scenario}: {engine}: {runs[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
            runs.sort(key=lambda r: r["seconds"])
            results[engine] = runs[len(runs) // 2] | {"all_seconds": [round(r["seconds"], 2) for r in runs]}
        everything[scenario] = results
        _print(scenario, results, a)
    print(json.dumps({s: {e: {k: v for k, v in r.items() if k not in ("texts", "scores")} for e, r in res.items()}
                      for s, res in everything.items()}))


def _corpus_vocab(model: str) -> str:
    """The token ids the Romanian corpus (ELTeC + news) uses, in a temporary JSON file."""
    import tempfile

    from glotkit.config import ModelSection
    from glotkit.data.corpus import read_documents
    from glotkit.models.loading import load_tokenizer, resolve_model_path
    from glotkit.models.trim_vocab import used_ids

    tok = load_tokenizer(resolve_model_path(model), ModelSection(name=model))
    docs = read_documents([str(DATA / "ro-corpus" / "eltec"), str(DATA / "ro-corpus" / "news")], "text", "ro", True)
    fd, path = tempfile.mkstemp(suffix=".json", prefix="glotkit-vocab-")
    with os.fdopen(fd, "w") as fh:
        json.dump(sorted(used_ids(tok, [d.text for d in docs])), fh)
    return path


def _print(scenario: str, results: dict[str, dict], a) -> None:
    anchor = results.get(ANCHOR[scenario])
    first = next(iter(results.values()))
    print(f"\n{scenario}: {first['prompts']} prompts, model {a.model}, device {first['device']}")
    print(f"{'engine':<17}{'seconds':>9}{'prompts/s':>11}{'new tok/s':>11}{'peak MB':>9}{'vs anchor':>11}  notes")
    for e, r in results.items():
        ratio = anchor["seconds"] / r["seconds"] if anchor else float("nan")
        notes = []
        if anchor and "texts" in r and e != ANCHOR[scenario] and SETTINGS[scenario][2] is None:
            same = sum(x == y for x, y in zip(r["texts"], anchor["texts"]))
            notes.append(f"identical to {ANCHOR[scenario]}: {same}/{len(r['texts'])}")
        if anchor and "scores" in r and e != ANCHOR[scenario]:
            diff = max(abs(x - y) for r1, r2 in zip(r["scores"], anchor["scores"]) for x, y in zip(r1, r2))
            argmax = [max(range(len(s)), key=s.__getitem__) for s in r["scores"]]
            ref = [max(range(len(s)), key=s.__getitem__) for s in anchor["scores"]]
            notes.append(f"max |loglik diff| {diff:.1e}, choices differ {sum(x != y for x, y in zip(argmax, ref))}")
        if "vocab" in r:
            notes.append(f"head rows {r['vocab']}")
        if "computed_prompt_tokens" in r:
            notes.append(f"prompt tokens computed {r['computed_prompt_tokens']}/{r['prompt_tokens']}, "
                         f"{r['batches']} batches, prefill {r['prefill_seconds']:.1f} s, {r['steps']} steps "
                         f"{r['decode_seconds']:.1f} s")
        if e.endswith("-compile"):
            notes.append(f"warm-up (compiling) {r['warmup_seconds']:.1f} s")
        if a.repeats > 1:
            notes.append(f"runs {r['all_seconds']}")
        print(f"{e:<17}{r['seconds']:>9.1f}{r['prompts'] / r['seconds']:>11.2f}"
              f"{r['new_tokens'] / r['seconds']:>11.1f}{r['peak_mb']:>9.0f}{ratio:>10.2f}x  {'; '.join(notes)}")
    if scenario == "qa" and "hfbatch" in results and "glotkit" in results:
        print(f"glotkit vs hfbatch: {results['hfbatch']['seconds'] / results['glotkit']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
