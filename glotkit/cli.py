"""The command line: a thin layer over the library.

    glotkit run RECIPE [--set key=value ...]   (any system: its recipe says system: qa|pretrain|xllora|distill)
    glotkit train RECIPE                       (only the training stage)
    glotkit pretrain RECIPE                    (system: pretrain)
    glotkit synth triplets | embed RECIPE      (system: xllora; one or two of its stages)
    glotkit distill compare | teach | student RECIPE  (system: distill)
    glotkit distill score GOLD.jsonl PRED.jsonl [--json] [--targets at|at,isAt]  (the official HIPE-2026 figures)
    glotkit eval --suite ro [--adapter DIR --compare-base] [--tasks ...] [--shots 0,1,3,5] [--limit N]
                 [--base-url URL --served-model NAME]   (a model on an OpenAI-compatible server)
    glotkit memory [--model NAME] [--modes fp32,bf16,nf4]
    glotkit chat RUN_OR_MODEL [--adapter DIR] [--template FILE] [--system TEXT]   (streams; /reset, /exit)
    glotkit generate RUN_OR_MODEL --input prompts.jsonl --output out.jsonl [--base-url URL --served-model NAME]
    glotkit export RUN_OR_ADAPTER --out DIR [--gguf [--quant q8_0,q4_k_m,f16]] [--base NAME] [--overwrite]
    glotkit trim-vocab --model NAME --corpus PATH --out DIR
    glotkit sweep RECIPE --grid lora.r=1,2,4,8 [--grid 'lora.target_modules=q_proj,v_proj|q_proj,k_proj,v_proj,o_proj']
                 [--backend ray --workers 2 --trial-cpus 1 --trial-gpus 0 --address ADDR]
    glotkit validate RECIPE [--set ...]
    glotkit models

Errors the user can fix print one line and exit with status 2; Ctrl-C exits with 130 after
saving what can be saved (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from glotkit.config import GenerateSection, SuiteSection
from glotkit.errors import GlotkitError
from glotkit.logs import say
from glotkit.runtime import quiet_libraries
from glotkit.systems import load_recipe, system_of, systems

_log = say  # every message of a command: prefixed, on standard error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glotkit", description="Adapt language models to low-resource languages.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__import__('glotkit').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp):
        sp.add_argument("recipe", help="recipe YAML file")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set lora.r=4 (repeatable)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    def launcher_args(sp):
        sp.add_argument("--launcher", choices=["none", "accelerate"], default="none",
                        help="accelerate: train in --num-processes processes (DDP by default, FSDP with "
                             "configs/accelerate/fsdp.yaml; gloo on CPU, NCCL on GPUs)")
        sp.add_argument("--num-processes", type=int, default=2, help="with --launcher accelerate (default 2)")
        sp.add_argument("--accelerate-config", default=None, metavar="YAML",
                        help="with --launcher accelerate: an accelerate config, e.g. configs/accelerate/ddp.yaml "
                             "or configs/accelerate/fsdp.yaml")

    sp = sub.add_parser("run", help="run a recipe's stages (resumes an interrupted run)")
    recipe_args(sp)
    launcher_args(sp)
    sp = sub.add_parser("train", help="only the training stage of a recipe (XL-LoRA: the two generator adapters; "
                                      "distillation: the teacher)")
    recipe_args(sp)
    launcher_args(sp)
    seen = {"run", "train"}
    for system in systems().values():  # each system's own verbs
        for verb in system.verbs:
            if verb.name in seen:
                continue
            seen.add(verb.name)
            sp = sub.add_parser(verb.name, help=verb.help)
            if verb.tools:  # commands without a recipe beside the stage choices: one parser each
                whats = sp.add_subparsers(dest="what", required=True, metavar="{" + ",".join([*verb.choices, *verb.tools]) + "}")
                for what, stages in verb.choices.items():
                    wp = whats.add_parser(what, help=f"stages {', '.join(stages)} of a recipe")
                    recipe_args(wp)
                    if verb.launchable:
                        launcher_args(wp)
                for what, tool in verb.tools.items():
                    tool.arguments(wp := whats.add_parser(what, help=tool.help, description=tool.help))
                    wp.set_defaults(tool=tool)
                continue
            if verb.choices:
                sp.add_argument("what", choices=list(verb.choices))
            recipe_args(sp)
            if verb.launchable:
                launcher_args(sp)
    sp = sub.add_parser("trim-vocab", help="keep only the token ids a corpus uses (smaller embedding, same outputs)")
    sp.add_argument("--model", default=None,
                    help="built-in name or Hugging Face folder (default: gemma-3-270m, or the recipe's model)")
    sp.add_argument("--corpus", action="append", default=[], metavar="PATH",
                    help="text to take the vocabulary from: .txt/.jsonl/TEI .xml files or folders (repeatable)")
    sp.add_argument("--recipe", default=None, metavar="YAML",
                    help="instead of --corpus: a pretrain recipe; its model, and its corpus without the held-out "
                         "documents (the same seeded split), so held-out bits per byte stay honest")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="with --recipe: override a recipe value (repeatable)")
    sp.add_argument("--text-field", default="text")
    sp.add_argument("--language", default=None, help="'ro': fix legacy cedilla letters in the corpus first")
    sp.add_argument("--out", required=True, help="folder for the trimmed model (must not exist or be empty)")
    sp = sub.add_parser("sweep", help="run a grid of recipe variants and tabulate them")
    recipe_args(sp)
    sp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="values to sweep; use | between values when a value itself has commas")
    sp.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local: one trial after another; ray: trials as Ray tasks (pip install 'glotkit[ray]')")
    sp.add_argument("--address", default=None, help="with --backend ray: a Ray cluster's address (default: a local one)")
    sp.add_argument("--workers", type=int, default=None, help="with --backend ray: trials at once on the local cluster")
    sp.add_argument("--trial-cpus", type=float, default=1.0, help="CPUs each Ray trial asks for")
    sp.add_argument("--trial-gpus", type=float, default=0.0, help="GPUs each Ray trial asks for")
    sp = sub.add_parser("validate", help="check a recipe and print it fully resolved")
    recipe_args(sp)
    sub.add_parser("models", help="list the built-in models")
    sp = sub.add_parser("eval", help="the Romanian task suite at 0/k shots")
    sp.add_argument("--suite", default="ro", choices=["ro"])
    sp.add_argument("--model", default="gemma-3-270m")
    sp.add_argument("--adapter", help="a PEFT adapter folder to apply (e.g. runs/NAME/adapter)")
    sp.add_argument("--compare-base", action="store_true",
                    help="with --adapter: also score the base model (adapter switched off) into the same table")
    sp.add_argument("--tasks", default=None,
                    help="comma-separated (default: the recipes' suite.tasks, " + ",".join(SuiteSection().tasks)
                         + "); built in: sentiment, nli, emotion, sts, legal-mcq, qa, summarization")
    sp.add_argument("--task-file", action="append", default=[], metavar="YAML",
                    help="your own tasks (see README: 'Adding a task'); their names join --tasks' choices")
    sp.add_argument("--task-data", action="append", default=[], metavar="TASK=FILE",
                    help="data file for a task that takes the user's data, e.g. summarization=sum.jsonl")
    sp.add_argument("--shots", default=None,
                    help=f"numbers of demonstrations (default {','.join(map(str, SuiteSection().shots))})")
    sp.add_argument("--mode", default=None, choices=["loglik", "generate"],
                    help="classification by option log-likelihood (default) or by parsing a generation")
    sp.add_argument("--limit", type=int, default=None, help="test items per task (a positive number; default: all)")
    sp.add_argument("--seed", type=int, default=None, help=f"seed of the few-shot draws (default {SuiteSection().seed})")
    sp.add_argument("--shot-seeds", default=None, metavar="S1,S2,...",
                    help="also run each k-shot row with these demonstration seeds and show the range of scores "
                         "(how much the draw of demonstrations alone moves a figure)")
    sp.add_argument("--batch-size", type=int, default=None, help=f"default {SuiteSection().batch_size}")
    sp.add_argument("--data-root", default=None, help="folder with the data sets (default: ../shared/data)")
    sp.add_argument("--export-lm-eval", default=None, metavar="DIR",
                    help="write the selected tasks (with --shots, --limit, --seed) as lm-evaluation-harness tasks "
                         "into DIR (YAML, their data, glotkit's demonstration sampler) and stop; no model is loaded")
    sp.add_argument("--vocab-corpus", action="append", default=[], metavar="PATH",
                    help="generate only tokens this corpus uses (and the prompts' own): the LM head on those rows "
                         "only, faster decoding (repeatable; files or folders)")
    sp.add_argument("--out", default="runs/eval-ro")
    sp.add_argument("--base-url", default=None, metavar="URL",
                    help="score a model served by an OpenAI-compatible server (vLLM, llama.cpp) at URL, e.g. "
                         "http://127.0.0.1:8000/v1; --model then only gives the tokenizer")
    sp.add_argument("--served-model", default=None, metavar="NAME", help="with --base-url: the served model's name")
    sp.add_argument("--concurrency", type=int, default=4, help="with --base-url: requests in flight")
    sp.add_argument("--timeout", type=float, default=GenerateSection().timeout,
                    help="with --base-url: seconds each request may wait for the server (default %(default)g)")
    sp.add_argument("--retries", type=int, default=GenerateSection().retries,
                    help="with --base-url: tries after the first, with backoff (default %(default)d)")
    sp.add_argument("--no-progress", action="store_true")
    for name, what in (("chat", "talk to a model or a run's tuned model (tokens stream as they come)"),
                       ("generate", "answer every prompt of a JSONL file (batched, resumable)")):
        sp = sub.add_parser(name, help=what, description=what)
        sp.add_argument("target", metavar="RUN_OR_MODEL",
                        help="a run folder (its model, adapter and chat template) or a built-in name, Hugging Face "
                             "folder or hub id")
        sp.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply (default: the run's)")
        sp.add_argument("--template", default=None, metavar="FILE",
                        help="a Jinja chat template (default: the run's chat.template, else the tokenizer's)")
        sp.add_argument("--max-new-tokens", type=int, default=256)
        sp.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
        sp.add_argument("--top-p", type=float, default=0.9)
        if name == "chat":
            sp.add_argument("--system", default=None, help="a system message at the start of each conversation")
            continue
        sp.add_argument("--input", required=True, metavar="JSONL",
                        help="one record per line: 'prompt' (text, as is) or 'messages' (a conversation ending "
                             "with a user turn; the chat template is applied); optional 'id'")
        sp.add_argument("--output", required=True, metavar="JSONL", help="each record with its 'generation'")
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument("--seed", type=int, default=0, help="of the sampling (with --temperature > 0)")
        sp.add_argument("--base-url", default=None, metavar="URL",
                        help="generate on an OpenAI-compatible server (vLLM, llama.cpp); RUN_OR_MODEL then gives "
                             "the tokenizer and template")
        sp.add_argument("--served-model", default=None, metavar="NAME", help="with --base-url: the served model's name")
        sp.add_argument("--no-progress", action="store_true")
    what = "a run's tuned model as a merged Hugging Face folder, and GGUF files for llama.cpp / Ollama"
    sp = sub.add_parser("export", help=what, description=what)
    sp.add_argument("source", metavar="RUN_OR_ADAPTER", help="a run folder, a PEFT adapter folder or a model folder")
    sp.add_argument("--out", required=True, help="the folder to write (refused if it exists, unless --overwrite)")
    sp.add_argument("--merge", action="store_true", help="the merged folder (always written; the default)")
    sp.add_argument("--gguf", action="store_true", help="also GGUF files (llama.cpp's converter and quantizer; "
                                                          "pip install 'glotkit[llamacpp]'), a Modelfile, SHA256SUMS")
    sp.add_argument("--quant", default="q8_0", help="with --gguf: comma-separated of f16, q8_0, q4_k_m (default q8_0)")
    sp.add_argument("--base", default=None, help="the base model when the adapter's own is not available here")
    sp.add_argument("--template", default=None, metavar="FILE", help="a chat template to ship (default: the run's)")
    sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    sp = sub.add_parser("memory", help="memory after loading (M1) and peak while generating (M2): fp32, bf16, NF4")
    sp.add_argument("--model", default="gemma-3-270m")
    sp.add_argument("--modes", default="fp32,bf16,nf4")
    sp.add_argument("--prompt-tokens", type=int, default=1000)
    sp.add_argument("--new-tokens", type=int, default=16)
    sp.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    sp.add_argument("--keep-vocab", type=int, default=None, metavar="N",
                    help="add a column: the weights with the vocabulary trimmed to N token ids")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "models":
            from glotkit.models.registry import BUILTIN_MODELS, DEFAULT_MODEL

            for m in BUILTIN_MODELS.values():
                star = " (default)" if m.name == DEFAULT_MODEL else ""
                print(f"{m.name}{star}: {m.description}  [pip: {m.package}]")
            return 0
        if args.command == "eval":
            return _eval(args)
        if args.command in ("chat", "generate"):
            return _try_model(args)
        if args.command == "export":
            from glotkit.models.convert import cache_dir
            from glotkit.models.export import QUANTS, export, resolve_source

            quants = [q.strip() for q in args.quant.split(",") if q.strip()]
            bad = [q for q in quants if q not in QUANTS]
            if bad:
                raise GlotkitError(f"--quant {bad[0]}: not one of {', '.join(QUANTS)}")
            out = Path(args.out)
            if out.exists() and not args.overwrite:
                raise GlotkitError(f"--out {out}: exists; give another folder or --overwrite")
            if args.gguf:
                import importlib.util

                if importlib.util.find_spec("llama_cpp") is None and not os.environ.get("GLOTKIT_LLAMA_CPP"):
                    raise GlotkitError("--gguf: needs llama.cpp's tools: pip install 'glotkit[llamacpp]'")
            source = resolve_source(args.source, args.base, args.template)
            quiet_libraries()
            info = export(source, out, gguf=args.gguf, quants=quants, cache=cache_dir(), overwrite=args.overwrite,
                          log=_log)
            for g in info.get("gguf", []):
                print(f"{out / g['file']}  {g['mb']:.0f} MB  sha256 {g['sha256']}")
            print(f"{out}: merged model" + (", GGUF files, Modelfile" if args.gguf else "") + ", README.md")
            return 0
        if args.command == "trim-vocab":
            quiet_libraries()
            from glotkit.data.corpus import read_documents
            from glotkit.models.loading import resolve_model_path
            from glotkit.models.trim_vocab import trim_vocabulary

            if bool(args.corpus) == bool(args.recipe):
                raise GlotkitError("trim-vocab: give --corpus PATH (repeatable) or --recipe YAML, not both")
            if args.recipe:
                from glotkit.systems.pretrain import training_texts

                recipe = load_recipe(args.recipe, args.overrides)
                texts, model = training_texts(recipe, log=_log), args.model or recipe.model.name
            else:
                if args.overrides:
                    raise GlotkitError("trim-vocab: --set needs --recipe")
                docs = read_documents(args.corpus, args.text_field, args.language, bool(args.language))
                texts, model = [d.text for d in docs], args.model or "gemma-3-270m"
            path = resolve_model_path(model, log=_log)
            info = trim_vocabulary(path, texts, args.out, log=_log)
            print(f"{args.out}: vocabulary {info['vocab_before']:,} -> {info['vocab_after']:,}, parameters "
                  f"{info['params_before']:,} -> {info['params_after']:,}, {info['size_on_disk_mb']} MB on disk")
            return 0
        if args.command == "memory":
            from glotkit.eval.memory import MODES, measure, table

            modes = [m.strip() for m in args.modes.split(",") if m.strip()]
            bad = [m for m in modes if m not in MODES]
            if bad:
                raise GlotkitError(f"--modes: unknown mode '{bad[0]}' (known: {', '.join(MODES)})")
            if not modes:
                raise GlotkitError(f"--modes: no mode given (known: {', '.join(MODES)})")
            for flag, value in (("--prompt-tokens", args.prompt_tokens), ("--new-tokens", args.new_tokens),
                                ("--keep-vocab", args.keep_vocab)):
                if value is not None and value < 1:
                    raise GlotkitError(f"{flag} {value}: must be a positive number")
            if args.json_out and Path(args.json_out).is_dir():  # said now, not after the measurements
                raise GlotkitError(f"--json {args.json_out}: is a folder; give a file name")
            from glotkit.models.loading import resolve_model_path

            resolve_model_path(args.model, log=_log)  # convert once, before the workers start
            rows = measure(args.model, modes, args.prompt_tokens, args.new_tokens)
            print(table(rows, keep_vocab=args.keep_vocab))
            if args.json_out:
                from glotkit.io import atomic_write_json

                atomic_write_json(args.json_out, rows)
            return 0
        if getattr(args, "tool", None) is not None:  # a system's command that takes no recipe
            return args.tool.run(args)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            import yaml

            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True), end="")
            return 0
        quiet_libraries()
        if args.command not in ("run", "sweep"):
            _choose_stages(args, recipe)
            args.command = "run"
        if getattr(args, "launcher", "none") == "accelerate":
            return _launch(args, argv if argv is not None else sys.argv[1:], recipe)
        if args.command == "run":
            from glotkit.systems.runner import run_recipe

            run_recipe(recipe, log=_log, progress=not args.no_progress)
            return 0
        if args.command == "sweep":
            from glotkit.sweep import run_sweep

            run_sweep(recipe, args.grid, log=_log, progress=not args.no_progress, backend=args.backend,
                      address=args.address, workers=args.workers, trial_cpus=args.trial_cpus,
                      trial_gpus=args.trial_gpus)
            return 0
    except GlotkitError as err:
        print(f"glotkit: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        import errno

        if err.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"glotkit: error: {where}{err.strerror}; fix it and rerun the same command: what was finished is kept "
              "and the run resumes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nglotkit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 1


def _choose_stages(args, recipe) -> None:
    """A system's verb (``glotkit train``, ``glotkit distill compare``, ...) runs some of its stages."""
    system = system_of(recipe)
    verb = next((v for v in system.verbs if v.name == args.command), None)
    if verb is None:
        owners = [n for n, s in systems().items() if any(v.name == args.command for v in s.verbs)]
        raise GlotkitError(f"{args.recipe}: system is '{recipe.system}'; 'glotkit {args.command}' needs system: "
                           f"{' or '.join(owners)}" + (" (use glotkit run)" if args.command == "pretrain" else ""))
    stages = verb.choices[args.what] if verb.choices else verb.stages
    if stages:
        recipe.stages = list(stages)


