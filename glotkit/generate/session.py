"""Trying a model: an interactive chat that streams tokens, and batched generation over a file.

Both take a run folder (its recipe's model, its adapter and, for a chat run, its chat template)
or a model (built-in name, Hugging Face folder, hub id) with an optional adapter.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from glotkit.errors import GlotkitError
from glotkit.logs import say


@dataclass
class Target:
    """What to load: the model, an adapter folder (or None), a chat template text (or None: the
    tokenizer's own)."""

    model: str
    adapter: Path | None
    template: str | None
    label: str


def resolve_target(name: str, adapter: str | None = None, template: str | None = None) -> Target:
    """A run folder (``config.yaml`` inside) or a model name; ``adapter`` and ``template`` (a file)
    override what the run folder says."""
    import yaml

    from glotkit.data.chat import read_template

    path = Path(name)
    chosen = read_template(template) if template else None
    if (path / "config.yaml").is_file():
        cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        model = (cfg.get("model") or {}).get("name")
        if not model:
            raise GlotkitError(f"{path / 'config.yaml'}: no model.name")
        run_adapter = path / "adapter"
        full = cfg.get("finetune") == "full"
        if full and adapter is None:  # the whole tuned model, not an adapter
            if not (path / "model" / "config.json").is_file():
                raise GlotkitError(f"{path}: the run has no tuned model yet (train it first: glotkit run RECIPE)")
            model, run_adapter = str(path / "model"), None
        elif adapter is None and not (run_adapter / "adapter_config.json").is_file():
            raise GlotkitError(f"{path}: the run has no adapter yet (train it first: glotkit run RECIPE)")
        file = (cfg.get("chat") or {}).get("template")
        if chosen is None and file:
            if not Path(file).is_file():
                raise GlotkitError(f"{path / 'config.yaml'}: chat.template {file} not found from here; "
                                   "give it with --template")
            chosen = read_template(file)
        return Target(model, Path(adapter) if adapter else run_adapter, chosen,
                      f"{path.name} (fully fine-tuned)" if full and not adapter else f"{model} + {path.name}")
    if path.exists() and not path.is_dir():
        raise GlotkitError(f"{path}: not a run folder or a model folder")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise GlotkitError(f"--adapter {adapter}: not a PEFT adapter folder (no adapter_config.json)")
    return Target(name, Path(adapter) if adapter else None, chosen, name + (f" + {adapter}" if adapter else ""))


def load_target(target: Target, log: Callable[[str], None] = say):
    """(model, tokenizer, device) with the adapter applied."""
    from glotkit.config import ModelSection
    from glotkit.models.loading import load_model

    model, tok, device = load_model(ModelSection(name=target.model), log=log)
    if target.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(target.adapter))
    model.eval()
    return model, tok, device


def chat_loop(model, tok, device: str, encoder, *, system: str | None = None, max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 0.9, stdin: TextIO | None = None,
              stdout: TextIO | None = None, log: Callable[[str], None] = say) -> int:
    """Read user turns from ``stdin``, stream the answers to ``stdout``; ``/reset`` starts over,
    ``/exit`` (or end of input) stops.  Returns the number of answers given."""
    import torch
    from transformers import TextStreamer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    class _Out(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stdout.write(text + ("\n" if stream_end else ""))
            stdout.flush()

    stop = encoder.stop_ids()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    answers = 0
    log("chat: /reset starts a new conversation, /exit (or Ctrl-D) leaves")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return answers
        text = line.strip()
        if text in ("/exit", "/quit"):
            return answers
        if text == "/reset":
            history = history[:1] if system else []
            stdout.write("(new conversation)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = tok(encoder.render(history, generation_prompt=True), add_special_tokens=False, return_tensors="pt")
        ids = {k: v.to(device) for k, v in ids.items()}
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0],
                                 streamer=_Out(tok, skip_prompt=True, skip_special_tokens=True), **sampling)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})
        answers += 1


# --------------------------------------------------------------------------- batched generation


def read_prompts(path: Path) -> list[dict]:
    """Records of a JSONL file, each with ``prompt`` (text, used as is) or ``messages`` (a
    conversation the model answers next; the chat template is applied) and an optional ``id``."""
    from glotkit.data.chat import _messages, check_messages
    from glotkit.io import check_unique, iter_jsonl_objects

    if not path.is_file():
        raise GlotkitError(f"{path}: input file not found")
    out = []
    for n, rec in iter_jsonl_objects(path):
        where = f"{path}: line {n}"
        if "messages" in rec:
            msgs = _messages(rec["messages"] if isinstance(rec["messages"], list) else [], where, "messages",
                             "role", "content")
            if not msgs or msgs[-1]["role"] != "user":
                raise GlotkitError(f"{where}: 'messages' must end with a user turn (the model answers it)")
            check_messages(msgs + [{"role": "assistant", "content": "-"}], where)
            rec = {**rec, "messages": msgs}
        elif not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise GlotkitError(f"{where}: needs 'prompt' (text) or 'messages' (a conversation)")
        rec.setdefault("id", str(n))
        rec["id"] = str(rec["id"])
        out.append((f"line {n}", rec))
    if not out:
        raise GlotkitError(f"{path}: no prompts")
    check_unique([(loc, r["id"]) for loc, r in out], path, "id")
    return [r for _, r in out]


def generate_file(generator, encoder, records: list[dict], output: Path, *, max_new_tokens: int, batch_size: int,
                  temperature: float = 0.0, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
                  progress: bool = True, log: Callable[[str], None] = say) -> int:
    """Answer every record into ``output`` (JSONL: the record with ``generation`` added), in input
    order.  Answers are appended to ``OUTPUT.partial`` as each batch ends; a rerun continues
    there; the output file appears whole at the end.  Returns the number of new answers."""
    from glotkit.io import append_rows, atomic_write_jsonl, read_appended

    partial = output.with_name(output.name + ".partial")
    done = read_appended(partial, lambda r: r["id"])
    if done:
        log(f"generate: resuming, {len(done)} of {len(records)} answers already written")
    todo = [r for r in records if r["id"] not in done]

    def text_of(r: dict) -> str:
        return encoder.render(r["messages"], generation_prompt=True) if "messages" in r else r["prompt"]

    texts = [text_of(r) for r in todo]  # (a template error shows before any generation)
    # a server is sent the text of these ids (a leading BOS left to the server's own tokenizer)
    tok = encoder.tok
    # a plain prompt gets the tokenizer's special tokens (BOS); a rendered conversation has them
    prompts = [tok(t, add_special_tokens="messages" not in r)["input_ids"] for t, r in zip(texts, todo)]
    if todo:
        output.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("a", encoding="utf-8") as fh:
            def on_batch(idx: list[int], outs: list[str]) -> None:
                rows = [{**todo[i], "generation": t} for i, t in zip(idx, outs)]
                for r in rows:
                    done[r["id"]] = r
                append_rows(fh, rows)

            generator.sample(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, stop=None, progress=progress,
                             desc="generate", on_batch=on_batch)
    atomic_write_jsonl(output, [done[r["id"]] for r in records])
    partial.unlink(missing_ok=True)
    return len(todo)


def stopping_at_turn_end(model, stop_ids):
    """Local generation ends at the template's end-of-turn token as at EOS (the model's
    generation config is restored afterwards)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        gc = getattr(model, "generation_config", None)
        if gc is None or not stop_ids:
            yield
            return
        old = gc.eos_token_id
        gc.eos_token_id = list(stop_ids)
        try:
            yield
        finally:
            gc.eos_token_id = old

    return ctx()


def dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
