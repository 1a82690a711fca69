"""Continued pretraining: corpus readers, packing without cross-document attention, held-out
perplexity / bits-per-byte, QLoRA (NF4) adapters, the pretrain task end to end."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from conftest import SHARED, build_model
from glotkit.cli import main
from glotkit.config import LoraSection, ModelSection, TrainSection
from glotkit.data.corpus import pack_documents, read_documents, split_documents, tei_body_text, tokenize_documents
from glotkit.data.prompts import IGNORE
from glotkit.errors import GlotkitError
from glotkit.models.lm import SupervisedLoss
from glotkit.models.lora import apply_lora, save_adapter
from glotkit.train.engine import train

TEI = """<?xml version="1.0" encoding="UTF-8"?>
<TEI xmlns="http://www.tei-c.org/ns/1.0"><teiHeader><fileDesc><titleStmt><title>Titlu din antet</title>
</titleStmt></fileDesc></teiHeader><text><front><p>Prefață</p></front><body><div type="chapter">
<head>CAPITOLUL I</head><p>Vasile  se uită<note>o notă a editorului</note> la câmp.</p>
<p>El zise: <quote><p>Ce frumos!</p></quote> și plecă.</p></div></body></text></TEI>"""


def test_tei_body_only_without_notes(tmp_path):
    f = tmp_path / "n.xml"
    f.write_text(TEI, encoding="utf-8")
    text = tei_body_text(f)
    assert text.splitlines() == ["CAPITOLUL I", "Vasile se uită la câmp.", "El zise: Ce frumos! și plecă."]
    assert "antet" not in text and "notă" not in text and "Prefață" not in text


def test_readers_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("Ţara şi oraşul.", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Primul."}) + "\n" + json.dumps({"text": "Al doilea."}) + "\n",
                                      encoding="utf-8")
    docs = read_documents([tmp_path], language="ro")
    assert [d.text for d in docs] == ["Țara și orașul.", "Primul.", "Al doilea."]
    assert read_documents([tmp_path / "a.txt"], language="tr")[0].text == "Ţara şi oraşul."
    with pytest.raises(GlotkitError, match="corpus file not found"):
        read_documents([tmp_path / "missing.txt"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(GlotkitError, match=r"bad.jsonl: line 1: missing field 'text'"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "latin1.txt").write_bytes("Ţara".encode("cp1250"))
    with pytest.raises(GlotkitError, match="not UTF-8"):
        read_documents([tmp_path / "latin1.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlotkitError, match="no .txt, .jsonl or .xml"):
        read_documents([tmp_path / "empty"])


def test_split_by_document_is_seeded():
    from glotkit.data.corpus import Document

    docs = [Document(str(i), f"text {i}") for i in range(40)]
    a = split_documents(docs, 0.1, seed=3)
    assert [d.id for d in a[1]] == [d.id for d in split_documents(docs, 0.1, seed=3)[1]]
    assert len(a[1]) == 4 and not {d.id for d in a[0]} & {d.id for d in a[1]}


def test_packing_never_attends_across_documents(tmp_path):
    """Each document's loss inside a packed row equals its loss alone."""
    model, tok = build_model(tmp_path, "gemma3")
    model.eval()
    from glotkit.data.corpus import Document

    docs = [Document("a", "Munții Carpați și râul Mureș. " * 3), Document("b", "Sibiu e pe Cibin. " * 4),
            Document("c", "Brașov, Iași, Cluj. " * 2)]
    ids = tokenize_documents(docs, tok)
    rows = pack_documents(ids, block_size=10_000)
    assert len(rows) == 1 and rows[0].n_examples == 3
    # no target ever points across a boundary: the EOS of a document predicts nothing
    r = rows[0]
    for i in range(len(r.input_ids) - 1):
        if r.segments[i] != r.segments[i + 1]:
            assert r.targets[i] == IGNORE and r.input_ids[i] == tok.eos_token_id
    lf = SupervisedLoss(model)
    with torch.no_grad():
        packed, n = lf(lf.collate(rows, tok.pad_token_id))
        alone = [lf(lf.collate(pack_documents([d], 10_000), tok.pad_token_id)) for d in ids]
    assert n == sum(k for _, k in alone)
    assert abs(packed.item() - sum(loss.item() for loss, _ in alone)) < 1e-4 * n
    # and it really matters: with an ordinary causal mask the packed loss differs
    plain = lf.collate(rows, tok.pad_token_id)
    plain["attention_mask"] = torch.ones_like(plain["input_ids"])
    plain.pop("position_ids")
    with torch.no_grad():
        leaky, _ = lf(plain)
    assert abs(leaky.item() - packed.item()) > 1e-3


