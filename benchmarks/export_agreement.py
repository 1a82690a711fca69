"""Does the exported model answer like the tuned one?  A QA run's test set, scored locally on the
merged folder and through llama.cpp's OpenAI-compatible server on each GGUF file; for a chat run
(system sft), its held-out conversations through the server's chat endpoint, which applies the
chat template the GGUF file carries.

    python benchmarks/export_agreement.py runs/ro-qa-lora [--quant f16,q8_0,q4_k_m] [--limit N]
    python benchmarks/export_agreement.py runs/ro-chat-sft

Exports the run (``glotkit export RUN --out RUN-export --gguf``) unless that folder holds the
files already; then evaluates the run's test questions (its prompt, greedy, its max_new_tokens)
with the merged Hugging Face folder in this process, and with ``python -m llama_cpp.server`` on
each GGUF file through ``generate.backend: openai`` (the same prompts as text).  Prints EM/F1,
the difference to the merged model, the answers identical to the merged model's, and seconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(gguf: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    # --n_batch 1: the llama.cpp build compiled on the project machine (-march=native) crashes
    # evaluating several prompt tokens at once
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "tuned", "--host",
           "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_batch", "1", "--n_threads", "2"]
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    while True:  # readiness is the health request; a server that exits is an error
        if proc.poll() is not None:
            sys.exit(f"llama.cpp server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--quant", default="f16,q8_0,q4_k_m")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None, help="the export folder (default: RUN-export)")
    args = p.parse_args()
    from glotkit.cli import main as cli
    from glotkit.config import GenerateSection, ModelSection
    from glotkit.data.prompts import PromptFormatter
    from glotkit.data.qa import load_qa_data
    from glotkit.eval.qa_eval import evaluate_qa
    from glotkit.generate.local import LocalGenerator
    from glotkit.generate.server import ServerGenerator
    from glotkit.models.loading import load_model
    from glotkit.systems import load_recipe

    run = Path(args.run)
    out = Path(args.out or f"{run}-export")
    quants = [q for q in args.quant.split(",") if q]
    name = run.name
    if not all((out / f"{name}.{q}.gguf").is_file() for q in quants):
        t = time.perf_counter()
        if cli(["export", str(run), "--out", str(out), "--gguf", "--quant", ",".join(quants), "--overwrite"]):
            sys.exit("export failed")
        print(f"[bench] export: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    recipe = load_recipe(run / "config.yaml")
    if recipe.system == "sft":
        return _chat(recipe, out, name, quants, args.limit)
    if recipe.system != "qa":
        sys.exit("export_agreement: a QA run (system qa) or a chat run (system sft) is needed")
    data = load_qa_data(recipe.data, recipe.seed)
    test = data.test[: args.limit] if args.limit else data.test
    model, tok, device = load_model(ModelSection(name=str(out)))
    fmt = PromptFormatter(recipe.prompt, tok, recipe.model.chat_template)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rows["merged (local, fp32)"] = evaluate_qa(LocalGenerator(model, tok, device), fmt, test, recipe.eval,
                                                   language=recipe.data.language, out_dir=Path(tmp) / "local",
                                                   progress=False), time.perf_counter() - t
        for q in quants:
            proc, url = _serve(out / f"{name}.{q}.gguf", Path(tmp) / f"{q}.log")
            try:
                cfg = GenerateSection(backend="openai", base_url=url, models={"tuned": "tuned"}, concurrency=1)
                gen = ServerGenerator.connect(cfg, "tuned", lambda m: None, "export check", tokenizer=tok)
                t = time.perf_counter()
                rows[f"GGUF {q} (llama.cpp server)"] = evaluate_qa(gen, fmt, test, recipe.eval,
                                                                   language=recipe.data.language,
                                                                   out_dir=Path(tmp) / q, progress=False), \
                    time.perf_counter() - t
            finally:
                proc.kill()
                proc.wait()
        preds = {k: [json.loads(s)["prediction"] for s in (Path(tmp) / d / "predictions.jsonl").read_text().splitlines()]
                 for k, d in zip(rows, ["local"] + quants)}
    ref = rows["merged (local, fp32)"][0]
    base = preds["merged (local, fp32)"]
    print(f"\n{run}: {len(test)} test questions, greedy, max_new_tokens {recipe.eval.max_new_tokens}")
    print(f"{'model':<30}{'EM':>7}{'F1':>7}{'ΔEM':>7}{'ΔF1':>7}{'same answer':>13}{'seconds':>9}")
    for k, (m, secs) in rows.items():
        same = sum(a == b for a, b in zip(preds[k], base))
        print(f"{k:<30}{m['em']:>7.2f}{m['f1']:>7.2f}{m['em'] - ref['em']:>+7.2f}{m['f1'] - ref['f1']:>+7.2f}"
              f"{same:>8}/{len(base):<4}{secs:>9.0f}")
    sizes = json.loads((out / "export.json").read_text())["gguf"]
    print("files: " + ", ".join(f"{g['file']} {g['mb']:.0f} MB" for g in sizes))


def _chat(recipe, out: Path, name: str, quants: list[str], limit: int | None) -> None:
    """Greedy answers to the held-out conversations' last user turn: the merged folder with its
    chat template here, and llama.cpp's /v1/chat/completions on each GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glotkit.data.chat import load_chat_data
    from glotkit.eval.qa_metrics import aggregate, score_one

    d = recipe.data
    convs = load_chat_data(d.train, d.test, d.format, d.fields, d.test_ratio, recipe.seed).test[:limit]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    n_new = recipe.eval.max_new_tokens
    answers = {}
    t = time.perf_counter()
    local = []
    for c in convs:
        ids = tok.apply_chat_template(c.context(), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=n_new, do_sample=False)
        local.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    answers["merged (local, fp32)"] = (local, time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        for q in quants:
            proc, url = _serve(out / f"{name}.{q}.gguf", Path(tmp) / f"{q}.log")
            try:
                t = time.perf_counter()
                got = []
                for c in convs:
                    body = json.dumps({"model": "tuned", "messages": c.context(), "max_tokens": n_new,
                                       "temperature": 0}).encode()
                    req = urllib.request.Request(f"{url}/chat/completions", body, {"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=600) as r:
                        got.append(json.loads(r.read())["choices"][0]["message"]["content"].strip())
                answers[f"GGUF {q} (llama.cpp chat)"] = (got, time.perf_counter() - t)
            finally:
                proc.kill()
                proc.wait()
    print(f"\n{recipe.name}: {len(convs)} held-out conversations, greedy, max_new_tokens {n_new}")
    print(f"{'model':<30}{'EM':>7}{'F1':>7}{'same answer':>13}{'seconds':>9}")
    for k, (got, secs) in answers.items():
        m = aggregate([score_one(a, [c.answer()], recipe.data.language) for a, c in zip(got, convs)])
        same = sum(a == b for a, b in zip(got, local))
        print(f"{k:<30}{m['em']:>7.2f}{m['f1']:>7.2f}{same:>8}/{len(local):<4}{secs:>9.0f}")


if __name__ == "__main__":
    main()
