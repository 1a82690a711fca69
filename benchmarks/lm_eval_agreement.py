"""Does glotkit score a task as lm-evaluation-harness does?  One suite task exported with
``glotkit eval --export-lm-eval`` and run by both tools on the same model and items, each in its
own process: per-item option log-likelihoods (largest difference), choices that differ, accuracy,
seconds and peak resident memory of each.

    python benchmarks/lm_eval_agreement.py [--task sentiment] [--shots 3] [--limit 60] [--model gemma-3-270m]

Needs lm-eval (``pip install 'glotkit[lmeval]'``) and the task's data (../shared/data).  Run it
alone: the two timings are taken one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r'''
import json, resource, sys, time
tool, args = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
if tool == "glotkit":
    from glotkit.cli import main
    rc = main(["eval", "--model", args["model"], "--tasks", args["task"], "--shots", str(args["shots"]),
               "--limit", str(args["limit"]), "--batch-size", str(args["batch_size"]), "--out", args["out"],
               "--no-progress"])
    assert rc == 0
    out = {}
else:
    import torch
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=args["path"], batch_size=args["batch_size"], device="cpu", dtype=torch.float32)
    res = lm_eval.simple_evaluate(model=lm, tasks=[args["name"]], task_manager=TaskManager(include_path=args["export"]),
                                  log_samples=True)
    samples = res["samples"][args["name"]]
    out = {"logliks": {int(s["doc"]["glotkit_index"]): [float(r[0][0]) for r in s["resps"]] for s in samples},
           "acc": res["results"][args["name"]]["acc,none"]}
out["seconds"] = time.perf_counter() - t0
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
'''


def _child(tool: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, tool, json.dumps(args)], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()

    from glotkit.config import SuiteSection
    from glotkit.eval.lm_eval_export import export_tasks
    from glotkit.eval.suite import predictions_path, resolve_suite
    from glotkit.models.loading import resolve_model_path

    cfg = SuiteSection(tasks=[a.task], shots=[a.shots], limit=a.limit)
    tasks, task_data, root = resolve_suite(cfg)
    path = resolve_model_path(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "export"
        (name,) = export_tasks(tasks, shots=[a.shots], seed=cfg.seed, limit=a.limit, data_root=root, task_data=task_data,
                               out_dir=export)
        common = {"model": a.model, "path": path, "task": a.task, "shots": a.shots, "limit": a.limit,
                  "batch_size": a.batch_size, "out": str(Path(tmp) / "glotkit"), "export": str(export), "name": name}
        ours = _child("glotkit", common)
        theirs = _child("lm-eval", common)
        results = json.loads((Path(tmp) / "glotkit" / "results.json").read_text(encoding="utf-8"))
        preds = [json.loads(x) for x in predictions_path(Path(tmp) / "glotkit", a.model, a.task, a.shots)
                 .read_text(encoding="utf-8").splitlines()]
    ll_ours = [p["option_logliks"] for p in preds]
    ll_theirs = [theirs["logliks"][str(i)] for i in range(len(preds))]  # JSON keys are text
    diff = max(abs(x - y) for r1, r2 in zip(ll_ours, ll_theirs) for x, y in zip(r1, r2))

    def argmax(row):
        return max(range(len(row)), key=row.__getitem__)

    differ = sum(argmax(r1) != argmax(r2) for r1, r2 in zip(ll_ours, ll_theirs))
    acc = results[0]["metrics"]["accuracy"]
    print(f"{a.task}, {a.shots}-shot, {len(preds)} items, {a.model}, the same prompts (glotkit's demonstrations)")
    print(f"largest |option log-likelihood difference|: {diff:.2e}; choices that differ: {differ} of {len(preds)}")
    print(f"accuracy: glotkit {acc:.2f}, lm-eval {100 * theirs['acc']:.2f}")
    print(f"seconds: glotkit {ours['seconds']:.1f}, lm-eval {theirs['seconds']:.1f} "
          f"(lm-eval / glotkit {theirs['seconds'] / ours['seconds']:.2f}×)")
    print(f"peak resident memory: glotkit {ours['peak_rss_mb']:.0f} MB, lm-eval {theirs['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
