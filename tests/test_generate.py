"""The local decoding loop: the same greedy text as Hugging Face ``generate`` one prompt at a time,
whatever the batching, prefix sharing and token budget; the batch plan itself."""

from __future__ import annotations

import pytest
import torch

from glotkit.generate.decode import DecodeStats, cut_at_stop, decode, plan_batches
from tests.conftest import build_model

WORDS = ["Sibiu", "Cibin", "Iași", "Brașov", "Mureș", "Dunărea", "Carpați", "Cluj"]


def _prompts(tok, n_contexts=3, per_context=4, n_alone=3):
    """Prompts in groups that share a long context (the questions of one QA context), plus a few
    that share nothing, of different lengths."""
    out = []
    for c in range(n_contexts):
        context = " ".join(WORDS[(c + k) % len(WORDS)] for k in range(12 + 3 * c))
        for q in range(per_context):
            question = " ".join(WORDS[(c * q + k) % len(WORDS)] for k in range(1 + q))
            out.append(tok(f"Context: {context} Question: {question}? Answer:")["input_ids"])
    for a in range(n_alone):
        out.append(tok(" ".join(WORDS[a:]) * (a + 1))["input_ids"])
    return out


def _reference(model, tok, prompts, max_new_tokens, stop):
    """Hugging Face ``generate``, greedy, one prompt at a time (no padding), cut at the stop string."""
    texts = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        t = tok.decode(gen[0, len(p):], skip_special_tokens=True)
        texts.append(c if stop and (c := cut_at_stop(t, stop)) is not None else t)
    return texts


@pytest.mark.parametrize("arch,window,stop", [("gemma3", 256, ("a",)), ("gemma3", 16, ("a",)), ("llama", 0, ("i",)),
                                              ("gemma3", 256, None)])
@pytest.mark.parametrize("budget,rows", [(0, 5), (400, 64), (100_000, 64)])
def test_greedy_equals_generate_one_at_a_time(tmp_path, arch, window, stop, budget, rows):
    """Shared prefixes computed once, padding between a prefix and the rest of the prompt, rows
    leaving at different steps, Gemma 3's sliding window (256: the batches fit in it; 16: shorter
    than the prompts, so the window is applied by masks built from positions): the same text."""
    model, tok = build_model(tmp_path, arch, init=0.3, window=window or 16)
    prompts = _prompts(tok)
    want = _reference(model, tok, prompts, 10, stop)
    st = DecodeStats()
    got, n = decode(model, tok, prompts, max_new_tokens=10, stop=stop, batch_tokens=budget, max_rows=rows,
                    progress=False, stats=st)
    assert got == want
    assert 0 < n <= 10 * len(prompts) and st.new_tokens == n and st.prompts == len(prompts)
    assert st.prompt_tokens == sum(map(len, prompts))
    # the contexts are computed once per batch, not once per question
    assert st.computed_prompt_tokens < st.prompt_tokens


def test_no_sharing_gives_the_same_text(tmp_path):
    model, tok = build_model(tmp_path, "gemma3", init=0.3, window=256)
    prompts = _prompts(tok)
    a, _ = decode(model, tok, prompts, max_new_tokens=8, stop=None, share_prefix=True, progress=False)
    st = DecodeStats()
    b, _ = decode(model, tok, prompts, max_new_tokens=8, stop=None, share_prefix=False, progress=False, stats=st)
    assert a == b and st.computed_prompt_tokens == st.prompt_tokens


def test_sampling_does_not_depend_on_the_batch(tmp_path):
    """Each prompt draws from its own seeded generator: alone or in a batch, the same text."""
    model, tok = build_model(tmp_path, "llama", init=0.3)
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.95, seed=3, stop=None, progress=False)
    together, _ = decode(model, tok, prompts, max_rows=64, batch_tokens=0, **kw)
    alone, _ = decode(model, tok, prompts, max_rows=1, batch_tokens=0, **kw)
    assert together == alone
    other, _ = decode(model, tok, prompts, max_rows=64, batch_tokens=0, **{**kw, "seed": 4})
    assert other != together


