"""Taking a tuned model out of glotkit: the adapter merged into the base weights (a normal Hugging
Face folder), GGUF files made by llama.cpp's own converter (``convert_hf_to_gguf.py``) and
quantizer (``llama_model_quantize``), an Ollama ``Modelfile`` and a model card.

llama.cpp's converter is a script of the llama.cpp sources, not of a package.  It is taken from
``GLOTKIT_LLAMA_CPP`` (a llama.cpp checkout) or, once, from the source distribution of the
installed ``llama-cpp-python`` (which vendors the matching llama.cpp), fetched from PyPI when
the user asks for a GGUF export, checked against a pinned sha256 and unpacked into the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glotkit.errors import GlotkitError
from glotkit.logs import say
from glotkit.models.convert import sha256_file

QUANTS = ("f16", "q8_0", "q4_k_m")
# sha256 of llama-cpp-python's source distributions (their vendor/llama.cpp holds the converter)
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}


@dataclass
class Source:
    """What is exported: a base model (built-in name, folder or hub id) and an adapter, or a whole
    model folder (``adapter`` None); the run folder it came from, if any."""

    model: str
    adapter: Path | None
    run: Path | None = None
    template: str | None = None
    recipe: dict = field(default_factory=dict)


def _base_available(name: str) -> bool:
    from glotkit.models.registry import BUILTIN_MODELS

    return name in BUILTIN_MODELS or Path(name).expanduser().is_dir()


def resolve_source(path: str, base: str | None = None, template: str | None = None) -> Source:
    """A run folder (its recipe's model and its adapter, or its whole tuned model), an adapter
    folder (its base from ``base`` or from its config), or a model folder."""
    import yaml

    from glotkit.data.chat import read_template

    p = Path(path)
    chosen = read_template(template) if template else None
    if (p / "config.yaml").is_file():
        recipe = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {}
        model = base or (recipe.get("model") or {}).get("name")
        file = (recipe.get("chat") or {}).get("template")
        if chosen is None and file and Path(file).is_file():
            chosen = read_template(file)
        if recipe.get("finetune") == "full":
            if not (p / "model" / "config.json").is_file():
                raise GlotkitError(f"{p}: the run has no tuned model yet (train it first: glotkit run RECIPE)")
            return Source(str(p / "model"), None, p, chosen, recipe)
        if not (p / "adapter" / "adapter_config.json").is_file():
            raise GlotkitError(f"{p}: the run has no adapter yet (train it first: glotkit run RECIPE)")
        if not _base_available(model) and "/" not in model:
            raise GlotkitError(f"{p}: the adapter's base model '{model}' is not available here (give --base NAME)")
        return Source(model, p / "adapter", p, chosen, recipe)
    if (p / "adapter_config.json").is_file():
        cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
        model = base or cfg.get("base_model_name_or_path")
        if not model:
            raise GlotkitError(f"{p}: the adapter names no base model; give --base NAME")
        if not _base_available(model) and (base is None or Path(model).is_absolute()):
            raise GlotkitError(f"{p}: the adapter's base model '{model}' is not available here (give --base NAME: "
                               "a built-in name, a folder or a hub id)")
        return Source(model, p, None, chosen)
    if (p / "config.json").is_file():
        return Source(str(p), None, None, chosen)
    raise GlotkitError(f"{p}: not a run folder, an adapter folder or a model folder")


def _probe_ids(tok) -> list[int]:
    text = "Capitala României este București. The quick brown fox"
    return tok(text)["input_ids"][:32]


def merge(source: Source, out: Path, log: Callable[[str], None] = say) -> dict:
    """The adapter merged into the base weights, saved to ``out`` as a Hugging Face folder
    (safetensors, tokenizer with the chat template, generation config that stops at the
    template's end of turn); the merged model's logits are checked against base + adapter."""
    import torch

    from glotkit.config import ModelSection
    from glotkit.data.chat import ChatEncoder
    from glotkit.models.loading import load_model

    model, tok, _ = load_model(ModelSection(name=source.model, device="cpu"), log=log)
    probe = torch.tensor([_probe_ids(tok)])
    diff = 0.0
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter)).eval()
        with torch.no_grad():
            before = model(input_ids=probe).logits.float()
        model = model.merge_and_unload()
        with torch.no_grad():
            after = model(input_ids=probe).logits.float()
        diff = float((after - before).abs().max())
        scale = float(before.abs().max())
        if diff > 1e-3 * max(scale, 1.0):
            raise GlotkitError(f"merge: the merged model's logits differ from base + adapter by {diff:.3g}")
        log(f"merge: logits of the merged model = base + adapter (max |Δ| {diff:.2e})")
    if source.template:
        tok.chat_template = source.template
    enc = ChatEncoder(tok, source.template)
    stop = enc.stop_ids()
    if stop:
        model.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"max_abs_logit_diff": diff, "stop_tokens": tok.convert_ids_to_tokens(stop),
            "chat_template": bool(getattr(tok, "chat_template", None)), "vocab_size": len(tok)}


# --------------------------------------------------------------------------- llama.cpp's tools


def _llama_cpp_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:
        raise GlotkitError("GGUF export needs llama.cpp's tools: pip install 'glotkit[llamacpp]' "
                           "(or set GLOTKIT_LLAMA_CPP to a llama.cpp checkout for the converter)") from None


def converter_dir(cache: Path, log: Callable[[str], None] = say) -> Path:
    """A folder with ``convert_hf_to_gguf.py`` (and the ``conversion``/``gguf-py`` it imports)."""
    env = os.environ.get("GLOTKIT_LLAMA_CPP")
    if env:
        d = Path(env).expanduser()
        if not (d / "convert_hf_to_gguf.py").is_file():
            raise GlotkitError(f"GLOTKIT_LLAMA_CPP={env}: no convert_hf_to_gguf.py there (a llama.cpp checkout)")
        return d
    ver = _llama_cpp_version()
    d = cache / "llama.cpp" / ver
    if (d / "convert_hf_to_gguf.py").is_file():
        return d
    want = SDIST_SHA256.get(ver)
    if want is None:
        raise GlotkitError(f"llama-cpp-python {ver}: its source's sha256 is not pinned in glotkit (pinned: "
                           f"{', '.join(SDIST_SHA256)}); set GLOTKIT_LLAMA_CPP to a llama.cpp checkout of the same version")
    import tarfile
    import tempfile

    log(f"gguf: fetching llama.cpp's converter once: the llama-cpp-python {ver} source from PyPI (about 77 MB), "
        f"sha256 checked, into {d}")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={ver}", "-d", tmp, "--quiet"], capture_output=True, text=True)
        files = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode or not files:
            why = (r.stderr.strip().splitlines() or ["no file"])[-1]
            raise GlotkitError(f"gguf: could not fetch llama-cpp-python {ver}'s source from PyPI ({why}); without a "
                               "network, set GLOTKIT_LLAMA_CPP to a llama.cpp checkout")
        got = sha256_file(files[0])
        if got != want:
            raise GlotkitError(f"gguf: {files[0].name} has sha256 {got}, expected {want}; refusing it")
        prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
        keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
        staging = Path(tmp) / "out"
        with tarfile.open(files[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(keep) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(d, ignore_errors=True)
        shutil.move(str(staging), d)
    return d


# llama.cpp's converter names a BPE tokenizer's pre-tokenizer by hashing how it tokenizes a fixed
# text; a vocabulary trimmed by glotkit tokenizes that text differently (its unseen characters go
# through bytes) while its pre-tokenizer rules are the original's.  For such a folder the converter
# runs with its own lookup asked about the original tokenizer when the trimmed one is unknown.
_TRIMMED = """
import runpy, sys
conv, original = sys.argv[1], sys.argv[2]
sys.path.insert(0, conv)
sys.path.insert(1, conv + "/gguf-py")
import conversion.base as base
lookup = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return lookup(self, tokenizer)
    except NotImplementedError:
        from transformers import AutoTokenizer
        return lookup(self, AutoTokenizer.from_pretrained(original))
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [conv + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _trimmed_from(folder: Path) -> Path | None:
    """The original model folder of a vocabulary trimmed by ``glotkit trim-vocab`` (None: not trimmed)."""
    record = folder / "glotkit-trim.json"
    if not record.is_file():
        return None
    source = Path(json.loads(record.read_text(encoding="utf-8")).get("source") or "")
    if not (source / "tokenizer.json").is_file() and not (source / "tokenizer_config.json").is_file():
        raise GlotkitError(f"{record}: the vocabulary was trimmed from {source}, which is not here; llama.cpp's "
                           "converter needs that tokenizer to name the pre-tokenizer")
    return source


def convert_f16(merged: Path, out_file: Path, cache: Path, log: Callable[[str], None] = say,
                trimmed_from: Path | None = None) -> None:
    """llama.cpp's converter: a Hugging Face folder -> one f16 GGUF file."""
    conv = converter_dir(cache, log)
    tmp = out_file.with_name(out_file.name + ".tmp")
    args = [str(merged), "--outfile", str(tmp), "--outtype", "f16"]
    if trimmed_from is not None:
        cmd = [sys.executable, "-c", _TRIMMED, str(conv), str(trimmed_from)] + args
    else:
        cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py")] + args
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        last = [s for s in r.stderr.strip().splitlines() if s.strip()][-1:] or ["no output"]
        raise GlotkitError(f"gguf: llama.cpp's converter failed on {merged} ({last[0][:300]})")
    os.replace(tmp, out_file)


_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""
_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``, through llama-cpp-python) in a process of its own."""
    _llama_cpp_version()
    tmp = dst.with_name(dst.name + ".tmp")
    r = subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(tmp), _FTYPES[quant]], capture_output=True,
                       text=True)
    if r.returncode or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise GlotkitError(f"gguf: llama.cpp's quantizer failed for {quant} (exit {r.returncode})")
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- Ollama and the card

# Ollama's Go templates for the turn formats glotkit recognises in a chat template (written for glotkit)
_OLLAMA = {
    "gemma": ('{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
              '{{- if eq .Role "system" }}<start_of_turn>user\n{{ .Content }}\n\n'
              '{{- else if eq .Role "user" }}{{ if or (eq $i 0) (ne (index $.Messages (sub $i 1)).Role "system") }}'
              '<start_of_turn>user\n{{ end }}{{ .Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}'
              '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}{{ if not $last }}<end_of_turn>\n'
              '{{ end }}{{- end }}{{- end }}', ["<end_of_turn>"]),
    "chatml": ('{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
               '<|im_start|>{{ .Role }}\n{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>\n{{ end }}'
               '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{- end }}', ["<|im_end|>"]),
    "llama3": ('{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
               '<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}'
               '{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}'
               '{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
               '{{- end }}', ["<|eot_id|>"]),
}


def turn_format(rendered: str) -> str | None:
    """Which known turn format a rendered conversation is written in."""
    if "<start_of_turn>" in rendered:
        return "gemma"
    if "<|im_start|>" in rendered:
        return "chatml"
    if "<|start_header_id|>" in rendered:
        return "llama3"
    return None


def modelfile(gguf_name: str, rendered: str | None) -> tuple[str, str | None]:
    """An Ollama Modelfile for the GGUF file and the format it translated (None: no chat template
    recognised, so none is written)."""
    fmt = turn_format(rendered) if rendered else None
    lines = [f"FROM ./{gguf_name}", ""]
    if fmt:
        template, stops = _OLLAMA[fmt]
        lines += [f'TEMPLATE """{template}"""', ""] + [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0.7", "PARAMETER top_p 0.9", "PARAMETER num_ctx 2048", ""]
    return "\n".join(lines), fmt


def model_card(source: Source, info: dict) -> str:
    """README.md for the exported folder: what it is, where it came from, what it measured."""
    from glotkit import __version__
    from glotkit.models.registry import BUILTIN_MODELS

    recipe = source.recipe
    base = (recipe.get("model") or {}).get("name") or source.model
    licence = {"gemma-3-270m": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
               "smollm2-135m-instruct": "Apache-2.0"}.get(base, "see the base model's own licence")
    lines = [f"# {info['name']}", "",
             f"Exported by glotkit {__version__}"
             + (f" from the run `{source.run.name}`" if source.run else "") + ".", "",
             "## Model", "",
             f"- base model: `{base}`" + (f" ({BUILTIN_MODELS[base].description})" if base in BUILTIN_MODELS else ""),
             f"- licence of the base model: {licence}; the tuned weights inherit it",
             f"- tuning: {'full fine-tuning' if recipe.get('finetune') == 'full' else 'LoRA adapter merged into the base'}"
             + (f" (r={recipe['lora']['r']}, alpha={recipe['lora']['alpha']}, targets {recipe['lora']['target_modules']})"
                if recipe.get("lora") and recipe.get("finetune") != "full" else ""),
             f"- merged logits = base + adapter: max |Δ| {info['merge']['max_abs_logit_diff']:.2e}",
             f"- chat template: {'yes' if info['merge']['chat_template'] else 'none'}; stop tokens "
             f"{', '.join(info['merge']['stop_tokens'])}", ""]
    if recipe:
        data = recipe.get("data") or recipe.get("pretrain") or {}
        lines += ["## Recipe and data", "", f"- system `{recipe.get('system')}`, recipe name `{recipe.get('name')}`, "
                  f"seed {recipe.get('seed')}",
                  f"- data: {json.dumps({k: v for k, v in data.items() if k in ('train', 'test', 'corpus', 'language')})}",
                  "", "<details><summary>the resolved recipe</summary>", "", "```json", json.dumps(recipe, indent=1),
                  "```", "", "</details>", ""]
    metrics = info.get("metrics")
    if metrics:
        lines += ["## Metrics of the run", "", "```json", json.dumps(metrics, indent=1), "```", ""]
    if info.get("gguf"):
        lines += ["## GGUF files", "", "| file | quantization | MB | sha256 |", "|---|---|---:|---|"]
        for g in info["gguf"]:
            lines.append(f"| {g['file']} | {g['quant']} | {g['mb']:.0f} | `{g['sha256']}` |")
        first = info["gguf"][0]["file"]
        lines += ["", "Made with llama.cpp's own `convert_hf_to_gguf.py` and `llama_model_quantize`.", "",
                  "```bash", f"python -m llama_cpp.server --model {first}        # OpenAI-compatible server",
                  f"llama-server -m {first}", "ollama create NAME -f Modelfile && ollama run NAME", "```", ""]
    lines += ["## Serving the merged folder", "", "```bash", "vllm serve .        # this folder (GPU)", "```", ""]
    return "\n".join(lines)


def export(source: Source, out: Path, *, gguf: bool, quants: list[str], cache: Path, overwrite: bool = False,
           log: Callable[[str], None] = say) -> dict:
    """Write the merged folder (always: the GGUF files are made from it), and with ``gguf`` one
    GGUF file per quantization, a Modelfile and the checksums; the model card and export.json last."""
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        raise GlotkitError(f"--quant {bad[0]}: not one of {', '.join(QUANTS)}")
    if out.exists() and not overwrite:
        raise GlotkitError(f"--out {out}: exists; give another folder or --overwrite")
    # everything is written into a folder beside it, which becomes ``out`` only when complete
    work = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    try:
        info = _export_into(source, work, out.name, gguf=gguf, quants=quants, cache=cache, log=log)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(work, out)
    return info


def _export_into(source: Source, out: Path, label: str, *, gguf: bool, quants: list[str], cache: Path,
                 log: Callable[[str], None]) -> dict:
    name = source.run.name if source.run else Path(source.adapter or source.model).name or label
    info: dict = {"name": name, "source": {"model": source.model, "adapter": str(source.adapter) if source.adapter else None,
                                           "run": str(source.run) if source.run else None}}
    info["merge"] = merge(source, out, log)
    if source.run and (source.run / "metrics.json").is_file():
        info["metrics"] = json.loads((source.run / "metrics.json").read_text(encoding="utf-8"))
    if gguf:
        if not quants:
            quants = ["q8_0"]
        f16 = out / f"{name}.f16.gguf"
        log(f"gguf: converting with llama.cpp's convert_hf_to_gguf.py -> {f16.name}")
        trimmed = _trimmed_from(Path(source.model)) if Path(source.model).is_dir() else None
        if trimmed is not None:
            log(f"gguf: a trimmed vocabulary: the converter names its pre-tokenizer after {trimmed}'s")
        convert_f16(out, f16, cache, log, trimmed_from=trimmed)
        rows = []
        for q in quants:
            if q == "f16":
                continue
            dst = out / f"{name}.{q}.gguf"
            log(f"gguf: quantizing to {q} with llama.cpp's llama_model_quantize -> {dst.name}")
            quantize(f16, dst, q)
            rows.append((q, dst))
        if "f16" in quants:
            rows.insert(0, ("f16", f16))
        else:
            f16.unlink()
        info["gguf"] = [{"file": p.name, "quant": q, "mb": p.stat().st_size / 2**20, "sha256": sha256_file(p)}
                        for q, p in rows]
        (out / "SHA256SUMS").write_text("".join(f"{g['sha256']}  {g['file']}\n" for g in info["gguf"]), encoding="utf-8")
        rendered = None
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        if getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                               tokenize=False)
        order = {"q8_0": 0, "f16": 1, "q4_k_m": 2}  # the Modelfile's default: the closest to the merged model's answers
        text, fmt = modelfile(min(info["gguf"], key=lambda g: order[g["quant"]])["file"], rendered)
        (out / "Modelfile").write_text(text, encoding="utf-8")
        info["modelfile_template"] = fmt
        if rendered and not fmt:
            log("warning: Modelfile: the chat template's turn format is not one glotkit translates to Ollama's "
                "(gemma, chatml, llama3); the Modelfile has no TEMPLATE")
    (out / "README.md").write_text(model_card(source, info), encoding="utf-8")
    (out / "export.json").write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
    return info