def _launch(args, argv: list[str], recipe) -> int:
    """Run this same command under ``accelerate launch`` (see glotkit/train/distributed.py)."""
    import subprocess

    from glotkit.models.loading import resolve_model_path
    from glotkit.train.distributed import check_recipe, launch_command, launched_world, read_launch_config

    if launched_world() > 1:
        raise GlotkitError("--launcher accelerate: this process already runs in a launch; drop --launcher")
    if args.num_processes < 1:
        raise GlotkitError(f"--num-processes: {args.num_processes}; give 1 or more")
    if args.accelerate_config and not os.path.isfile(args.accelerate_config):
        raise GlotkitError(f"--accelerate-config {args.accelerate_config}: no such file")
    sharded = read_launch_config(args.accelerate_config) if args.accelerate_config else False
    if not system_of(recipe).multi_process:
        raise GlotkitError(f"system: '{recipe.system}' trains in one process; multi-process training (accelerate) "
                           "runs recipes of systems " + ", ".join(n for n, s in systems().items() if s.multi_process))
    check_recipe(recipe, args.num_processes, sharded=sharded)
    resolve_model_path(recipe.model.name, log=_log)  # convert a built-in model once, before the processes start
    inner, skip = [], 0
    for a in argv:  # the same command without the launcher's own options
        if skip:
            skip -= 1
        elif a in ("--launcher", "--num-processes", "--accelerate-config"):
            skip = 1
        elif not a.startswith(("--launcher=", "--num-processes=", "--accelerate-config=")):
            inner.append(a)
    cmd = launch_command(inner, args.num_processes, args.accelerate_config)
    _log(f"launching {args.num_processes} processes: accelerate launch ... -m glotkit {' '.join(inner)}")
    code = subprocess.call(cmd)
    if code != 0:
        raise GlotkitError(f"the {args.num_processes} training processes ended with exit status {code} "
                           "(their messages are above); rerun the same command to resume")
    return 0