def test_blocks_split_long_documents(tmp_path):
    rows = pack_documents([list(range(10, 35)), list(range(40, 45))], block_size=8)
    assert [len(r.input_ids) for r in rows] == [8, 8, 8, 6]
    assert rows[-1].segments == [1, 2, 2, 2, 2, 2]  # the tail of doc 1, then doc 2
    assert sum(1 for r in rows for t in r.targets if t != IGNORE) == 25 + 5 - 5  # a piece's last token has none


def test_bits_per_byte_is_nll_over_bytes(tmp_path):
    from glotkit.data.corpus import Document
    from glotkit.eval.perplexity import heldout_scores

    model, tok = build_model(tmp_path, "llama")
    docs = [Document("a", "Sibiu e pe Cibin."), Document("b", "Iași e în Moldova, pe Bahlui.")]
    rows = pack_documents(tokenize_documents(docs, tok), 64)
    n_bytes = sum(len(d.text.encode()) for d in docs)
    r = heldout_scores(model, rows, n_bytes, tok.pad_token_id, progress=False)
    lf = SupervisedLoss(model)
    with torch.no_grad():
        nll, n = lf(lf.collate(rows, tok.pad_token_id))
    assert r["tokens"] == n and r["bytes"] == n_bytes
    assert r["bits_per_byte"] == pytest.approx(nll.item() / math.log(2) / n_bytes, rel=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(nll.item() / n), rel=1e-4)



def test_bits_per_byte_interval_over_rows_and_paired_change(tmp_path):
    from glotkit.data.corpus import Document
    from glotkit.eval.perplexity import heldout_scores, paired_change, with_intervals

    model, tok = build_model(tmp_path, "llama")
    other, _ = build_model(tmp_path / "o", "llama", seed=3, init=0.05)
    docs = [Document(str(i), f"Orașul {w} e pe râul {w[::-1]}, aproape de munte {i}.") for i, w in
            enumerate(["Sibiu", "Iași", "Cluj", "Brașov", "Arad", "Deva", "Alba", "Turda"] * 2)]
    rows = pack_documents(tokenize_documents(docs, tok), 24)
    n_bytes = sum(len(d.text.encode()) for d in docs)
    raw = [len(tok.decode(r.input_ids, skip_special_tokens=True).encode()) for r in rows]
    row_bytes = [b * n_bytes / sum(raw) for b in raw]
    a = with_intervals(heldout_scores(model, rows, n_bytes, tok.pad_token_id, progress=False, per_row=True), row_bytes)
    b = with_intervals(heldout_scores(other, rows, n_bytes, tok.pad_token_id, progress=False, per_row=True), row_bytes)
    whole = heldout_scores(model, rows, n_bytes, tok.pad_token_id, progress=False)
    assert a["bits_per_byte"] == pytest.approx(whole["bits_per_byte"], rel=1e-5)  # one row at a time: the same figure
    for m in (a, b):
        assert m["bits_per_byte_ci"][0] <= m["bits_per_byte"] <= m["bits_per_byte_ci"][1]
        assert m["perplexity_ci"][0] <= m["perplexity"] <= m["perplexity_ci"][1]
    d = paired_change(a, b)["bits_per_byte"]
    assert d["difference"] == pytest.approx(b["bits_per_byte"] - a["bits_per_byte"], abs=1e-4)
    assert paired_change(a, a)["bits_per_byte"]["ci"] == [0.0, 0.0]


