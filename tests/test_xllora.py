"""XL-LoRA: pair/anchor readers, the shared prompt, filters, synthesis resume, MNRL = InfoNCE,
embedding training and evaluation metrics, and the recipe end to end on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_model
from glotkit.cli import main
from glotkit.data.pairs import read_anchors, read_pairs
from glotkit.errors import GlotkitError
from glotkit.eval.embeddings import retrieval_scores, sts_spearman
from glotkit.models.encoders import load_encoder
from glotkit.synth.triplets import (
    FilterConfig,
    SynthConfig,
    build_triplets,
    encode_pairs,
    first_failure,
    generate_pairs,
    guess_language,
    local_generators,
    pair_prompt,
)
from glotkit.train.embeddings import train_embeddings

SENTS = ["Sibiu este un oraș frumos.", "Dunărea se varsă în mare.", "Eminescu a scris poezii.", "Iașiul are o universitate.",
         "Brașovul este lângă munți.", "Clujul are mulți studenți.", "Marea Neagră este la est.", "Timișoara e în vest."]


def test_readers_and_their_errors(tmp_path):
    f = tmp_path / "pos.csv"
    f.write_text("sent0,sent1\nA b c,D e f\n,x\nG h,I j\n", encoding="utf-8")
    assert read_pairs(f, "sent0", "sent1", where="pairs.positive") == [("A b c", "D e f"), ("G h", "I j")]
    with pytest.raises(GlotkitError, match="pos.csv: pairs.negative: no column 'hard_neg' \\(columns: sent0, sent1\\)"):
        read_pairs(f, "sent0", "hard_neg", where="pairs.negative")
    a = tmp_path / "anchors.txt"
    a.write_text("Unu doi.\n\n  Unu   doi. \nTrei.\n", encoding="utf-8")
    anchors, stats = read_anchors(a)
    assert anchors == ["Unu doi.", "Trei."] and stats == {"lines": 4, "empty_or_short": 1, "duplicate_anchors": 1}
    a.write_text("\n \n", encoding="utf-8")
    with pytest.raises(GlotkitError, match="anchors.txt: anchors: no usable lines"):
        read_anchors(a)
    for bad in (dict(copy_ratio=1.5), dict(min_chars=50, max_chars=10), dict(reference_margin=3.0), dict(language="xx")):
        with pytest.raises(GlotkitError, match="synth\\."):
            FilterConfig(**bad)


def test_one_prompt_for_training_and_generation(tmp_path):
    _, tok = build_model(tmp_path, "llama")
    (ex,), dropped = encode_pairs([("Sibiu e pe Cibin.", "Sibiu is on the Cibin.")], "positive", "English", tok, 512)
    prompt = tok(pair_prompt("positive", "Sibiu e pe Cibin.", "English"))["input_ids"]
    assert ex.input_ids[: len(prompt)] == prompt and all(x == -100 for x in ex.labels[: len(prompt)])
    assert ex.labels[len(prompt):] == ex.input_ids[len(prompt):] and ex.input_ids[-1] == tok.eos_token_id
    assert dropped == 0 and encode_pairs([("a " * 300, "b")], "negative", "English", tok, 64)[1] == 1
    negative = pair_prompt("negative", "x", "Romanian")
    assert "contradicts" in negative and "Romanian sentence:" in negative


def test_filters_and_language_check():
    cfg = FilterConfig(min_chars=5, max_chars=60, language="en")
    assert first_failure("Sibiu is nice.", "", cfg) == "empty"
    assert first_failure("Sibiu is a nice city.", "sibiu is a nice city", cfg) == "copy_of_anchor"
    assert first_failure("Sibiu is a nice city.", "Ok.", cfg) == "too_short"
    assert first_failure("Sibiu is a nice city.", "x" * 61, cfg) == "too_long"
    assert first_failure("Sibiu is a nice city.", "Orașul este foarte frumos și are o cetate.", cfg) == "wrong_language"
    assert first_failure("Sibiu is a nice city.", "The town is pleasant and it has a fortress.", cfg) is None
    assert guess_language("Der Hund ist nicht in dem Haus und die Katze auch.")[0] == "de"
    assert guess_language("Acesta este un oraș frumos și are multe case.")[0] == "ro"
    assert guess_language("Hi")[0] is None


def _two_adapters(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = build_model(tmp_path / "m", "llama", init=0.2)
    for i, kind in enumerate(("positive", "negative")):
        torch.manual_seed(i)
        pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        pm.save_pretrained(tmp_path / kind)
        model = pm.unload()
    pm = PeftModel.from_pretrained(model, str(tmp_path / "positive"), adapter_name="positive")
    pm.load_adapter(str(tmp_path / "negative"), adapter_name="negative")
    return pm, tok


def test_synthesis_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    import glotkit.generate.local as local

    model, tok = _two_adapters(tmp_path)
    cfg = SynthConfig(max_new_tokens=6, batch_size=3, temperature=0.8, seed=1)
    full = tmp_path / "full"
    generate_pairs(local_generators(model, tok), SENTS, cfg, full, progress=False, log=lambda m: None)
    want = [json.loads(s) for s in (full / "generations.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["kind"]) for r in want) == sorted((i, k) for i in range(8) for k in ("positive", "negative"))
    # the two adapters really differ (switching adapters changes the output)
    by = {(r["id"], r["kind"]): r["raw"] for r in want}
    assert any(by[(i, "positive")] != by[(i, "negative")] for i in range(8))

    real = local.generate_sampled

    def generators():  # batches of cfg.batch_size prompts (not a token budget), so the kill comes after 3
        gens = local_generators(model, tok)
        for g in gens.values():
            g.batch_tokens = 0
        return gens

    def dies_after_one_batch(*a, on_batch=None, **k):
        def cb(idx, texts):
            on_batch(idx, texts)
            raise KeyboardInterrupt

        return real(*a, on_batch=cb, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(local, "generate_sampled", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_pairs(generators(), SENTS, cfg, part, progress=False, log=lambda m: None)
    monkeypatch.setattr(local, "generate_sampled", real)
    first = (part / "generations.jsonl").read_text()
    assert first.count("\n") == 3
    with (part / "generations.jsonl").open("a") as fh:
        fh.write('{"id": 5, "kind": "posi')  # a kill in the middle of a write
    generate_pairs(local_generators(model, tok), SENTS, cfg, part, progress=False, log=lambda m: None)
    got = [json.loads(s) for s in (part / "generations.jsonl").read_text().splitlines()]
    keys = [(r["id"], r["kind"]) for r in got]
    assert len(keys) == len(set(keys)) == 16 and set(keys) == {(r["id"], r["kind"]) for r in want}
    assert (part / "generations.jsonl").read_text().startswith(first)
    summary = build_triplets(part, SENTS, FilterConfig(min_chars=0, max_chars=1000), {"lines": 8})
    assert summary["triplets"] + sum(summary["filtered"].values()) == 8


def test_mnrl_equals_infonce_with_hard_negatives(tiny_encoder):
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    model = load_encoder(str(tiny_encoder), max_seq_length=32)
    a, p, n = SENTS[:4], SENTS[4:], [s.upper() for s in SENTS[:4]]
    loss = MultipleNegativesRankingLoss(model, scale=20.0)
    feats = [model.tokenize(x) for x in (a, p, n)]
    got = loss(feats, torch.zeros(4)).item()
    with torch.no_grad():
        ea, ep, en = (model(dict(f))["sentence_embedding"] for f in feats)
    ea, cand = torch.nn.functional.normalize(ea, dim=-1), torch.nn.functional.normalize(torch.cat([ep, en]), dim=-1)
    logits = 20.0 * ea @ cand.T  # each anchor against all positives and all hard negatives
    want = torch.nn.functional.cross_entropy(logits, torch.arange(4)).item()
    assert got == pytest.approx(want, rel=1e-4)


def test_tiny_encoder_trains_and_its_loss_falls(tmp_path, tiny_encoder):
    model = load_encoder(str(tiny_encoder), pooling="avg_first_last", max_seq_length=32)
    triplets = [{"anchor": f"{s} ({j})", "positive": f"{s.lower()} da {j}", "hard_negative": f"{SENTS[(i + 1) % 8]} nu {j}"}
                for j in range(4) for i, s in enumerate(SENTS)]
    r = train_embeddings(model, triplets, tmp_path / "model", epochs=6, batch_size=8, lr=5e-3, warmup_ratio=0.0,
                         progress=False, log=lambda m: None)
    losses = [h["loss"] for h in r.log]
    assert r.steps == 24 and np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    from sentence_transformers import SentenceTransformer

    again = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    e1, e2 = model.encode(SENTS[:2]), again.encode(SENTS[:2])
    assert np.allclose(e1, e2, atol=1e-5)


def test_encoder_errors(tmp_path):
    with pytest.raises(GlotkitError, match="not an embedding model folder"):
        load_encoder(str(tmp_path))
    with pytest.raises(GlotkitError, match="unknown pooling 'max'"):
        load_encoder(str(tmp_path), pooling="max")


def test_retrieval_and_sts_metrics_against_references():
    from scipy.stats import spearmanr
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(0)
    q = rng.normal(size=(30, 8))
    d = q + rng.normal(scale=1.2, size=(30, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    r = retrieval_scores(q, d)
    sims = q @ d.T
    ranks = 1 + (sims > np.diag(sims)[:, None]).sum(1)
    assert r["accuracy@1"] == pytest.approx(100 * np.mean(np.argmax(sims, 1) == np.arange(30)), abs=0.01)
    assert r["ndcg@10"] == pytest.approx(100 * ndcg_score(np.eye(30), sims, k=10), abs=0.01)
    assert r["mrr@10"] == pytest.approx(100 * np.mean([1 / k if k <= 10 else 0 for k in ranks]), abs=0.01)
    scores = rng.uniform(0, 5, 30)
    assert sts_spearman(q, d, scores)["spearman"] == pytest.approx(100 * spearmanr((q * d).sum(1), scores)[0], abs=0.01)



def test_embedding_scores_have_intervals_and_paired_changes():
    from glotkit.eval.embeddings import comparison_table, paired_changes

    rng = np.random.default_rng(1)
    q = rng.normal(size=(60, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    def docs(noise):
        d = q + rng.normal(scale=noise, size=q.shape)
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    weak, strong = retrieval_scores(q, docs(2.0)), retrieval_scores(q, docs(0.3))
    for r in (weak, strong):
        for m in ("accuracy@1", "mrr@10", "ndcg@10", "recall@10"):
            assert r[m + "_ci"][0] <= r[m] <= r[m + "_ci"][1]
        assert len(r["items"]["ranks"]) == 60
    change = paired_changes(weak, strong)["accuracy@1"]
    assert change["difference"] == pytest.approx(strong["accuracy@1"] - weak["accuracy@1"], abs=0.01)
    assert change["significant"] and change["ci"][0] > 0
    assert paired_changes(weak, weak)["mrr@10"] == {"difference": 0.0, "ci": [0.0, 0.0], "significant": False}
    scores = rng.uniform(0, 5, 60)
    sts = sts_spearman(q, docs(0.5), scores)
    assert sts["spearman_ci"][0] <= sts["spearman"] <= sts["spearman_ci"][1]
    table = comparison_table({"base": {"ro→en": weak, "sts": sts}, "trained": {"ro→en": strong, "sts": sts}})
    assert "| ro→en | accuracy@1 | " in table and " *" in table and "+0.00 [+0.00, +0.00] |" in table


def test_xllora_recipe_end_to_end(tmp_path, tiny_llama, tiny_encoder, capsys):
    pos, neg = tmp_path / "pos.csv", tmp_path / "neg.csv"
    pos.write_text("sent0,sent1\n" + "".join(f"\"{s}\",The city {i} is nice.\n" for i, s in enumerate(SENTS)), encoding="utf-8")
    neg.write_text("sent0,hard_neg\n" + "".join(f"\"{s}\",The city {i} is not there.\n" for i, s in enumerate(SENTS)),
                   encoding="utf-8")
    anchors = tmp_path / "anchors.txt"
    anchors.write_text("\n".join(SENTS + SENTS[:2]) + "\n", encoding="utf-8")
    sts = tmp_path / "sts.tsv"
    sts.write_text("".join(f"{i % 6}.0\t{SENTS[i]}\t{SENTS[(i + i % 3) % 8]}\n" for i in range(8)), encoding="utf-8")
    (tmp_path / "p.ro").write_text("\n".join(SENTS) + "\n", encoding="utf-8")
    (tmp_path / "p.en").write_text("\n".join(f"City {i} sentence." for i in range(8)) + "\n", encoding="utf-8")
    recipe = tmp_path / "x.yaml"
    recipe.write_text(json.dumps({
        "name": "xl", "task": "xllora", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_llama)},
        "pairs": {"positive": str(pos), "negative": str(neg)},
        "lora": {"r": 2, "alpha": 4, "target_modules": "all-linear"},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 2e-4, "scheduler": "constant", "report_to": ["tensorboard"]},
        "synth": {"anchors": str(anchors), "max_new_tokens": 8, "batch_size": 4, "min_chars": 0, "max_chars": 1000,
                  "copy_ratio": 1.0, "language_check": None, "reference_margin": None, "baseline_anchors": 2},
        "embed": {"model": str(tiny_encoder), "batch_size": 4, "epochs": 1, "prompt": None, "sts": str(sts),
                  "parallel": [{"name": "ro-en", "source": str(tmp_path / "p.ro"), "target": str(tmp_path / "p.en")},
                               {"name": "ro-enpairs", "file": str(pos)}]},
    }), encoding="utf-8")
    assert main(["run", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "xl"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tracking" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])  # both generators' steps, and the system's headline figures
    assert {"train/positive/loss", "train/negative/loss"} <= tags and any(t.startswith("summary/") for t in tags)
    summary = json.loads((run / "synth" / "summary.json").read_text())
    assert summary["duplicate_anchors"] == 2 and summary["anchors"] == 8
    assert summary["speed"]["one_at_a_time"]["prompts"] == 2 and summary["speed"]["ratio"] > 0
    report = (run / "report.md").read_text()
    for part in ("## Generator adapters", "## Synthesis", "duplicates dropped", "## Sentence embeddings before and after",
                 "| sts | spearman |", "| ro→en | accuracy@1 |", "| en→ro | ndcg@10 |", "| ro→enpairs | mrr@10 |"):
        assert part in report, part
    capsys.readouterr()
    assert main(["run", "--no-progress", str(recipe)]) == 0  # all done: nothing is redone
    err = capsys.readouterr().err
    assert "generator '" not in err and "synthesis:" not in err and "embedding training" not in err
    # a filter change re-filters the same generations; a sampling change starts synthesis again
    # (the old folder kept); an embedding change redoes only the embedding; generators stay
    assert main(["run", "--no-progress", str(recipe), "--set", "synth.min_chars=5"]) == 0
    err = capsys.readouterr().err
    assert "continuing on the existing generations" in err and "generator '" not in err
    assert main(["run", "--no-progress", str(recipe), "--set", "synth.temperature=0.9"]) == 0
    err = capsys.readouterr().err
    assert (run / "synth.previous-1" / "generations.jsonl").is_file() and "moved to" in err
    assert main(["run", "--no-progress", str(recipe), "--set", "synth.temperature=0.9", "--set", "embed.epochs=2"]) == 0
    err = capsys.readouterr().err
    assert "synthesis:" not in err and "embedding training" in err and any(run.glob("embed.previous-*"))
    # a sweep over an XL-LoRA recipe tabulates its system's figures (STS, retrieval)
    import csv

    assert main(["sweep", "--no-progress", str(recipe), "--grid", "embed.epochs=1,2"]) == 0
    table = list(csv.DictReader((tmp_path / "runs" / "xl-sweep" / "sweep.csv").open()))
    assert [(r["embed.epochs"], r["status"]) for r in table] == [("1", "ok"), ("2", "ok")]
    assert all(r["sts.spearman"] and r["base_sts.spearman"] and r["ro→en.accuracy@1"] for r in table)


def test_xllora_bad_input(tmp_path, tiny_llama, capsys):
    pos = tmp_path / "pos.csv"
    pos.write_text("anchor,positive\na,b\n", encoding="utf-8")
    recipe = tmp_path / "x.yaml"
    recipe.write_text(json.dumps({"name": "xl", "task": "xllora", "runs_dir": str(tmp_path / "runs"),
                                  "model": {"name": str(tiny_llama)}, "pairs": {"positive": str(pos), "negative": str(pos)}}))
    assert main(["train", str(recipe)]) == 2
    assert "pos.csv: pairs.positive: no column 'sent0' (columns: anchor, positive)" in capsys.readouterr().err
    assert main(["synth", "triplets", str(recipe), "--set", "synth.reference_margin=5"]) == 2
    assert "synth.reference_margin=5.0: must be in [-2, 2]" in capsys.readouterr().err
    assert main(["embed", str(recipe), "--set", f"embed.model={tmp_path}"]) == 2
    assert "not an embedding model folder" in capsys.readouterr().err


def test_cached_mnrl_equals_mnrl(tiny_encoder):
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    model = load_encoder(str(tiny_encoder), max_seq_length=32)
    feats = [model.tokenize(x) for x in (SENTS[:4], SENTS[4:], [s.upper() for s in SENTS[:4]])]
    plain = MultipleNegativesRankingLoss(model, scale=20.0)(feats, torch.zeros(4)).item()
    cached = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=2)(feats, torch.zeros(4)).item()
    assert cached == pytest.approx(plain, rel=1e-4)


def test_synthesis_killed_with_sigkill_resumes(tmp_path, tiny_llama):
    """The real command killed mid-run (SIGKILL) and run again: every (anchor, kind) once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pos = tmp_path / "pos.csv"
    pos.write_text("sent0,sent1,hard_neg\n" + "".join(f"\"{s}\",City {i}.,No city {i}.\n" for i, s in enumerate(SENTS)),
                   encoding="utf-8")
    anchors = tmp_path / "anchors.txt"
    anchors.write_text("\n".join(f"{SENTS[i % 8]} {i}" for i in range(400)) + "\n", encoding="utf-8")
    recipe = tmp_path / "x.yaml"
    recipe.write_text(json.dumps({
        "name": "xl", "task": "xllora", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_llama)},
        "pairs": {"positive": str(pos), "negative": str(pos)}, "lora": {"r": 2, "target_modules": ["q_proj"]},
        "train": {"max_steps": 1, "batch_size": 4},
        "synth": {"anchors": str(anchors), "max_new_tokens": 16, "batch_size": 1, "language_check": None,
                  "reference_margin": None, "baseline_anchors": 0, "min_chars": 0}}), encoding="utf-8")
    assert main(["train", "--no-progress", str(recipe)]) == 0
    gens = tmp_path / "runs" / "xl" / "synth" / "generations.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "glotkit", "synth", "triplets", "--no-progress", str(recipe)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if gens.is_file() and gens.read_bytes().count(b"\n") >= 20:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the synthesis finished before it could be killed")
    written = gens.read_bytes().count(b"\n")
    assert 20 <= written < 800
    assert main(["synth", "triplets", "--no-progress", str(recipe)]) == 0
    keys = [(r["id"], r["kind"]) for r in map(json.loads, gens.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 800


def test_row_triplets_of_the_pair_files(tmp_path):
    from glotkit.data.pairs import read_row_triplets
    from glotkit.errors import GlotkitError

    pos, neg = tmp_path / "pos.csv", tmp_path / "neg.csv"
    pos.write_text("sent0,sent1\n" + "".join(f"a{i},p{i}\n" for i in range(10)) + ",empty\n", encoding="utf-8")
    neg.write_text("sent0,hard_neg\n" + "".join(f"x{i},n{i}\n" for i in range(10)) + "y,n10\n", encoding="utf-8")
    got = read_row_triplets(pos, neg, "sent0", "sent1", "hard_neg", where="embed.mix_pairs", limit=4, seed=1)
    assert len(got) == 4 and all(t["positive"][1:] == t["hard_negative"][1:] == t["anchor"][1:] for t in got)
    assert got == read_row_triplets(pos, neg, "sent0", "sent1", "hard_neg", where="embed.mix_pairs", limit=4, seed=1)
    assert len(read_row_triplets(pos, neg, "sent0", "sent1", "hard_neg", where="w", limit=100)) == 10  # empty row dropped
    neg.write_text("sent0,hard_neg\nx,n\n", encoding="utf-8")
    with pytest.raises(GlotkitError, match="not row-aligned"):
        read_row_triplets(pos, neg, "sent0", "sent1", "hard_neg", where="embed.mix_pairs", limit=4)
