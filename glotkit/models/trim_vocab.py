"""Vocabulary trimming: keep the token ids a corpus uses, drop the rest of the embedding.

Gemma 3 270M spends 168M of its 268M parameters on a 262,144-row embedding (tied to the LM head);
a Romanian corpus uses ~27k of those rows.  Trimming keeps

* every token the corpus's tokenization uses,
* the tokens BPE needs to build them (the closure over the merges that produce kept tokens, so
  the trimmed tokenizer tokenizes the corpus exactly as before),
* the fallback alphabet (the 256 ``<0xXX>`` byte tokens with byte fallback; else every
  one-symbol token), so any text still tokenizes,
* the special tokens (BOS, EOS, PAD, UNK and the chat-turn markers),

renumbers them in their old order, rewrites ``tokenizer.json`` (vocabulary, merges, added tokens,
post-processor ids) and slices the embedding (and an untied LM head) to the kept rows.  The
result is an ordinary Hugging Face folder.  :func:`trim_vocabulary` checks on sample texts that
the new tokenizer gives the mapped old ids and the new model the old logits of the kept tokens.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

from glotkit.errors import GlotkitError
from glotkit.logs import say
from glotkit.models.safety import check_remote_code, check_weights
from glotkit.models.safety import first_line as _first_line

CHAT_MARKERS = ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>")


def used_ids(tokenizer, texts: Iterable[str], batch: int = 256) -> set[int]:
    out: set[int] = set()
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) == batch:
            for ids in tokenizer(buf, add_special_tokens=False)["input_ids"]:
                out.update(ids)
            buf = []
    if buf:
        for ids in tokenizer(buf, add_special_tokens=False)["input_ids"]:
            out.update(ids)
    return out


def kept_tokens(tok_json: dict, used: set[int], specials: Sequence[str]) -> set[str]:
    """Token strings to keep: used ones, their BPE ancestors, the fallback alphabet, specials."""
    model = tok_json["model"]
    if model.get("type") != "BPE":
        raise GlotkitError(f"trim-vocab: only BPE tokenizers are supported (this one is {model.get('type')})")
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a["content"] for a in tok_json.get("added_tokens", [])}
    keep = {by_id[i] for i in used if i in by_id} | {added[i] for i in used if i in added}
    if model.get("byte_fallback"):
        keep |= {t for t in vocab if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
    else:
        keep |= {t for t in vocab if len(t) == 1}
    keep |= {s for s in specials if s in vocab or s in added.values()}
    # a token may be built by several merges ("ab"+"c" or "a"+"bc"); which one BPE applies depends
    # on the word, so every way of building a kept token stays buildable
    parents: dict[str, list[tuple[str, str]]] = {}
    for m in model.get("merges", []):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        parents.setdefault(a + b, []).append((a, b))
    stack = list(keep)
    while stack:
        t = stack.pop()
        for pair in parents.get(t, ()):
            for p in pair:
                if p not in keep and p in vocab:
                    keep.add(p)
                    stack.append(p)
    return keep


def trimmed_tokenizer_json(tok_json: dict, keep: set[str]) -> tuple[dict, list[int]]:
    """The rewritten tokenizer.json and ``old_ids`` (new id -> old id)."""
    new = copy.deepcopy(tok_json)
    vocab = tok_json["model"]["vocab"]
    added = {a["content"]: a["id"] for a in tok_json.get("added_tokens", [])}
    old_of = {**{t: i for t, i in vocab.items() if t in keep}, **{t: i for t, i in added.items() if t in keep}}
    old_ids = sorted(set(old_of.values()))
    new_id = {o: n for n, o in enumerate(old_ids)}
    new["model"]["vocab"] = {t: new_id[i] for t, i in vocab.items() if t in keep}
    merges = []
    for m in tok_json["model"].get("merges", []):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in keep and b in keep and a + b in keep:
            merges.append(m)
    new["model"]["merges"] = merges
    new["added_tokens"] = [dict(a, id=new_id[a["id"]]) for a in tok_json.get("added_tokens", []) if a["content"] in keep]
    post = new.get("post_processor")
    if post and post.get("type") == "TemplateProcessing":
        for name, spec in post.get("special_tokens", {}).items():
            spec["ids"] = [new_id[i] for i in spec["ids"] if i in new_id]
    return new, old_ids


def trim_vocabulary(model_dir: str | Path, texts: Sequence[str], out_dir: str | Path, *,
                    check_texts: int = 32, log: Callable[[str], None] = say) -> dict:
    """Write a trimmed copy of the Hugging Face model folder ``model_dir`` to ``out_dir``."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise GlotkitError(f"{model_dir}: not a local model folder (trim-vocab needs one; download a hub model first)")
    # refuse pickle-only weights, truncated safetensors and model code here too, as load_model does
    check_weights(model_dir)
    check_remote_code(model_dir, trust_remote_code=False, key=None)
    if not (model_dir / "tokenizer.json").is_file():
        raise GlotkitError(f"{model_dir}: no tokenizer.json (trim-vocab needs a fast tokenizer's file)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise GlotkitError(f"{out_dir}: exists and is not empty")
    if not texts:
        raise GlotkitError("trim-vocab: no text to take the vocabulary from")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise GlotkitError(f"{model_dir}: the tokenizer cannot be loaded ({_first_line(err)})") from None
    tok_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    specials = [s for s in list(tok.all_special_tokens) + list(CHAT_MARKERS)]
    used = used_ids(tok, texts)
    keep = kept_tokens(tok_json, used, specials)
    new_json, old_ids = trimmed_tokenizer_json(tok_json, keep)
    log(f"trim-vocab: {len(used):,} token ids used by the text; keeping {len(old_ids):,} of {len(tok):,}")

    model = _load(model_dir)
    before = sum(p.numel() for p in model.parameters())
    index = torch.tensor(old_ids)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = torch.nn.Parameter(emb.weight.data[index].clone())
    emb.num_embeddings = len(old_ids)
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = torch.nn.Parameter(head.weight.data[index].clone())
        head.out_features = len(old_ids)
    new_id = {o: n for n, o in enumerate(old_ids)}
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_cfg.vocab_size = len(old_ids)
    model.config.vocab_size = len(old_ids)
    for cfg in (model.config, text_cfg, model.generation_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(cfg, key, None)
            if isinstance(v, int):
                setattr(cfg, key, new_id.get(v))
            elif isinstance(v, list):
                setattr(cfg, key, [new_id[x] for x in v if x in new_id])
    after = sum(p.numel() for p in model.parameters())

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False), encoding="utf-8")
        kw = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if getattr(tok, k, None)}
        new_tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp / "tokenizer.json"), **kw)
        if getattr(tok, "chat_template", None):
            new_tok.chat_template = tok.chat_template
        new_tok.save_pretrained(str(tmp))
        model.save_pretrained(str(tmp))
        stats = _check(tok, new_tok, _load(model_dir), _load(tmp), texts[:check_texts], new_id)
        info = {"source": str(model_dir), "vocab_before": len(tok), "vocab_after": len(old_ids),
                "ids_used_by_text": len(used), "params_before": before, "params_after": after,
                "size_on_disk_mb": round(sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20, 1),
                "check": stats, "old_ids": old_ids}
        (tmp / "glotkit-trim.json").write_text(json.dumps(info), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"trim-vocab: {before:,} -> {after:,} parameters; tokenization and logits checked on "
        f"{stats['texts']} texts (max |Δlogit| {stats['max_abs_logit_diff']:.2e})")
    return {k: v for k, v in info.items() if k != "old_ids"}