def _option_error(err) -> GlotkitError:
    """A pydantic error about an option, as one line naming the option and its value."""
    first = err.errors()[0]
    return GlotkitError(f"--{str(first['loc'][0]).replace('_', '-')} {first['input']}: {first['msg']}")


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GlotkitError(f"--shot-seeds {text!r}: expected whole numbers like 1,2,3") from None


def _eval(args) -> int:
    """``glotkit eval``: its options make a suite configuration (the recipes' ``suite:``, same
    defaults) and run through the same code as a recipe's suite stage."""
    from pydantic import ValidationError

    from glotkit.config import GenerateSection, ModelSection, SuiteSection
    from glotkit.eval.suite import parse_shots, resolve_suite, run_suite_for
    from glotkit.generate import for_role

    task_data = {}
    for item in args.task_data:
        if "=" not in item:
            raise GlotkitError(f"--task-data {item!r}: expected TASK=FILE")
        name, _, file = item.partition("=")
        task_data[name] = file
    defaults = SuiteSection()
    try:
        cfg = SuiteSection(
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else defaults.tasks,
            shots=parse_shots(args.shots) if args.shots else defaults.shots, mode=args.mode or defaults.mode,
            limit=args.limit, seed=defaults.seed if args.seed is None else args.seed,
            shot_seeds=_seeds(args.shot_seeds) if args.shot_seeds else [],
            batch_size=defaults.batch_size if args.batch_size is None else args.batch_size, data_root=args.data_root,
            task_files=args.task_file,
            task_data=task_data)
    except ValidationError as e:
        raise _option_error(e) from None
    tasks, task_files, root = resolve_suite(cfg)  # task names, task files and data files are checked before any model
    if args.export_lm_eval:
        from glotkit.eval.lm_eval_export import export_tasks

        names = export_tasks(tasks, shots=cfg.shots, seed=cfg.seed, limit=cfg.limit, data_root=root,
                             task_data=task_files, out_dir=Path(args.export_lm_eval))
        print(f"lm-evaluation-harness tasks in {args.export_lm_eval}: {', '.join(names)}\n"
              f"run: lm_eval --model hf --model_args pretrained={args.model} --include_path {args.export_lm_eval} "
              f"--tasks {','.join(names)} --log_samples --output_path lm-eval-out")
        return 0
    if args.compare_base and not args.adapter:
        raise GlotkitError("--compare-base: needs --adapter (the base is the model with the adapter switched off)")
    if args.served_model and not args.base_url:
        raise GlotkitError("--served-model: needs --base-url (the server that serves it)")
    if args.base_url and not args.served_model:
        raise GlotkitError("--base-url: needs --served-model NAME (the name the server gives the model)")
    if args.base_url and args.adapter:
        raise GlotkitError("--adapter: with --base-url the server applies adapters; serve the adapter under a "
                           "name (vLLM: --lora-modules NAME=DIR) and give that name to --served-model")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise GlotkitError(f"--adapter {args.adapter}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        served = GenerateSection(backend="openai", base_url=args.base_url, models={"base": args.served_model},
                                 concurrency=args.concurrency, timeout=args.timeout,
                                 retries=args.retries) if args.base_url else GenerateSection()
    except ValidationError as e:
        raise _option_error(e) from None
    if args.base_url:
        import importlib.util

        if importlib.util.find_spec("openai") is None:  # before the tokenizer (a model conversion) is made
            raise GlotkitError("--base-url: needs the openai client: pip install 'glotkit[server]'")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise GlotkitError(f"--out {out}: is a file; give a folder for the results")
    quiet_libraries()
    loaded: dict = {}

    def local(adapter_off: bool = False):
        from glotkit.generate.local import LocalGenerator
        from glotkit.models.loading import load_model

        if not loaded:
            model, tok, device = load_model(ModelSection(name=args.model), log=_log)
            if args.adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, args.adapter)
            loaded.update(model=model, tok=tok, device=device)
        gen = LocalGenerator(loaded["model"], loaded["tok"], loaded["device"], adapter_off=adapter_off)
        if args.vocab_corpus:
            _log(f"generation restricted to the {gen.restrict_to_corpus(args.vocab_corpus):,} token ids "
                 f"{', '.join(args.vocab_corpus)} use (with the prompts' own)")
        return gen

    def tokenizer():
        from glotkit.models.loading import tokenizer_for

        return tokenizer_for(ModelSection(name=args.model), log=_log)

    def model(label: str, adapter_off: bool = False):
        return label, lambda: for_role(served, "base", lambda: local(adapter_off),
                                       tokenizer=tokenizer() if args.base_url else None, log=_log, what="task suite")

    if args.base_url:
        models = [model(args.served_model)]
    elif args.adapter:
        models = ([model(args.model, adapter_off=True)] if args.compare_base else []) + [
            model(f"{args.model} + {args.adapter}")]
    else:
        models = [model(args.model)]
    from glotkit.systems.runner import owned

    with owned(out, "glotkit eval", lock_name=".eval.lock"):  # one writer per results folder
        run_suite_for(cfg, models, out, log=_log, progress=not args.no_progress)
    print((out / "results.md").read_text(encoding="utf-8"), end="")
    return 0


