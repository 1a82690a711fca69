"""Training speed: glotkit's engine against TRL's SFTTrainer, same model, data and machine.

    python benchmarks/train_speed.py [--steps 8] [--warmup 2] [--batch-size 4] [--model gemma-3-270m]
    python benchmarks/train_speed.py --task chat [--trl-packing] [--model DIR_OF_A_TRIMMED_MODEL]

``--task cpt`` (continued pretraining): the Romanian corpus (ELTeC + news) packed as the pretrain
system packs it (rows of ``--block-size``, documents kept apart), loss on every token, LoRA r=8 /
alpha 8 on all linear layers (recipes/roqllama.yaml, fp32) — glotkit against transformers'
``Trainer`` + PEFT on the same rows (labels = the tokens; it attends across a row's documents).

``--task chat`` (instruction/chat fine-tuning, system sft): the ro-chat conversations
(recipes/data/ro-chat/train.jsonl, OpenAI messages, a shared system prompt, a third multi-turn)
rendered with recipes/templates/gemma3-chat.jinja, loss on the assistant turns only — glotkit's
packed rows (``--chat-row`` tokens, conversations kept apart) against TRL with conversational
data and ``assistant_only_loss=True`` (its own masks from the template's generation blocks), one
epoch over the same conversations, ``--batch-size`` conversations per step for TRL and the same
number on average per packed step for glotkit.  ``--trl-packing``: TRL's own packing (BFD,
padding-free positions; on CPU without flash attention it still attends across examples).

Both run LoRA r=8, alpha 16, dropout 0.05 on q/k/v/o_proj with the loss on the answer tokens
only (TRL: prompt-completion data, ``completion_only_loss=True``, its other defaults, including
gradient checkpointing), batch 4, on the first ``steps × batch`` questions of XQuAD-ro, each
in its own fresh process.  Printed: tokens/s (non-padding input tokens per second, the first
``warmup`` steps excluded), mean loss per answer token, peak resident memory (CUDA: peak
allocated), and the ratio of the two speeds.  The anchor (TRL) is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
XQUAD = REPO.parent / "shared" / "data" / "xquad" / "xquad.ro.dev.json"
TEMPLATE = "Context: {context}\nÎntrebare: {question}\nRăspuns:"


def _examples(args):
    from glotkit.config import DataSection
    from glotkit.data.qa import read_examples

    path = Path(args.data)
    if not path.is_file():
        sys.exit(f"benchmark: {path} not found (XQuAD-ro from ../shared/data, or pass --data)")
    return read_examples(path, DataSection())[: args.steps * args.batch_size]


def _peak(device: str) -> float:
    from glotkit.models.memory import peak_memory

    m = peak_memory(device)
    return m.get("peak_cuda_mb", m["peak_rss_mb"])


def _timed(log: list[dict], warmup: int) -> tuple[float, int]:
    """(seconds, tokens) of the engine's steps after the first ``warmup``."""
    t = log[-1]["seconds"] - log[warmup - 1]["seconds"] if warmup else log[-1]["seconds"]
    return t, log[-1]["tokens"] - (log[warmup - 1]["tokens"] if warmup else 0)


