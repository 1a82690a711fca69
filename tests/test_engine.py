"""The training engine: exact loss, batching plan, resume, prompt encoding."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model
from glotkit.config import LoraSection, PromptSection, TrainSection
from glotkit.data.prompts import IGNORE, EncodeStats, PromptFormatter
from glotkit.data.qa import QAExample
from glotkit.models.lm import SupervisedLoss, collate, reference_loss_sum
from glotkit.models.lora import apply_lora
from glotkit.train.engine import epoch_batches, plan_steps, train


def _examples(n=12):
    return [QAExample(f"e{i}", f"Context număr {i}: Sibiu este pe râul Cibin." + " x" * (i % 5),
                      f"Întrebarea {i}?", [f"Cibin {i}"]) for i in range(n)]


def _encoded(tok, n=12, max_length=128):
    fmt = PromptFormatter(PromptSection(), tok)
    stats = EncodeStats()
    return [fmt.encode_train(ex, max_length, "drop", stats) for ex in _examples(n)]


def _active_lora(model):
    """LoRA r=4 on every linear layer with B drawn at random (not zero), so the adapter matters."""
    model = apply_lora(model, LoraSection(r=4, target_modules="all-linear", dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_fast_loss_equals_full_logits_reference(tmp_path, arch):
    model, tok = build_model(tmp_path, arch)
    model = _active_lora(model)
    batch = collate(_encoded(tok, 5), tok.pad_token_id)
    assert (batch["labels"] != IGNORE).sum() > 0
    model.eval()
    fast, n_fast = SupervisedLoss(model)(batch)
    ref, n_ref = reference_loss_sum(model, batch)
    assert n_fast == n_ref
    assert abs(fast.item() / n_fast - ref.item() / n_ref) < 1e-5
    # and the gradients agree too
    model.zero_grad()
    (SupervisedLoss(model)(batch)[0] / n_fast).backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    (reference_loss_sum(model, batch)[0] / n_ref).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_fast[n], p.grad, rtol=1e-4, atol=1e-6)


def test_softcapping_is_applied(tmp_path):
    model, tok = build_model(tmp_path, "gemma3")
    assert SupervisedLoss(model).cap == 30.0


def test_labels_only_on_target(tmp_path):
    _, tok = build_model(tmp_path, "llama")
    fmt = PromptFormatter(PromptSection(), tok)
    ex = _examples(1)[0]
    enc = fmt.encode_train(ex, 256, "drop", EncodeStats())
    prompt = fmt.prompt_ids(ex)
    assert enc.input_ids[: len(prompt)] == prompt
    assert all(x == IGNORE for x in enc.labels[: len(prompt)])
    assert tok.decode(enc.input_ids[len(prompt):]) == " Cibin 0\n"
    assert enc.input_ids[0] == tok.bos_token_id


def test_too_long_drop_and_truncate_counts(tmp_path):
    _, tok = build_model(tmp_path, "llama")
    fmt = PromptFormatter(PromptSection(), tok)
    long_ctx = "Munții Carpați sunt frumoși. " * 40 + "Sibiu este pe râul Cibin. " + "Brașov și Iași. " * 40
    exs = [QAExample("long", long_ctx, "Pe ce râu?", ["Cibin"])] + _examples(3)
    stats = EncodeStats()
    kept = [fmt.encode_train(e, 120, "drop", stats) for e in exs]
    assert kept[0] is None and stats.dropped == 1 and stats.kept == 3
    assert "1 were dropped" in stats.line(120)
    stats = EncodeStats()
    enc = fmt.encode_train(exs[0], 120, "truncate_context", stats)
    assert enc is not None and len(enc.input_ids) <= 120 and stats.truncated == 1
    assert "Cibin" in tok.decode(enc.input_ids)  # the window keeps the answer


def test_batches_are_deterministic_and_cover_everything():
    lengths = [5, 50, 7, 33, 2, 90, 14, 8, 61, 3]
    a = epoch_batches(lengths, 3, seed=1, epoch=0, group_by_length=True)
    assert a == epoch_batches(lengths, 3, seed=1, epoch=0, group_by_length=True)
    assert a != epoch_batches(lengths, 3, seed=1, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert 5 in a[0]  # the longest example's batch comes first
    steps = plan_steps(lengths, TrainSection(batch_size=3, grad_accum=2, epochs=2.0), seed=1)
    assert len(steps) == 4  # ceil(ceil(10/3)/2) = 2 per epoch
    assert len(plan_steps(lengths, TrainSection(batch_size=3, max_steps=7), seed=1)) == 7


def test_grad_accumulation_weights_every_token_equally(tmp_path):
    """One step of batch 4 equals one step of batch 2 × accumulation 2 (same examples, same order)."""
    results = []
    for bs, acc in ((4, 1), (2, 2)):
        model, tok = build_model(tmp_path / f"{bs}", "llama", seed=0)
        model = apply_lora(model, LoraSection(r=4, dropout=0.0))
        enc = _encoded(tok, 4)
        cfg = TrainSection(batch_size=bs, grad_accum=acc, max_steps=1, lr=1e-2, group_by_length=False)
        train(model, enc, cfg, seed=3, work_dir=tmp_path / f"w{bs}", pad_id=tok.pad_token_id, progress=False)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-4, atol=1e-6)


def test_resume_matches_uninterrupted(tmp_path):
    cfg = TrainSection(batch_size=2, grad_accum=2, max_steps=6, lr=5e-3, checkpoint_every=2, warmup_ratio=0.2)

    def fresh():
        model, tok = build_model(tmp_path / "m", "gemma3", seed=0)
        torch.manual_seed(0)
        return apply_lora(model, LoraSection(r=4, dropout=0.1)), tok  # dropout: RNG state must resume too

    model, tok = fresh()
    enc = _encoded(tok, 10)
    full = train(model, enc, cfg, seed=7, work_dir=tmp_path / "a", pad_id=tok.pad_token_id, progress=False)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model, tok = fresh()
    part = train(model, enc, cfg, seed=7, work_dir=tmp_path / "b", pad_id=tok.pad_token_id, progress=False, stop_after=3)
    assert part.steps == 3 and (tmp_path / "b" / "checkpoint.pt").is_file()
    model, tok = fresh()  # a new process would start from the base weights again
    rest = train(model, enc, cfg, seed=7, work_dir=tmp_path / "b", pad_id=tok.pad_token_id, progress=False)
    assert rest.steps == 6
    assert [h["loss"] for h in rest.log] == pytest.approx([h["loss"] for h in full.log], abs=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-6)



def test_on_epoch_runs_at_each_epoch_end_and_again_after_an_interrupted_evaluation(tmp_path):
    cfg = TrainSection(batch_size=2, epochs=3.0, lr=5e-3, checkpoint_every=100, warmup_ratio=0.0)
    model, tok = build_model(tmp_path / "m", "gemma3", seed=0)
    model = apply_lora(model, LoraSection(r=4, dropout=0.0))
    enc = _encoded(tok, 6)  # 3 steps an epoch
    seen = []

    def hook(epoch, step):
        seen.append((epoch, step, model.training, (tmp_path / "a" / "checkpoint.pt").is_file()))

    full = train(model, enc, cfg, seed=7, work_dir=tmp_path / "a", pad_id=tok.pad_token_id, progress=False,
                 on_epoch=hook)
    assert [s[:2] for s in seen] == [(1, 3), (2, 6), (3, 9)] and full.steps == 9
    assert not any(s[2] for s in seen) and all(s[3] for s in seen) and model.training  # eval mode, checkpoint first

    class Killed(Exception):
        pass

    def dies_at_epoch_2(epoch, step):
        seen.append((epoch, step))
        if epoch == 2:
            raise Killed

    model, tok = build_model(tmp_path / "m", "gemma3", seed=0)
    model = apply_lora(model, LoraSection(r=4, dropout=0.0))
    seen.clear()
    with pytest.raises(Killed):
        train(model, enc, cfg, seed=7, work_dir=tmp_path / "b", pad_id=tok.pad_token_id, progress=False,
              on_epoch=dies_at_epoch_2)
    model, tok = build_model(tmp_path / "m", "gemma3", seed=0)
    model = apply_lora(model, LoraSection(r=4, dropout=0.0))
    rest = train(model, enc, cfg, seed=7, work_dir=tmp_path / "b", pad_id=tok.pad_token_id, progress=False,
                 on_epoch=lambda e, s: seen.append((e, s)))
    # the evaluation of epoch 2 is asked again, its training is not redone
    assert seen == [(1, 3), (2, 6), (2, 6), (3, 9)] and [h["step"] for h in rest.log] == list(range(1, 10))
    assert [h["loss"] for h in rest.log] == pytest.approx([h["loss"] for h in full.log], abs=1e-6)

def test_loss_falls_on_tiny_model(tmp_path):
    # a wider initialisation: with std 0.02 a 32-wide random model cannot make peaked logits at all
    model, tok = build_model(tmp_path, "llama", init=0.2)
    model = apply_lora(model, LoraSection(r=8, target_modules="all-linear", dropout=0.0))
    enc = _encoded(tok, 4)
    res = train(model, enc, TrainSection(batch_size=4, max_steps=40, lr=5e-2, scheduler="constant"), seed=0,
                work_dir=tmp_path / "w", pad_id=tok.pad_token_id, progress=False)
    assert res.log[-1]["loss"] < 0.6 * res.log[0]["loss"], [h["loss"] for h in res.log]
    assert res.fast_loss and res.tokens > 0 and res.memory["peak_rss_mb"] > 0


def test_split_by_tokens():
    from glotkit.models.lm import split_by_tokens

    lengths = [100, 30, 60, 200, 10]
    chunks = split_by_tokens([0, 1, 2, 3, 4], lengths, 250)
    assert sorted(i for c in chunks for i in c) == [0, 1, 2, 3, 4]
    assert all(max(lengths[i] for i in c) * len(c) <= 250 or len(c) == 1 for c in chunks)
    assert split_by_tokens([0, 1], lengths, None) == [[0, 1]]


def test_token_budget_gives_the_same_step(tmp_path):
    """Splitting a batch into several forward passes changes memory, not the result."""
    results = []
    for budget in (None, 40):
        model, tok = build_model(tmp_path / f"{budget}", "llama", seed=0)
        model = apply_lora(model, LoraSection(r=4, dropout=0.0))
        enc = _encoded(tok, 6)
        cfg = TrainSection(batch_size=6, max_steps=2, lr=1e-2, max_tokens_per_forward=budget)
        res = train(model, enc, cfg, seed=3, work_dir=tmp_path / f"w{budget}", pad_id=tok.pad_token_id, progress=False)
        results.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, res))
    assert max(len(e.input_ids) for e in enc) * 6 > 40  # the budget really splits
    for n in results[0][0]:
        torch.testing.assert_close(results[0][0][n], results[1][0][n], rtol=1e-4, atol=1e-6)
    assert [h["loss"] for h in results[0][1].log] == pytest.approx([h["loss"] for h in results[1][1].log], abs=1e-5)


def _same_context_examples(n_contexts=2, per_context=3):
    out = []
    for c in range(n_contexts):
        ctx = f"Textul {c}: " + "Munții Carpați, râul Mureș și orașul Sibiu din Transilvania. " * 3
        for q in range(per_context):
            out.append(QAExample(f"c{c}q{q}", ctx, f"Întrebarea {q} despre {c}?" + " de ce" * q, [f"Sibiu {q}"]))
    return out


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_shared_prefix_rows_equal_separate_examples(tmp_path, arch):
    from glotkit.models.lm import build_rows

    model, tok = build_model(tmp_path, arch)
    model = _active_lora(model)
    fmt = PromptFormatter(PromptSection(), tok)
    enc = [fmt.encode_train(e, 512, "drop", EncodeStats()) for e in _same_context_examples()]
    rows = build_rows(enc, share_prefix=True)
    assert len(rows) == 2 and all(r.n_examples == 3 for r in rows)
    assert sum(len(r.input_ids) for r in rows) < 0.6 * sum(len(e.input_ids) for e in enc)
    if arch == "gemma3":  # rows longer than the tiny model's sliding window exercise that mask too
        assert max(len(r.input_ids) for r in rows) > 2 * model.config.sliding_window
    loss_fn = SupervisedLoss(model)
    model.eval()
    packed = loss_fn.collate(rows, tok.pad_token_id)
    assert "position_ids" in packed
    sep = collate(enc, tok.pad_token_id)
    l1, n1 = loss_fn(packed)
    l2, n2 = loss_fn(sep)
    ref, n3 = reference_loss_sum(model, sep)
    assert n1 == n2 == n3
    assert abs(l1.item() - ref.item()) / n1 < 1e-5 and abs(l2.item() - ref.item()) / n1 < 1e-5
    model.zero_grad()
    (loss_fn(packed)[0] / n1).backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    (loss_fn(sep)[0] / n2).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g1[n], p.grad, rtol=1e-4, atol=1e-6)
    assert loss_fn.check_sharing(enc, tok.pad_token_id)


def test_shared_prefix_training_step_equals_plain(tmp_path):
    """One step over the same batch with and without prefix sharing gives the same adapter."""
    results = []
    for share in (False, True):
        model, tok = build_model(tmp_path / f"{share}", "gemma3", seed=0)
        model = apply_lora(model, LoraSection(r=4, dropout=0.0))
        fmt = PromptFormatter(PromptSection(), tok)
        enc = [fmt.encode_train(e, 512, "drop", EncodeStats()) for e in _same_context_examples()]
        cfg = TrainSection(batch_size=6, max_steps=2, lr=1e-2, share_prefix=share, max_tokens_per_forward=None)
        res = train(model, enc, cfg, seed=1, work_dir=tmp_path / f"w{share}", pad_id=tok.pad_token_id, progress=False)
        assert res.shared_prefix == share
        results.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, res))
    assert results[1][1].computed_tokens < 0.6 * results[0][1].computed_tokens
    assert results[1][1].tokens == results[0][1].tokens
    for n in results[0][0]:
        torch.testing.assert_close(results[0][0][n], results[1][0][n], rtol=1e-4, atol=1e-6)


def test_shared_prefix_rows_rebuild_every_example_in_any_order():
    """Each segment plus the shared prefix is exactly the example, at its own positions, whatever
    the order of the examples (the common prefix is the minimum over the whole group)."""
    import random

    from glotkit.data.prompts import Encoded
    from glotkit.models.lm import build_rows

    rng = random.Random(0)
    system = list(range(100, 120))  # a shared 20-token "system prompt", as chat templates make
    exs = []
    for c in range(3):
        ctx = [200 + c] * 15 + [rng.randrange(300, 400) for _ in range(10)]
        for q in range(4):
            prompt = system + ctx + [500 + q] * (q + 1) + [rng.randrange(600, 700) for _ in range(q)]
            target = [900 + q, 901]
            exs.append(Encoded(prompt + target, [IGNORE] * len(prompt) + target))
    for _ in range(20):
        rng.shuffle(exs)
        rows = build_rows(exs, share_prefix=True)
        rebuilt = []
        for r in rows:
            prefix = [t for t, s in zip(r.input_ids, r.segments) if s == 0]
            assert r.position_ids[: len(prefix)] == list(range(len(prefix)))
            for k in range(1, r.n_examples + 1):
                own = [i for i, s in enumerate(r.segments) if s == k]
                ids = prefix + [r.input_ids[i] for i in own]
                assert [r.position_ids[i] for i in own] == list(range(len(prefix), len(ids)))
                rebuilt.append(tuple(ids))
        assert sorted(rebuilt) == sorted(tuple(e.input_ids) for e in exs)
        assert sum(r.n_tokens for r in rows) == sum(len(e.input_ids) for e in exs)


def test_chunked_lm_head_gives_the_same_loss_and_gradients(tmp_path, monkeypatch):
    import glotkit.models.lm as lm

    model, tok = build_model(tmp_path, "gemma3")
    model = _active_lora(model)
    batch = collate(_encoded(tok, 6), tok.pad_token_id)
    batch["targets"] = torch.where(batch["attention_mask"].bool(), torch.roll(batch["input_ids"], -1, 1), IGNORE)
    batch["targets"][:, -1] = IGNORE
    out = []
    for chunk in (10**6, 7):
        monkeypatch.setattr(lm, "HEAD_CHUNK", chunk)
        model.zero_grad()
        loss, n = SupervisedLoss(model)(batch)
        (loss / n).backward()
        out.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    assert n > 7 * 3
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for k in out[0][1]:
        torch.testing.assert_close(out[0][1][k], out[1][1][k], rtol=1e-4, atol=1e-6)


def _resume_case(tmp_path):
    cfg = TrainSection(batch_size=2, grad_accum=2, max_steps=6, lr=5e-3, checkpoint_every=2, warmup_ratio=0.2)

    def fresh():
        model, tok = build_model(tmp_path / "m", "gemma3", seed=0)
        torch.manual_seed(0)
        return apply_lora(model, LoraSection(r=4, dropout=0.1)), tok

    return cfg, fresh


def test_truncated_checkpoint_falls_back_to_the_one_before(tmp_path):
    from glotkit.train.engine import previous_checkpoint

    cfg, fresh = _resume_case(tmp_path)
    model, tok = fresh()
    enc = _encoded(tok, 10)
    full = train(model, enc, cfg, seed=7, work_dir=tmp_path / "a", pad_id=tok.pad_token_id, progress=False)
    model, tok = fresh()
    train(model, enc, cfg, seed=7, work_dir=tmp_path / "b", pad_id=tok.pad_token_id, progress=False, stop_after=3)
    ckpt = tmp_path / "b" / "checkpoint.pt"
    assert previous_checkpoint(ckpt).is_file()  # step 2's, kept when step 3's was written
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a crash mid-copy
    said = []
    model, tok = fresh()
    rest = train(model, enc, cfg, seed=7, work_dir=tmp_path / "b", pad_id=tok.pad_token_id, progress=False,
                 log=said.append)
    assert any("cannot be read" in m for m in said) and any("step 2" in m for m in said), said
    assert [h["loss"] for h in rest.log] == pytest.approx([h["loss"] for h in full.log], abs=1e-6)

    # both unreadable: one line naming the checkpoint, not torch's traceback
    model, tok = fresh()
    train(model, enc, cfg, seed=7, work_dir=tmp_path / "c", pad_id=tok.pad_token_id, progress=False, stop_after=3)
    for p in (tmp_path / "c" / "checkpoint.pt", previous_checkpoint(tmp_path / "c" / "checkpoint.pt")):
        p.write_bytes(b"PK\x03\x04 truncated")
    from glotkit.errors import GlotkitError

    with pytest.raises(GlotkitError, match=r"checkpoint\.pt: checkpoint cannot be read") as err:
        train(fresh()[0], enc, cfg, seed=7, work_dir=tmp_path / "c", pad_id=tok.pad_token_id, progress=False)
    assert "\n" not in str(err.value)


def test_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    import glotkit.train.engine as engine
    from glotkit.errors import GlotkitError

    cfg, fresh = _resume_case(tmp_path)
    model, tok = fresh()
    enc = _encoded(tok, 10)
    full = train(model, enc, cfg, seed=7, work_dir=tmp_path / "a", pad_id=tok.pad_token_id, progress=False)
    real_save, calls = torch.save, []

    def full_disk(obj, fh, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint finds the disk full after writing a part
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *a, **k)

    monkeypatch.setattr(engine.torch, "save", full_disk)
    model, tok = fresh()
    with pytest.raises(GlotkitError, match="No space left on device") as err:
        train(model, enc, cfg, seed=7, work_dir=tmp_path / "b", pad_id=tok.pad_token_id, progress=False)
    assert "\n" not in str(err.value) and "rerun" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")) == []
    assert (tmp_path / "b" / "checkpoint.pt").is_file()  # step 2's
    monkeypatch.setattr(engine.torch, "save", real_save)
    model, tok = fresh()
    rest = train(model, enc, cfg, seed=7, work_dir=tmp_path / "b", pad_id=tok.pad_token_id, progress=False)
    assert [h["loss"] for h in rest.log] == pytest.approx([h["loss"] for h in full.log], abs=1e-6)