def _load(folder: Path):
    """The model in ``folder`` in fp32, from safetensors only; what transformers refuses is one line."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as err:
        raise GlotkitError(f"{folder}: the model cannot be loaded ({_first_line(err)})") from None


def _check(old_tok, new_tok, old_model, new_model, texts: Sequence[str], new_id: dict[int, int]) -> dict:
    """The new tokenizer must give the mapped old ids; the new model the old logits of kept rows."""
    import torch

    worst = 0.0
    old_ids_sorted = torch.tensor(sorted(new_id))
    for t in texts:
        a = old_tok(t)["input_ids"]
        b = new_tok(t)["input_ids"]
        if [new_id.get(i, -1) for i in a] != b:
            raise GlotkitError("trim-vocab: the trimmed tokenizer does not reproduce the original tokenization "
                               f"of {t[:60]!r}; nothing was written")
        with torch.no_grad():
            la = old_model(input_ids=torch.tensor([a[:256]])).logits[0][:, old_ids_sorted]
            lb = new_model(input_ids=torch.tensor([b[:256]])).logits[0]
        worst = max(worst, float((la - lb).abs().max()))
    if worst > 1e-3:
        raise GlotkitError(f"trim-vocab: logits differ by {worst:.3g} after trimming; nothing was written")
    return {"texts": len(texts), "max_abs_logit_diff": worst}
