"""Vocabulary trimming: the trimmed tokenizer reproduces the original ids (mapped) on the corpus,
the trimmed model gives the original logits of the kept tokens, unseen text still round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_model
from glotkit.cli import main
from glotkit.errors import GlotkitError
from glotkit.models.trim_vocab import trim_vocabulary

TEXTS = ["Sibiu e pe Cibin.", "Iași e în Moldova, lângă Prut.", "Dunărea curge spre Marea Neagră."]


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_trim_keeps_tokenization_and_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_model(tmp_path / "m", arch, init=0.2)
    info = trim_vocabulary(tmp_path / "m", TEXTS, tmp_path / "out", log=lambda m: None)
    assert info["vocab_after"] < info["vocab_before"] and info["params_after"] < info["params_before"]
    old_tok, new_tok = AutoTokenizer.from_pretrained(str(tmp_path / "m")), AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    old_ids = json.loads((tmp_path / "out" / "glotkit-trim.json").read_text())["old_ids"]
    new_id = {o: n for n, o in enumerate(old_ids)}
    old_m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    new_m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert new_m.get_input_embeddings().weight.shape[0] == len(old_ids) == new_m.config.vocab_size
    for t in TEXTS:
        a, b = old_tok(t)["input_ids"], new_tok(t)["input_ids"]
        assert [new_id[i] for i in a] == b
        with torch.no_grad():
            la = old_m(input_ids=torch.tensor([a])).logits[0][:, old_ids]
            lb = new_m(input_ids=torch.tensor([b])).logits[0]
        assert torch.allclose(la, lb, atol=1e-5)
    unseen = "Brașov ☃ zăpadă nouă"
    assert new_tok.decode(new_tok(unseen)["input_ids"], skip_special_tokens=True) == unseen


def test_trim_vocab_errors(tmp_path, capsys):
    build_model(tmp_path / "m", "llama")
    with pytest.raises(GlotkitError, match="no text"):
        trim_vocabulary(tmp_path / "m", [], tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(GlotkitError, match="exists and is not empty"):
        trim_vocabulary(tmp_path / "m", TEXTS, tmp_path / "full")
    assert main(["trim-vocab", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_trim_vocab_from_a_pretrain_recipe_leaves_the_heldout_documents_out(tmp_path, capsys):
    """`trim-vocab --recipe`: the vocabulary of the recipe's training documents only (its own seeded
    split), so held-out bits per byte of a run on the trimmed model do not see the held-out text."""
    from glotkit.data.corpus import read_documents, split_documents
    from glotkit.systems import load_recipe
    from glotkit.systems.pretrain import training_texts

    build_model(tmp_path / "m", "llama")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["Sibiu", "Cibin", "Iași", "Prut", "Dunărea", "Brașov", "Suceava", "Mureș"]
    for i, w in enumerate(words):
        (corpus / f"d{i}.txt").write_text(f"{w} e un nume. " * 3, encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "cpt", "system": "pretrain", "seed": 7, "model": {"name": str(tmp_path / "m")},
                                  "pretrain": {"corpus": str(corpus), "heldout_ratio": 0.25}}), encoding="utf-8")
    train_docs, held_docs = split_documents(read_documents([str(corpus)], "text", "ro", True), 0.25, 7)
    texts = training_texts(load_recipe(str(recipe), []), log=lambda m: None)
    assert texts == [d.text for d in train_docs] and len(held_docs) == 2
    assert not any(d.text.split()[0] in t for d in held_docs for t in texts)

    assert main(["trim-vocab", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "glotkit-trim.json").read_text())
    direct = trim_vocabulary(tmp_path / "m", texts, tmp_path / "direct", log=lambda m: None)
    assert info["vocab_after"] == direct["vocab_after"]
    assert "6 training documents (2 held out, not used)" in capsys.readouterr().err
    # one source of text, not two
    assert main(["trim-vocab", "--recipe", str(recipe), "--corpus", str(corpus), "--out", str(tmp_path / "o2")]) == 2
    assert "give --corpus PATH (repeatable) or --recipe YAML, not both" in capsys.readouterr().err
    assert main(["trim-vocab", "--corpus", str(corpus), "--set", "seed=1", "--out", str(tmp_path / "o3")]) == 2
    assert "--set needs --recipe" in capsys.readouterr().err