def worker_ours(args) -> dict:
    import torch

    from glotkit.config import LoraSection, ModelSection, PromptSection, TrainSection
    from glotkit.data.prompts import EncodeStats, PromptFormatter
    from glotkit.models.loading import load_model
    from glotkit.models.lora import apply_lora
    from glotkit.train.engine import train

    model, tok, device = load_model(ModelSection(name=args.model))
    torch.manual_seed(0)
    model = apply_lora(model, LoraSection(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    # TRL appends EOS to every completion: supervise exactly the same tokens
    fmt = PromptFormatter(PromptSection(template=TEMPLATE, target=" {answer}\n" + tok.eos_token, answer_marker="Răspuns:"), tok)
    enc = [fmt.encode_train(e, args.max_length, "drop", EncodeStats()) for e in _examples(args)]
    enc = [e for e in enc if e is not None]
    cfg = TrainSection(batch_size=args.batch_size, max_steps=args.steps, lr=2e-4, scheduler="linear",
                       max_length=args.max_length, checkpoint_every=10**6,
                       gradient_checkpointing=args.ours_checkpointing,
                       max_tokens_per_forward=args.max_tokens_per_forward or None,
                       share_prefix=not args.no_share_prefix)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(model, enc, cfg, seed=42, work_dir=Path(tmp), pad_id=tok.pad_token_id, device=device, progress=False)
    log = res.log
    t, n = _timed(log, args.warmup)
    w = args.warmup
    return {"engine": "glotkit", "device": device, "tokens_per_s": n / t, "timed_steps": len(log) - w,
            "timed_tokens": n, "seconds": t, "mean_loss": sum(h["loss"] for h in log) / len(log),
            "peak_mb": _peak(device), "fast_loss": res.fast_loss, "shared_prefix": res.shared_prefix,
            "computed_tokens": res.computed_tokens, "example_tokens": res.tokens,
            "gradient_checkpointing": args.ours_checkpointing,
            "max_tokens_per_forward": args.max_tokens_per_forward}


CHAT = REPO / "recipes" / "data" / "ro-chat" / "train.jsonl"
CHAT_TEMPLATE = REPO / "recipes" / "templates" / "gemma3-chat.jinja"


def _conversations():
    from glotkit.data.chat import read_conversations

    return read_conversations(CHAT)[0]


def _heldout(model, tok) -> float:
    """Loss per assistant token on the held-out ro-chat conversations (the same code and tokens
    for both engines' trained models)."""
    from glotkit.data.chat import ChatEncoder, read_conversations, read_template
    from glotkit.eval.chat_eval import heldout_loss

    tok.chat_template = None
    enc = ChatEncoder(tok, read_template(CHAT_TEMPLATE))
    test = read_conversations(CHAT.with_name("test.jsonl"))[0]
    return heldout_loss(model, enc, test, tok.pad_token_id, 1024, progress=False)["nll_per_token"]


def worker_ours_chat(args) -> dict:
    import torch

    from glotkit.config import LoraSection, ModelSection, TrainSection
    from glotkit.data.chat import ChatEncoder, pack_examples, read_template
    from glotkit.data.prompts import EncodeStats
    from glotkit.models.loading import load_model
    from glotkit.models.lora import apply_lora
    from glotkit.train.engine import train

    model, tok, device = load_model(ModelSection(name=args.model))
    torch.manual_seed(0)
    model = apply_lora(model, LoraSection(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    enc = ChatEncoder(tok, read_template(CHAT_TEMPLATE))
    convs = _conversations()
    examples = [enc.example(c, args.max_length, "drop", EncodeStats()) for c in convs]
    if args.chat_no_pack:  # one conversation per row, batch-size of them per step (TRL's batches)
        rows, per_step = [e for e in examples if e is not None], args.batch_size
    else:
        rows = pack_examples([e for e in examples if e is not None], args.chat_row, seed=42)
        per_step = max(1, round(len(rows) * args.batch_size / len(convs)))  # rows holding ~batch-size conversations
    cfg = TrainSection(batch_size=per_step, epochs=1, lr=2e-4, scheduler="linear", max_length=args.chat_row,
                       checkpoint_every=10**6, max_tokens_per_forward=args.max_tokens_per_forward or None)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(model, rows, cfg, seed=42, work_dir=Path(tmp), pad_id=tok.pad_token_id, device=device, progress=False)
    log = res.log
    t, n = _timed(log, args.warmup)
    w = args.warmup
    peak = _peak(device)
    return {"engine": "glotkit", "device": device, "tokens_per_s": n / t, "timed_steps": len(log) - w,
            "heldout_loss": _heldout(model, tok),
            "timed_tokens": n, "seconds": t, "mean_loss": sum(h["loss"] for h in log) / len(log),
            "last3_loss": sum(h["loss"] for h in log[-3:]) / len(log[-3:]), "peak_mb": peak, "steps": len(log),
            "rows": len(rows), "conversations": len(convs), "supervised_tokens": res.supervised_tokens,
            "vocab": len(tok)}


def worker_trl_chat(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from glotkit.models.loading import pick_device, pick_dtype, resolve_model_path
    from glotkit.models.memory import reset_peak

    path = resolve_model_path(args.model)
    device = pick_device("auto")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE.read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype("auto", device), attn_implementation="sdpa")
    rows = [{"messages": c.messages} for c in _conversations()]
    marks: list[tuple[float, int]] = []
    counted = {"tokens": 0, "supervised": 0}
    losses: list[tuple[float, int]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, logs=None, **kw):
            marks.append((time.perf_counter(), counted["tokens"]))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="linear", logging_steps=1,
            save_strategy="no", report_to=[], max_length=args.max_length, assistant_only_loss=True,
            packing=args.trl_packing, seed=42, dataloader_num_workers=0, use_cpu=device == "cpu",
            bf16=device.startswith("cuda"), gradient_checkpointing=not args.trl_no_checkpointing, disable_tqdm=True,
        )
        peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                              task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=peft_cfg, callbacks=[Timer()])
        step_sup: list[int] = []

        def count(module, a, kwargs):
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids")
            labels = kwargs.get("labels")
            counted["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
            if labels is not None:  # supervised tokens of this pass (labels shifted inside the model)
                step_sup.append(int((labels[:, 1:] != -100).sum()))

        def keep_loss(module, a, kwargs, out):
            if getattr(out, "loss", None) is not None and step_sup:
                losses.append((float(out.loss.detach()), step_sup[-1]))

        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        trainer.model.register_forward_hook(keep_loss, with_kwargs=True)
        reset_peak(device)
        start = time.perf_counter()
        trainer.train()
        peak = _peak(device)
        held = _heldout(trainer.model, tok)
    w = args.warmup
    t0, n0 = (marks[w - 1][0], marks[w - 1][1]) if w else (start, 0)
    sup = sum(k for _, k in losses)
    return {"engine": "trl", "device": device, "tokens_per_s": (marks[-1][1] - n0) / (marks[-1][0] - t0),
            "timed_steps": len(marks) - w, "timed_tokens": marks[-1][1] - n0, "seconds": marks[-1][0] - t0,
            # the mean of the steps' losses per supervised token (as glotkit's figure)
            "mean_loss": sum(v for v, _ in losses) / max(len(losses), 1), "peak_mb": peak, "heldout_loss": held,
            "last3_loss": sum(v for v, _ in losses[-3:]) / max(len(losses[-3:]), 1),
            "steps": len(marks), "supervised_tokens": sup, "packing": args.trl_packing, "vocab": len(tok),
            "gradient_checkpointing": not args.trl_no_checkpointing}


def worker_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from glotkit.models.loading import pick_device, pick_dtype, resolve_model_path
    from glotkit.models.memory import reset_peak

    path = resolve_model_path(args.model)
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    rows = [{"prompt": TEMPLATE.format(context=e.context, question=e.question), "completion": f" {e.answer}\n"}
            for e in _examples(args)]
    marks: list[tuple[float, int, float]] = []
    counted = {"tokens": 0}

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, logs=None, **kw):
            marks.append((time.perf_counter(), counted["tokens"], 0.0))

    losses: list[float] = []

    class LossLog(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="linear", logging_steps=1,
            save_strategy="no", report_to=[], max_length=args.max_length, completion_only_loss=True,
            seed=42, dataloader_num_workers=0, use_cpu=device == "cpu",
            # TRL's own default is bf16=True (autocast); on CPU we compare like with like (fp32)
            # unless --trl-bf16 asks for TRL's default
            bf16=device.startswith("cuda") or args.trl_bf16,
            gradient_checkpointing=not args.trl_no_checkpointing, disable_tqdm=True,
        )
        peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                              task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=peft_cfg, callbacks=[Timer(), LossLog()])

        def count(module, a, kwargs):
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids")
            counted["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())

        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        reset_peak(device)
        start = time.perf_counter()
        trainer.train()
    w = args.warmup
    t0, n0 = (marks[w - 1][0], marks[w - 1][1]) if w else (start, 0)
    t = marks[-1][0] - t0
    n = marks[-1][1] - n0
    return {"engine": "trl", "device": device, "tokens_per_s": n / t, "timed_steps": len(marks) - w,
            "timed_tokens": n, "seconds": t, "mean_loss": sum(losses) / max(len(losses), 1),
            "peak_mb": _peak(device), "gradient_checkpointing": not args.trl_no_checkpointing,
            "bf16_autocast": bool(cfg.bf16)}


CORPUS = [REPO.parent / "shared" / "data" / "ro-corpus" / "eltec", REPO.parent / "shared" / "data" / "ro-corpus" / "news"]


def _cpt_rows(tok, args):
    """The Romanian corpus (ELTeC + news) tokenized and packed as the pretrain system packs it:
    rows of --block-size tokens, steps × batch rows in all."""
    from glotkit.data.corpus import pack_documents, read_documents, tokenize_documents

    if not CORPUS[0].is_dir():
        sys.exit(f"benchmark: {CORPUS[0]} not found (../shared/data)")
    need = args.steps * args.batch_size * args.block_size
    ids, n = [], 0
    for doc in tokenize_documents(read_documents([str(c) for c in CORPUS], "text", "ro", True), tok):
        ids.append(doc[: need - n])
        n += len(ids[-1])
        if n >= need:
            break
    return pack_documents(ids, args.block_size)[: args.steps * args.batch_size]


CPT_LORA = dict(r=8, alpha=8, dropout=0.05, target_modules="all-linear")  # recipes/roqllama.yaml


def worker_ours_cpt(args) -> dict:
    import torch

    from glotkit.config import LoraSection, ModelSection, TrainSection
    from glotkit.models.loading import load_model
    from glotkit.models.lora import apply_lora
    from glotkit.train.engine import train

    model, tok, device = load_model(ModelSection(name=args.model))
    torch.manual_seed(0)
    model = apply_lora(model, LoraSection(**CPT_LORA))
    rows = _cpt_rows(tok, args)
    cfg = TrainSection(batch_size=args.batch_size, max_steps=args.steps, lr=2e-4, scheduler="linear",
                       checkpoint_every=10**6, max_tokens_per_forward=args.block_size)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(model, rows, cfg, seed=42, work_dir=Path(tmp), pad_id=tok.pad_token_id, device=device,
                    progress=False)
    t, n = _timed(res.log, args.warmup)
    return {"engine": "glotkit", "device": device, "tokens_per_s": n / t, "timed_steps": len(res.log) - args.warmup,
            "timed_tokens": n, "seconds": t, "mean_loss": sum(h["loss"] for h in res.log) / len(res.log),
            "peak_mb": _peak(device)}


def worker_trainer_cpt(args) -> dict:
    """transformers ``Trainer`` + PEFT LoRA on the same packed rows, labels = the tokens (no loss on
    a piece's first token, which has no earlier token of its document), its defaults otherwise; it
    attends across the documents of a row (a plain causal mask), as users' scripts do."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from glotkit.models.loading import pick_device, resolve_model_path
    from glotkit.models.memory import reset_peak

    path = resolve_model_path(args.model)
    device = pick_device("auto")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation="sdpa")
    rows = _cpt_rows(tok, args)
    data = [{"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids),
             "labels": [t if p else -100 for t, p in zip(r.input_ids, r.position_ids)]} for r in rows]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    marks: list[tuple[float, int]] = []
    counted = {"tokens": 0}
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks.append((time.perf_counter(), counted["tokens"]))

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    def count(module, a, kwargs):
        counted["tokens"] += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                  learning_rate=2e-4, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                                  report_to=[], seed=42, dataloader_num_workers=0, use_cpu=device == "cpu",
                                  disable_tqdm=True, remove_unused_columns=False)
        trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(data), callbacks=[Timer()])
        reset_peak(device)
        trainer.train()
    w = args.warmup
    t, n = marks[-1][0] - marks[w - 1][0], marks[-1][1] - marks[w - 1][1]
    return {"engine": "trainer", "device": device, "tokens_per_s": n / t, "timed_steps": len(marks) - w,
            "timed_tokens": n, "seconds": t, "mean_loss": sum(losses) / max(len(losses), 1), "peak_mb": _peak(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--data", default=str(XQUAD))
    p.add_argument("--trl-no-checkpointing", action="store_true", help="TRL with gradient checkpointing off")
    p.add_argument("--trl-bf16", action="store_true", help="TRL with its default bf16 autocast also on CPU")
    p.add_argument("--ours-checkpointing", action="store_true", help="glotkit with gradient checkpointing on")
    p.add_argument("--max-tokens-per-forward", type=int, default=1024,
                   help="glotkit's train.max_tokens_per_forward (0: whole batch in one pass)")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="glotkit without shared-prefix packing (each question computes its context again)")
    p.add_argument("--task", choices=["qa", "chat", "cpt"], default="qa",
                   help="qa: XQuAD-ro, answer-only loss (default); chat: ro-chat conversations, assistant-only loss; "
                        "cpt: continued pretraining on the Romanian corpus against transformers' Trainer")
    p.add_argument("--block-size", type=int, default=512, help="--task cpt: packed row length")
    p.add_argument("--chat-row", type=int, default=512, help="--task chat: glotkit's packed row length")
    p.add_argument("--trl-packing", action="store_true", help="--task chat: TRL's packing=True")
    p.add_argument("--chat-no-pack", action="store_true",
                   help="--task chat: glotkit with one conversation per row (a shared system prompt is then "
                        "computed once per batch)")
    p.add_argument("--only", choices=["ours", "trl"])
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup >= args.steps:
        sys.exit("benchmark: --warmup must be smaller than --steps")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if args.task == "cpt":
            out = worker_ours_cpt(args) if args.worker == "ours" else worker_trainer_cpt(args)
        elif args.task == "chat":
            out = worker_ours_chat(args) if args.worker == "ours" else worker_trl_chat(args)
        else:
            out = worker_ours(args) if args.worker == "ours" else worker_trl(args)
        print("RESULT " + json.dumps(out))
        return
    results = {}
    for engine in ("trl", "ours"):
        if args.only and engine != args.only:
            continue
        cmd = [sys.executable, __file__, "--worker", engine, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--model", args.model,
               "--data", args.data] + (["--trl-no-checkpointing"] if args.trl_no_checkpointing else [])
        cmd += ["--ours-checkpointing"] if args.ours_checkpointing else []
        cmd += ["--trl-bf16"] if args.trl_bf16 else []
        cmd += ["--no-share-prefix"] if args.no_share_prefix else []
        cmd += ["--max-tokens-per-forward", str(args.max_tokens_per_forward), "--task", args.task,
                "--chat-row", str(args.chat_row), "--block-size", str(args.block_size)]
        cmd += ["--trl-packing"] if args.trl_packing else []
        cmd += ["--chat-no-pack"] if args.chat_no_pack else []
        print(f"[bench] running {engine} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
        if proc.returncode or not line:
            sys.exit(f"benchmark: {engine} worker failed:\n{proc.stderr[-3000:]}")
        results[engine] = json.loads(line[7:])
    if args.task == "cpt":
        print(f"\nLoRA r=8/alpha 8 all-linear, batch {args.batch_size} rows of {args.block_size}, {args.steps} steps "
              f"({args.warmup} warm-up steps not timed), model {args.model}, Romanian corpus, loss on every token; "
              "'trl' = transformers Trainer")
    elif args.task == "chat":
        print(f"\nLoRA r=8 q/k/v/o, ~{args.batch_size} conversations per step, one epoch over ro-chat "
              f"({args.warmup} warm-up steps not timed), model {args.model}, assistant-only loss, "
              f"device {next(iter(results.values()))['device']}")
    else:
        print(f"\nLoRA r=8 q/k/v/o, batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up steps not timed), "
              f"model {args.model}, XQuAD-ro, device {next(iter(results.values()))['device']}")
    last = args.task == "chat"
    print(f"{'engine':<10}{'tokens/s':>10}{'timed tokens':>14}{'seconds':>9}{'mean loss':>11}"
          + (f"{'last 3':>8}{'steps':>7}{'held-out':>10}" if last else "") + f"{'peak MB':>9}")
    for r in results.values():
        print(f"{r['engine']:<10}{r['tokens_per_s']:>10.1f}{r['timed_tokens']:>14}{r['seconds']:>9.1f}"
              f"{r['mean_loss']:>11.4f}" + (f"{r['last3_loss']:>8.3f}{r['steps']:>7}{r['heldout_loss']:>10.4f}"
                                            if last else "") + f"{r['peak_mb']:>9.0f}")
    if len(results) == 2:
        anchor = "Trainer" if args.task == "cpt" else "TRL"
        print(f"speed ratio glotkit/{anchor}: {results['ours']['tokens_per_s'] / results['trl']['tokens_per_s']:.1f}x; "
              f"peak memory ratio: {results['ours']['peak_mb'] / results['trl']['peak_mb']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