def _try_model(args) -> int:
    """``glotkit chat`` and ``glotkit generate``: options checked before any model is loaded."""
    from glotkit.data.chat import ChatEncoder
    from glotkit.generate.session import chat_loop, generate_file, load_target, read_prompts, resolve_target

    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", getattr(args, "batch_size", 1))):
        if value < 1:
            raise GlotkitError(f"{flag} {value}: must be a positive number")
    if args.temperature < 0:
        raise GlotkitError(f"--temperature {args.temperature}: must be ≥ 0")
    target = resolve_target(args.target, args.adapter, args.template)
    quiet_libraries()
    if args.command == "chat":
        model, tok, device = load_target(target, log=_log)
        enc = ChatEncoder(tok, target.template)
        if not enc.has_template:
            raise GlotkitError(f"{target.model} has no chat template: give one with --template FILE")
        _log(f"chat with {target.label}")
        chat_loop(model, tok, device, enc, system=args.system, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, log=_log)
        return 0
    records = read_prompts(Path(args.input))
    output = Path(args.output)
    if output.is_dir():
        raise GlotkitError(f"--output {output}: is a folder; give a file name")
    if bool(args.base_url) != bool(args.served_model):
        raise GlotkitError("--base-url and --served-model go together (the server and its name for the model)")
    from glotkit.config import ModelSection
    from glotkit.generate import for_role

    if args.base_url:
        import importlib.util

        if importlib.util.find_spec("openai") is None:
            raise GlotkitError("--base-url: needs the openai client: pip install 'glotkit[server]'")
        from glotkit.models.loading import tokenizer_for

        tok, model = tokenizer_for(ModelSection(name=target.model), log=_log), None
        cfg = GenerateSection(backend="openai", base_url=args.base_url, models={"base": args.served_model})
    else:
        model, tok, device = load_target(target, log=_log)
        cfg = GenerateSection()
    enc = ChatEncoder(tok, target.template)
    if any("messages" in r for r in records) and not enc.has_template:
        raise GlotkitError(f"{args.input}: has conversations ('messages') but {target.model} has no chat template; "
                           "give one with --template FILE")

    def local():
        from glotkit.generate.local import LocalGenerator

        return LocalGenerator(model, tok, device)

    generator = for_role(cfg, "base", local, tokenizer=tok, log=_log, what="generate")
    import contextlib

    from glotkit.generate.session import stopping_at_turn_end

    with stopping_at_turn_end(model, enc.stop_ids()) if model is not None else contextlib.nullcontext():
        n = generate_file(generator, enc, records, output, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          progress=not args.no_progress, log=_log)
    _log(f"generate: {n} new answers; {len(records)} in {output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