def test_nf4_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    from glotkit.models.loading import quantization_config

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("no")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(GlotkitError, match=r"pip install 'glotkit\[quant\]'"):
        quantization_config(ModelSection(quantization="nf4"), torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (extra 'quant')")
def test_qlora_nf4_trains_and_saving_keeps_the_model_intact(tmp_path):
    from glotkit.models.loading import load_model

    build_model(tmp_path / "m", "llama", init=0.2, hidden=64)  # NF4 quantizes in blocks of 64
    model, tok, _ = load_model(ModelSection(name=str(tmp_path / "m"), quantization="nf4"))
    assert any("4bit" in type(m).__name__ for m in model.modules())
    model = apply_lora(model, LoraSection(r=4, alpha=4, target_modules="all-linear", dropout=0.0))
    from glotkit.data.corpus import Document

    rows = pack_documents(tokenize_documents([Document("a", "Sibiu e pe Cibin. " * 6)] * 4, tok), 32)
    res = train(model, rows, TrainSection(batch_size=4, max_steps=6, lr=5e-3, share_prefix=False),
                seed=0, work_dir=tmp_path / "w", pad_id=tok.pad_token_id, progress=False)
    assert res.log[-1]["loss"] < res.log[0]["loss"]
    lf = SupervisedLoss(model)
    model.eval()
    with torch.no_grad():
        before, n = lf(lf.collate(rows, tok.pad_token_id))
        save_adapter(model, tmp_path / "adapter")
        after, _ = lf(lf.collate(rows, tok.pad_token_id))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert abs(before.item() - after.item()) < 1e-4 * n


def test_pretrain_task_end_to_end(tmp_path, tiny_llama, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(f"Documentul {i}: Sibiu e pe Cibin, Iaşi e în Moldova. " * 5, encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "cpt", "task": "pretrain", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_llama)},
        "pretrain": {"corpus": str(corpus), "block_size": 64, "heldout_ratio": 0.2},
        "lora": {"r": 4, "alpha": 4, "target_modules": "all-linear"},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2}}), encoding="utf-8")
    assert main(["run", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "cpt"
    metrics = json.loads((run / "metrics.json").read_text())
    for tag in ("base", "tuned"):
        assert {"perplexity", "bits_per_byte", "nll_per_token", "tokens", "bytes"} <= set(metrics[tag])
    assert metrics["tuned"]["bits_per_byte"] < metrics["base"]["bits_per_byte"]
    report = (run / "report.md").read_text()
    assert "bits per byte" in report and (run / "adapter" / "adapter_config.json").is_file()
    assert "Change in bits per byte, tuned − base: -" in report
    assert metrics["tuned"]["bits_per_byte_ci"][0] <= metrics["tuned"]["bits_per_byte"] <= metrics["tuned"]["bits_per_byte_ci"][1]
    err = capsys.readouterr().err
    assert "held out 2 documents" in err


@pytest.mark.integration
def test_eltec_novels_read():
    folder = SHARED / "data" / "ro-corpus" / "eltec"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (../shared/data is needed for this test)")
    docs = read_documents([folder / "ROM001.xml"], language="ro")
    assert docs[0].text.startswith("CAPITOLUL I. Robul") and len(docs[0].text) > 40_000


def test_4bit_gradients_stay_right_after_an_evaluation_pass(tmp_path):
    """bitsandbytes repacks 4-bit weights for CPU inference after an eval-mode pass (on CPUs with
    AVX512-BF16) and then backpropagates wrongly through them; glotkit's loading prevents it: the
    LoRA gradients of the 4-bit model after an evaluation pass equal those of the same weights
    dequantized to fp32."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'glotkit[quant]')")
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from glotkit.config import ModelSection
    from glotkit.models.loading import load_model

    build_model(tmp_path, "llama", hidden=128, init=0.2)
    q, _, _ = load_model(ModelSection(name=str(tmp_path), quantization="nf4", dtype="float32"), log=lambda m: None)
    f = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        for mq, mf in zip(q.modules(), f.modules()):
            if isinstance(mq, bnb.nn.Linear4bit):
                mf.weight.copy_(bnb.functional.dequantize_4bit(mq.weight.data, mq.weight.quant_state).float())
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights="gaussian")
    torch.manual_seed(0)
    pq = get_peft_model(q, cfg)
    torch.manual_seed(0)
    pf = get_peft_model(f, cfg)
    ids = torch.randint(3, 300, (2, 24))
    pq.eval()
    with torch.no_grad():
        pq(input_ids=ids)  # the evaluation pass before training
    grads = []
    for m in (pq, pf):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    for name, g in grads[1].items():
        assert torch.allclose(grads[0][name], g, rtol=1e-3, atol=1e-5 * g.abs().max().item() + 1e-8), name


def test_heldout_doc_tokens_caps_each_heldout_document(tmp_path, tiny_llama):
    """`pretrain.heldout_doc_tokens`: every held-out document contributes at most that many tokens,
    so one long novel does not take the whole held-out budget; its bytes are those of the kept part."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"d{i}.txt").write_text(f"Documentul {i}: Sibiu e pe Cibin, Iaşi e în Moldova. " * (40 if i % 2 else 2),
                                          encoding="utf-8")

    def held(**extra) -> dict:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(json.dumps({
            "name": f"cpt{len(extra)}", "system": "pretrain", "runs_dir": str(tmp_path / "runs"),
            "model": {"name": str(tiny_llama)}, "stages": ["eval_base"],
            "pretrain": {"corpus": str(corpus), "block_size": 64, "heldout_ratio": 0.5, "max_heldout_tokens": 100,
                         **extra}}), encoding="utf-8")
        assert main(["run", "--no-progress", str(recipe)]) == 0
        return json.loads((tmp_path / "runs" / f"cpt{len(extra)}" / "corpus.json").read_text())

    whole, capped = held(), held(heldout_doc_tokens=12)
    assert capped["heldout_documents"] > whole["heldout_documents"]
    assert capped["heldout_tokens"] <= 12 * capped["heldout_documents"]
    assert 0 < capped["heldout_bytes"] < 12 * 8 * capped["heldout_documents"]
