"""PEFT's LoRA variants through the recipe's ``lora`` section (DoRA, rsLoRA, the initialisation,
whole modules, token rows): each trains in glotkit's engine, and the saved adapter loads with
plain ``PeftModel.from_pretrained`` on the original base and gives the trained model's logits."""

from __future__ import annotations

import pytest
import torch

from glotkit.config import LoraSection, TrainSection
from glotkit.data.prompts import Encoded
from glotkit.errors import GlotkitError
from glotkit.models.lora import apply_lora
from glotkit.train.engine import train_adapter

VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True, "r": 8, "alpha": 4},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "trainable_tokens": {"trainable_tokens": [5, 17, 42]},
}


def _examples(n: int = 8) -> list[Encoded]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 300, (12,), generator=g).tolist()
        ids[3] = 42  # a trainable token row is read (and so trained)
        out.append(Encoded(ids, [-100] * 4 + ids[4:]))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_reloads_with_peft(tmp_path, tiny_gemma, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = LoraSection(**({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0} | VARIANTS[name]))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, cfg)
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.use_dora == cfg.use_dora and peft_cfg.use_rslora == cfg.use_rslora
    train = TrainSection(lr=5e-3, max_steps=4, batch_size=4, checkpoint_every=100)
    train_adapter(model, _examples(), train, what=name, out=tmp_path / "adapter", work_dir=tmp_path / "work", seed=0,
                  pad_id=0, progress=False, log=lambda m: None)
    ids = torch.tensor([_examples(1)[0].input_ids])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    fresh = AutoModelForCausalLM.from_pretrained(tiny_gemma)
    with torch.no_grad():
        before = fresh(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        again = loaded(input_ids=ids).logits
    assert not torch.allclose(trained, before, atol=1e-4), "training changed nothing"
    torch.testing.assert_close(again, trained, atol=2e-4, rtol=1e-4)
    if cfg.changes_base():  # converted to plain LoRA of rank 2r for the original base
        assert loaded.peft_config["default"].r == 2 * cfg.r
        # ... while the trained model's base holds the residual (why the runner reloads the base)
        residual = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items()}
        assert not torch.equal(residual["model.layers.0.self_attn.q_proj.weight"],
                               original["model.layers.0.self_attn.q_proj.weight"])
    if name == "trainable_tokens":
        emb = loaded.get_input_embeddings()
        weight = emb.weight if hasattr(emb, "weight") else emb.token_adapter.base_layer.weight
        assert weight.shape[0] > 42


def test_variant_settings_are_checked(tiny_gemma):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gemma)
    with pytest.raises(GlotkitError, match="modules_to_save: this model has no module 'score'"):
        apply_lora(base, LoraSection(modules_to_save=["score"]))
    with pytest.raises(GlotkitError, match="trainable_tokens: id 99999 is outside the vocabulary"):
        apply_lora(base, LoraSection(trainable_tokens=[99999]))
    with pytest.raises(Exception, match="init"):
        LoraSection(init="loftq")