def test_plan_groups_shared_prefixes_within_the_budget():
    ctx = [list(range(100, 160)), list(range(200, 240))]
    prompts = [ctx[i % 2] + [7, 8 + i] * (1 + i % 3) for i in range(10)] + [[5, 6, 7], [9]]
    plan = plan_batches(prompts, max_new_tokens=4, batch_tokens=400, max_rows=64)
    rows = [i for b in plan for i in b.rows]
    assert sorted(rows) == list(range(len(prompts)))  # every prompt once
    for b in plan:
        width = max(len(prompts[i]) for i in b.rows)
        assert len(b.rows) == 1 or len(b.rows) * (width + 4) <= 400
        for i, g in zip(b.rows, b.group):
            if b.prefixes:
                p = b.prefixes[g]
                assert prompts[i][: len(p)] == p and len(p) < len(prompts[i])
    # the questions of one context share its 60 (or 40) tokens and more
    shared = [len(b.prefixes[g]) for b in plan if b.prefixes for i, g in zip(b.rows, b.group) if i < 10]
    assert shared and min(shared) >= 40
    assert all(len(b.rows) <= 3 for b in plan_batches(prompts, max_new_tokens=4, batch_tokens=0, max_rows=3))


def test_plan_without_window_masks_pads_long_batches_only_at_the_left():
    """A model with a sliding window but no per-type masks: a batch longer than the window shares
    nothing (padding only before the prompts keeps the window exact); one that fits shares."""
    ctx = list(range(100, 160))
    prompts = [ctx + [7, 8 + i] * (1 + i % 3) for i in range(4)]
    kw = dict(max_new_tokens=4, batch_tokens=0, max_rows=8)
    assert plan_batches(prompts, window=64, **kw)[0].prefixes == []
    (b,) = plan_batches(prompts, window=64, masks_ok=True, **kw)
    assert b.prefixes and b.masked
    (b,) = plan_batches(prompts, window=512, **kw)
    assert b.prefixes and not b.masked


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_restricted_vocabulary(tmp_path, arch):
    """The LM head on a subset of rows: the whole vocabulary gives the same text as without; a
    subset gives, each step, the best of its tokens (and the prompts'): greedy over the masked head."""
    model, tok = build_model(tmp_path, arch, init=0.3, window=256)
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=8, stop=None, progress=False)
    full, _ = decode(model, tok, prompts, **kw)
    assert decode(model, tok, prompts, vocab=range(len(tok)), **kw)[0] == full
    allowed = set(range(3, 60))
    got, _ = decode(model, tok, prompts, vocab=allowed, **kw)
    assert got != full  # the subset changes the text (else the test shows nothing)
    # the reference: greedy with the other rows of the head masked out
    kept = torch.tensor(sorted(allowed | {tok.eos_token_id} | {t for p in prompts for t in p}))
    p = prompts[0]
    ids = torch.tensor([p])
    out = []
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=ids).logits[0, -1]
            t = int(kept[logits[kept].argmax()])
            if t == tok.eos_token_id:
                break
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    assert got[0] == tok.decode(out, skip_special_tokens=True)


def test_prefixes_in_several_passes_joined(tmp_path, monkeypatch):
    """Prefixes computed in separate passes (here one each) and their caches joined left-padded:
    the same text as the reference."""
    import glotkit.generate.decode as dec

    model, tok = build_model(tmp_path, "gemma3", init=0.3, window=16)
    prompts = _prompts(tok)
    want = _reference(model, tok, prompts, 10, None)
    monkeypatch.setattr(dec, "PREFIX_PASS_TOKENS", 1)
    assert decode(model, tok, prompts, max_new_tokens=10, stop=None, progress=False)[0] == want


def test_vocab_corpus_from_a_recipe(tmp_path):
    """generate.vocab_corpus (relative to the recipe, like its other paths) restricts the local
    generator of every role to the corpus's tokens."""
    from glotkit.config import GenerateSection
    from glotkit.generate import for_role
    from glotkit.generate.local import LocalGenerator

    model, tok = build_model(tmp_path / "m", "llama", init=0.3)
    (tmp_path / "corpus.txt").write_text("Sibiu Cibin Iași Brașov", encoding="utf-8")
    gen = for_role(GenerateSection(vocab_corpus=[str(tmp_path / "corpus.txt")]), "base",
                   lambda: LocalGenerator(model, tok), tokenizer=tok, log=lambda m: None, what="test")
    assert gen.vocab == set(tok("Sibiu Cibin Iași Brașov", add_special_tokens=False)["input_ids"])
    prompts = _prompts(tok)[:3]
    got = gen.greedy(prompts, max_new_tokens=6, stop=None, progress=False).texts
    assert got == decode(model, tok, prompts, max_new_tokens=6, stop=None, vocab=gen.vocab, progress=False)[0]
