"""Memory footprints: M1 after loading, M2 peak while generating from a long prompt.

Each configuration (fp32, bf16, NF4) is measured in a fresh process so the figures do not mix.
On CPU the figure is resident memory (RSS; M1 also shown above the process's baseline after
importing torch/transformers, and its file-backed part: memory-mapped weights); on CUDA it is
``torch.cuda.max_memory_allocated``.  M1 is taken after the tokenizer is let go: its share is
reported beside it (Gemma's 262k-entry tokenizer holds ~330 MB, more than the NF4 weights).  A static
estimate is printed beside each measurement: parameters × bytes per parameter (4-bit linear
weights cost 0.5 byte plus one fp32 scale per 64 weights; embeddings, norms and the rest stay in
the compute dtype), plus the KV cache of the prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

MODES = ("fp32", "bf16", "nf4")


@dataclass
class StaticEstimate:
    linear_params: int
    other_params: int
    embedding_params: int
    vocab_size: int = 0
    hidden_size: int = 0
    layers: int = 0
    heads: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__) | {m + "_weights_mb": round(self.weights_mb(m), 1) for m in MODES}

    def bytes_per(self, mode: str) -> int:
        return 2 if mode == "bf16" else 4

    def with_embedding_mb(self, mode: str, rows: int | None = None, bits: int | None = None) -> float:
        """Weights if the embedding had ``rows`` rows (vocabulary trimming) and/or were stored in
        ``bits`` (8-bit: one byte per value plus an fp32 scale per row)."""
        rows = rows or self.vocab_size
        per_row = self.hidden_size * (bits / 8 if bits else self.bytes_per(mode)) + (4 if bits else 0)
        return self.weights_mb(mode) - self.embedding_mb(mode) + rows * per_row / 2**20

    def weights_mb(self, mode: str) -> float:
        full = 4 if mode == "fp32" else 2
        if mode == "nf4":
            compute = 4  # on CPU we compute in fp32; the unquantized parts are kept in it
            linear = self.linear_params * (0.5 + 4 / 64)
            return (linear + self.other_params * compute) / 2**20
        return (self.linear_params + self.other_params) * full / 2**20

    def embedding_mb(self, mode: str) -> float:
        return self.embedding_params * (2 if mode == "bf16" else 4) / 2**20


def static_estimate(model) -> StaticEstimate:
    """Count what 4-bit quantization would touch (nn.Linear except the LM head) and the rest."""
    import torch

    head = model.get_output_embeddings()
    seen: set[int] = set()
    linear = other = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, torch.nn.Linear) and module is not head:
                linear += p.numel()
            else:
                other += p.numel()
    emb = model.get_input_embeddings().weight
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return StaticEstimate(linear, other, emb.numel(), emb.shape[0], emb.shape[1],
                          getattr(text, "num_hidden_layers", 0), getattr(text, "num_attention_heads", 0))


def estimate_before_loading(model_name: str) -> StaticEstimate:
    """The static estimate from the model's config alone: the model is built on the ``meta``
    device (shapes, no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from glotkit.models.loading import resolve_model_path

    path = resolve_model_path(model_name, log=lambda m: None)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return static_estimate(model)


def training_estimate(recipe, est: StaticEstimate, result: dict, row_tokens: int | None = None) -> dict:
    """Memory of a LoRA/QLoRA training step, estimated from shapes, beside the measured peak.

    weights (by mode) + LoRA parameters × 16 bytes (fp32 value, gradient, two AdamW moments)
    + activations of one forward pass of T tokens, by the per-layer rule of Korthikanti et al.
    (34·T·h bytes in 16-bit, doubled in fp32, plus the attention probabilities heads·T·L per row)
    + the LM head on one chunk of supervised positions (logits, softmax and their gradient).
    ``row_tokens``: tokens in one training row (the packing block of continued pretraining;
    default ``train.max_length``)."""
    from glotkit.models.lm import HEAD_CHUNK

    mode = "nf4" if recipe.model.quantization == "nf4" else ("bf16" if recipe.model.dtype == "bfloat16" else "fp32")
    act_bytes = 4 if mode != "bf16" else 2
    row = row_tokens or recipe.train.max_length
    tokens = min(recipe.train.max_tokens_per_forward or 10**9, recipe.train.batch_size * row)
    tokens = max(tokens, row)
    weights = est.weights_mb(mode)
    lora = result.get("trainable_params", 0) * 16 / 2**20
    activations = est.layers * (34 * tokens * est.hidden_size * act_bytes / 2
                                + est.heads * tokens * row * act_bytes) / 2**20
    head = 3 * min(HEAD_CHUNK, tokens) * est.vocab_size * 4 / 2**20
    total = weights + lora + activations + head
    measured = (result.get("memory") or {}).get("peak_rss_mb")
    return {"mode": mode, "tokens_per_forward": tokens, "weights_mb": round(weights, 1), "lora_and_adam_mb": round(lora, 1),
            "activations_mb": round(activations, 1), "lm_head_mb": round(head, 1), "estimate_mb": round(total, 1),
            "measured_peak_rss_mb": measured}


def kv_cache_mb(config, tokens: int, bytes_per: int) -> float:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * tokens * bytes_per / 2**20


def _settle(model) -> None:
    """Make RSS mean what the model occupies: read every weight once (safetensors maps files
    lazily, so untouched weights would not count yet) and hand freed heap back to the OS (the
    conversion buffers of loading would otherwise still count)."""
    import ctypes
    import gc

    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.view(-1)[:: max(1, 4096 // max(t.element_size(), 1))].float().sum()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker(model_name: str, mode: str, prompt_tokens: int, new_tokens: int) -> dict:
    import torch
    import transformers

    del transformers  # imported so that the baseline includes the libraries
    from glotkit.config import ModelSection
    from glotkit.models.loading import load_model
    from glotkit.models.memory import current_rss_mb, file_backed_rss_mb, peak_memory, reset_peak

    base = current_rss_mb()
    cfg = ModelSection(name=model_name, dtype="bfloat16" if mode == "bf16" else "float32",
                       quantization="nf4" if mode == "nf4" else "none")
    model, tok, device = load_model(cfg, log=lambda m: None)
    model.eval()
    _settle(model)
    text = "Ion Creangă s-a născut la Humulești, în ținutul Neamțului. " * 200
    ids = tok(text, return_tensors="pt")["input_ids"][:, :prompt_tokens].to(device)
    pad_id = tok.pad_token_id
    # the tokenizer's share (a 262k-entry vocabulary costs hundreds of MB): measured by letting it go
    with_tokenizer = current_rss_mb()
    del tok
    _settle(model)
    tokenizer_mb = with_tokenizer - current_rss_mb()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        m1 = torch.cuda.memory_allocated() / 2**20
    else:
        m1 = current_rss_mb()
    file_mb = file_backed_rss_mb()
    est = static_estimate(model)
    tensor_mb = model.get_memory_footprint() / 2**20  # bytes of parameters and buffers
    reset_peak(device)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad_id)
    peak = peak_memory(device)
    m2 = peak.get("peak_cuda_mb", peak["peak_rss_mb"])
    bytes_per = 2 if mode == "bf16" else 4
    return {
        "mode": mode, "device": device, "m1_mb": round(m1, 1), "m1_over_baseline_mb": round(m1 - base, 1),
        "m2_mb": round(m2, 1), "baseline_mb": round(base, 1), "prompt_tokens": int(ids.shape[1]),
        "tokenizer_mb": round(tokenizer_mb, 1), "m1_file_backed_mb": None if file_mb is None else round(file_mb, 1),
        "tensor_mb": round(tensor_mb, 1), "estimate_weights_mb": round(est.weights_mb(mode), 1),
        "estimate_kv_mb": round(kv_cache_mb(model.config, ids.shape[1] + new_tokens, bytes_per), 1),
        "embedding_mb": round(est.embedding_mb(mode), 1),
        "linear_params": est.linear_params, "other_params": est.other_params, "embedding_params": est.embedding_params,
        "vocab_size": est.vocab_size, "hidden_size": est.hidden_size,
    }


def measure(model_name: str, modes=MODES, prompt_tokens: int = 1000, new_tokens: int = 16) -> list[dict]:
    """Run each mode in its own process; a mode that cannot run (NF4 without bitsandbytes) is reported."""
    out = []
    for mode in modes:
        cmd = [sys.executable, "-m", "glotkit.eval.memory", model_name, mode, str(prompt_tokens), str(new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            out.append({"mode": mode, "error": err})
        else:
            out.append(json.loads(line[7:]))
    return out


def table(rows: list[dict], keep_vocab: int | None = None) -> str:
    """The memory table; the last columns estimate the weights with a smaller embedding: stored in
    8 bits, or trimmed to the ``keep_vocab`` token ids a corpus uses (``glotkit trim-vocab``)."""
    trim = f" | est. vocab trimmed to {keep_vocab:,}" if keep_vocab else ""
    lines = ["| mode | weights in memory (MB) | estimate: weights | M1 RSS after load | M1 − baseline | of M1: file-backed | "
             f"tokenizer (not in M1) | M2 peak RSS generating | estimate: KV cache | of the weights: embedding | "
             f"est. 8-bit embedding{trim} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if keep_vocab else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | not measured: {r['error']} | | | | | | | | | |" + (" |" if keep_vocab else ""))
            continue
        est = StaticEstimate(r["linear_params"], r["other_params"], r["embedding_params"], r.get("vocab_size", 0),
                             r.get("hidden_size", 0))
        small = f" | {est.with_embedding_mb(r['mode'], bits=8):.0f}" if est.hidden_size else " | –"
        if keep_vocab:
            small += f" | {est.with_embedding_mb(r['mode'], rows=keep_vocab):.0f}" if est.hidden_size else " | –"
        def mb(key):
            return "–" if r.get(key) is None else f"{r[key]:.0f}"

        lines.append(f"| {r['mode']} | {r['tensor_mb']:.0f} | {r['estimate_weights_mb']:.0f} | {r['m1_mb']:.0f} | "
                     f"{r['m1_over_baseline_mb']:.0f} | {mb('m1_file_backed_mb')} | {mb('tokenizer_mb')} | "
                     f"{r['m2_mb']:.0f} | {r['estimate_kv_mb']:.0f} | {r['embedding_mb']:.0f}{small} |")
    ok = {r["mode"]: r for r in rows if "error" not in r}
    if "fp32" in ok and "nf4" in ok:
        lines += ["", f"NF4 reduction: weights {ok['fp32']['tensor_mb'] / ok['nf4']['tensor_mb']:.2f}×, "
                  f"M1 {ok['fp32']['m1_over_baseline_mb'] / max(ok['nf4']['m1_over_baseline_mb'], 1):.2f}× "
                  f"(RSS above baseline), M2 {ok['fp32']['m2_mb'] / ok['nf4']['m2_mb']:.2f}×."]
    return "\n".join(lines)


if __name__ == "__main__":  # the worker: python -m glotkit.eval.memory MODEL MODE PROMPT NEW
    import warnings

    warnings.filterwarnings("ignore")
    name, mode, p, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print("RESULT " + json.dumps(_worker(name, mode, p, n)))
