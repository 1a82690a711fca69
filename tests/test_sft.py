"""Instruction and chat fine-tuning (system: sft): formats, supervised tokens (against TRL's),
packing, bad input, and a whole run on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glotkit.cli import main
from glotkit.data.chat import ChatEncoder, Conversation, load_chat_data, pack_examples, read_conversations
from glotkit.data.prompts import IGNORE, EncodeStats
from glotkit.errors import GlotkitError

# a ChatML-style template (the tiny test tokenizer has none), with a system message
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CONVS = [
    [{"role": "system", "content": "Răspunde scurt."}, {"role": "user", "content": "Capitala județului Cluj?"},
     {"role": "assistant", "content": "Cluj-Napoca."}],
    [{"role": "user", "content": "Unde e Sibiul?"}, {"role": "assistant", "content": "În Transilvania."},
     {"role": "user", "content": "Pe ce râu?"}, {"role": "assistant", "content": "Pe Cibin."}],
    [{"role": "user", "content": "Spune un număr."}, {"role": "assistant", "content": "1234"}],
]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_gemma):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_gemma)
    t.chat_template = CHATML
    return t


# --------------------------------------------------------------------------- formats


def test_every_format_reads_to_the_same_conversation(tmp_path):
    want = [{"role": "system", "content": "Fii scurt."}, {"role": "user", "content": "Tradu: câine\n\nîn engleză"},
            {"role": "assistant", "content": "dog"}]
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Tradu: câine", "input": "în engleză", "output": "dog",
                                            "system": "Fii scurt."}])
    sharegpt = _jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "Fii scurt."}, {"from": "human", "value": "Tradu: câine\n\nîn engleză"},
        {"from": "gpt", "value": "dog"}]}])
    messages = _jsonl(tmp_path / "m.jsonl", [{"messages": want}])
    for path, fmt in ((alpaca, "alpaca"), (sharegpt, "sharegpt"), (messages, "messages")):
        convs, got = read_conversations(path)
        assert got == fmt and convs[0].messages == want, fmt
    pc = _jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    convs, got = read_conversations(pc)
    assert got == "prompt_completion" and (convs[0].prompt, convs[0].completion) == ("2+2=", " 4")
    # a conversational prompt-completion record is a conversation
    pcc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": want[:2], "completion": want[2:]}])
    assert read_conversations(pcc)[0][0].messages == want


def test_file_kinds_and_field_names(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"q": f"Întrebarea {i}", "a": f"Răspunsul {i}", "uid": f"u{i}"} for i in range(4)]
    fields = {"instruction": "q", "output": "a", "id": "uid"}
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["q", "a", "uid"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for name in ("d.csv", "d.json", "d.parquet", "ds"):
        convs, fmt = read_conversations(tmp_path / name, "alpaca", fields)
        assert fmt == "alpaca" and [c.id for c in convs] == ["u0", "u1", "u2", "u3"], name
        assert convs[2].messages[-1] == {"role": "assistant", "content": "Răspunsul 2"}
    # messages stored as JSON text in a CSV cell
    with (tmp_path / "m.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["messages"])
        w.writerow([json.dumps(CONVS[1], ensure_ascii=False)])
    assert read_conversations(tmp_path / "m.csv")[0][0].messages == CONVS[1]


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"id": f"c{i}", "messages": CONVS[i % 3]} for i in range(20)])
    a = load_chat_data(str(path), None, "auto", None, 0.25, seed=7)
    b = load_chat_data(str(path), None, "auto", None, 0.25, seed=7)
    assert [c.id for c in a.test] == [c.id for c in b.test] and len(a.test) == 5 and a.detected
    assert not {c.id for c in a.train} & {c.id for c in a.test}


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "Salut"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "Salut"}, {"role": "user", "content": "Bună"}]},
     "roles out of order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "ends with a user turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "message 1 (assistant) is empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "b"}]}, "system message may only come first"),
    ({"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}, "unknown role 'tool'"),
    ({"conversations": "not a list"}, "must be a list of messages"),
    ({"instruction": "a", "output": None}, "field 'output' must be text"),
    ({"prompt": "a", "completion": ""}, "field 'completion' is empty"),
    ({"text": "plain"}, "cannot tell the format"),
])
def test_bad_conversations_are_one_line_errors(tmp_path, record, message):
    path = _jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(GlotkitError) as err:
        read_conversations(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_duplicate_ids_refused(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"id": "x", "messages": CONVS[0]}, {"id": "x", "messages": CONVS[2]}])
    with pytest.raises(GlotkitError, match="duplicate id 'x'"):
        read_conversations(path)


# --------------------------------------------------------------------------- supervised tokens


def _supervised(enc: ChatEncoder, conv: Conversation) -> list[str]:
    ids, mask = enc.encode(conv)
    return [enc.tok.decode([i]) for i, m in zip(ids, mask) if m]


def test_assistant_turns_and_their_end_marker_are_supervised(tok):
    conv = Conversation("c", CONVS[1])
    enc = ChatEncoder(tok)
    text = "".join(_supervised(enc, conv))
    assert text == "În Transilvania.<|im_end|>\nPe Cibin.<|im_end|>\n"
    assert "".join(_supervised(ChatEncoder(tok, loss="last"), conv)) == "Pe Cibin.<|im_end|>\n"
    ids, mask = ChatEncoder(tok, loss="all").encode(conv)
    assert all(mask) and tok.decode(ids) == enc.render(conv.messages)
    # the generation prompt is the conversation up to the last answer, ending with the assistant header
    assert enc.prompt_text(conv).endswith("Pe ce râu?<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_completion_supervises_completion_and_eos(tok):
    conv = Conversation("p", prompt="Capitala României este", completion=" București.")
    ids, mask = ChatEncoder(tok).encode(conv)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " București.</s>"


def test_template_that_drops_the_answer_is_caught(tok):
    dropping = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'U: ' + m['content'] + '\\n' }}"
                "{% else %}{{ 'A: ...\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    with pytest.raises(GlotkitError, match="drops or rewrites the assistant's text"):
        ChatEncoder(tok, dropping).encode(Conversation("c", CONVS[2]))


def test_too_long_is_counted_dropped_or_truncated(tok):
    enc = ChatEncoder(tok)
    conv = Conversation("c", CONVS[1])
    n = len(enc.encode(conv)[0])
    stats = EncodeStats()
    assert enc.example(conv, n - 3, "drop", stats) is None and stats.dropped == 1
    stats = EncodeStats()
    e = enc.example(conv, n - 3, "truncate_context", stats)
    assert stats.truncated == 1 and len(e.input_ids) == n - 3 and any(y != IGNORE for y in e.labels)


def _trl_masks(tokenizer, convs: list[list[dict]], tmp_path: Path, prompt_completion: bool = False) -> list[tuple]:
    """(input_ids, supervised mask) as TRL's SFTTrainer labels them (assistant_only_loss or
    completion_only_loss), on a tiny model with the tokenizer's vocabulary."""
    pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
    if prompt_completion:
        data = Dataset.from_list(convs)
        args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], completion_only_loss=True, max_length=None,
                         bf16=False, use_cpu=True)
    else:
        data = Dataset.from_list([{"messages": c} for c in convs])
        args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], assistant_only_loss=True, max_length=None,
                         bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    # TRL folds its masks into the labels (-100 where there is no loss)
    return [(r["input_ids"], [y != -100 for y in r["labels"]]) for r in trainer.train_dataset]


def _trl_template(name: str) -> str:
    trl = pytest.importorskip("trl")
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


GEMMA_STYLE_CONVS = [c for c in CONVS] + [
    [{"role": "user", "content": "Tradu în engleză: „mulțumesc”"}, {"role": "assistant", "content": "thank you"},
     {"role": "user", "content": "Și „bună ziua”?"}, {"role": "assistant", "content": "  good day  "}]]


@pytest.mark.parametrize("template", ["gemma3", "llama3"])
def test_supervised_tokens_equal_trl_on_tiny_tokenizer(tmp_path, tiny_gemma, template):
    """Each model's own template (no generation markers, as shipped): TRL swaps in its training
    variant with {% generation %} blocks; glotkit finds the same tokens from the plain template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma)
    tokenizer.chat_template = _trl_template(template)
    theirs = _trl_masks(tokenizer, GEMMA_STYLE_CONVS, tmp_path)
    enc = ChatEncoder(tokenizer)
    for conv, (ids, mask) in zip(GEMMA_STYLE_CONVS, theirs):
        ours = enc.encode(Conversation("c", conv))
        assert ours == (list(ids), mask)


def test_completion_tokens_equal_trl(tmp_path, tok):
    rows = [{"prompt": "Capitala României este", "completion": " București."},
            {"prompt": "2 + 2 =", "completion": " 4"}]
    theirs = _trl_masks(tok, rows, tmp_path, prompt_completion=True)
    enc = ChatEncoder(tok)
    for r, (ids, mask) in zip(rows, theirs):
        assert enc.encode(Conversation("p", prompt=r["prompt"], completion=r["completion"])) == (list(ids), mask)


@pytest.mark.integration
@pytest.mark.parametrize("template", ["gemma3", "llama3"])
def test_supervised_tokens_equal_trl_on_gemma_tokenizer(tmp_path, template):
    """The real Gemma 3 tokenizer (its turn markers are special tokens) with Gemma 3's and a
    Llama 3 chat template, and glotkit's own template for the base model."""
    from glotkit.config import ModelSection
    from glotkit.models.loading import tokenizer_for

    tokenizer = tokenizer_for(ModelSection(name="gemma-3-270m"), log=lambda m: None)
    tokenizer.chat_template = _trl_template(template)
    theirs = _trl_masks(tokenizer, GEMMA_STYLE_CONVS, tmp_path)
    enc = ChatEncoder(tokenizer)
    for conv, (ids, mask) in zip(GEMMA_STYLE_CONVS, theirs):
        assert enc.encode(Conversation("c", conv)) == (list(ids), mask)
    if template == "gemma3":  # the shipped template for the base model renders and masks the same way
        from glotkit.data.chat import read_template

        ours = ChatEncoder(tokenizer, read_template(Path(__file__).parents[1] / "recipes/templates/gemma3-chat.jinja"))
        for conv, (ids, mask) in zip(GEMMA_STYLE_CONVS, theirs):
            assert ours.encode(Conversation("c", conv)) == (list(ids), mask)
        assert tokenizer.convert_ids_to_tokens(ours.stop_ids()) == ["<eos>", "<end_of_turn>"]


# --------------------------------------------------------------------------- packing


def test_packed_rows_give_the_loss_of_separate_examples(tiny_gemma, tok):
    import torch
    from transformers import AutoModelForCausalLM

    from glotkit.models.lm import SupervisedLoss, build_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma).eval()
    enc = ChatEncoder(tok)
    examples = [enc.example(Conversation(str(i), c), 512, "drop", EncodeStats()) for i, c in enumerate(CONVS * 2)]
    assert max(len(e.input_ids) for e in examples) > 16  # longer than the tiny model's sliding window
    rows = pack_examples(examples, 200)
    assert len(rows) < len(examples) and all(len(r.input_ids) <= 200 for r in rows)
    assert sum(r.n_examples for r in rows) == len(examples)
    loss_fn = SupervisedLoss(model)
    grads = []
    for batch in (rows, build_rows(examples)):
        model.zero_grad()
        loss, n = loss_fn(loss_fn.collate(batch, tok.pad_token_id))
        loss.backward()
        grads.append((loss.item(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (packed, n_packed, g_packed), (alone, n_alone, g_alone) = grads
    assert n_packed == n_alone
    assert packed == pytest.approx(alone, rel=1e-4)
    for k in g_alone:  # the same gradients: nothing leaks between packed conversations
        torch.testing.assert_close(g_packed[k], g_alone[k], atol=1e-5, rtol=1e-3)


# --------------------------------------------------------------------------- the system


def _recipe(tmp_path: Path, model: Path, **extra) -> Path:
    import yaml

    (tmp_path / "chatml.jinja").write_text(CHATML, encoding="utf-8")
    rows = [{"id": f"c{i}", "messages": CONVS[i % 3]} for i in range(18)]
    _jsonl(tmp_path / "chat.jsonl", rows)
    recipe = {"name": "chat", "system": "sft", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(model)},
              "data": {"train": "chat.jsonl", "test_ratio": 0.2},
              "chat": {"template": "chatml.jinja"},
              "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
              "train": {"lr": 1e-3, "epochs": 2, "batch_size": 2, "max_length": 128, "checkpoint_every": 2},
              "eval": {"max_new_tokens": 8, "batch_size": 4}}
    for key, value in extra.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "shared-prefix"])
def test_sft_run_end_to_end(tmp_path, tiny_gemma, capsys, pack):
    recipe = _recipe(tmp_path, tiny_gemma, chat={"pack": pack})
    assert main(["run", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "chat"
    metrics = json.loads((run / "metrics.json").read_text())
    for tag in ("base", "tuned"):
        m = metrics[tag]
        assert m["n"] == 4 and m["tokens"] > 0 and {"em", "f1", "rougeL", "nll_per_token"} <= set(m)
        assert m["rougeL_ci"][0] <= m["rougeL"] <= m["rougeL_ci"][1] and "over conversations" in m["ci_method"]
        assert m["nll_per_token_ci"][0] <= m["nll_per_token"] <= m["nll_per_token_ci"][1]
    # training on the assistant turns lowers the held-out loss on them
    assert metrics["tuned"]["nll_per_token"] < metrics["base"]["nll_per_token"]
    err = capsys.readouterr().err
    assert "format messages (detected)" in err
    assert ("packed" in err) == pack
    report = (run / "report.md").read_text()
    assert "loss per assistant token" in report and "| tuned |" in report and "Change, tuned − base" in report
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma), run / "adapter")


def test_sft_without_template_says_what_to_do(tmp_path, tiny_gemma, capsys):
    recipe = _recipe(tmp_path, tiny_gemma, chat={"template": None})
    assert main(["run", "--no-progress", str(recipe)]) != 0
    assert "has no chat template: give one with chat.template" in capsys.readouterr().err


def test_sft_recipe_errors_before_any_model(tmp_path, capsys):
    recipe = _recipe(tmp_path, tmp_path / "no-such-model", data={"fields": {"question": "q"}})
    assert main(["validate", str(recipe)]) != 0
    assert "data.fields" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [{"use_dora": True, "use_rslora": True}, {"init": "olora"}], ids=["dora-rslora", "olora"])
def test_sft_run_with_lora_variants(tmp_path, tiny_gemma, lora):
    """The variants through a whole run; with OLoRA the base weights were rewritten in training, so
    the tuned evaluation must use the original base and the converted adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, tiny_gemma, lora=lora)
    assert main(["run", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "chat"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tuned"]["nll_per_token"] < metrics["base"]["nll_per_token"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma), run / "adapter").eval()
    from glotkit.data.chat import read_conversations
    from glotkit.eval.chat_eval import heldout_loss

    tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tiny_gemma)
    held = [c for c in read_conversations(tmp_path / "chat.jsonl")[0]
            if c.id in {json.loads(s)["id"] for s in (run / "eval_tuned/predictions.jsonl").read_text().splitlines()}]
    with torch.no_grad():
        again = heldout_loss(model, ChatEncoder(tok, CHATML), held, tok.pad_token_id, 128, progress=False)
    assert again["nll_per_token"] == pytest.approx(metrics["tuned"]["nll_per_token"], abs=2e-4)


# --------------------------------------------------------------------------- trying the model


def test_chat_streams_keeps_the_conversation_and_resets(tmp_path, tiny_gemma, capsys, monkeypatch):
    import io

    recipe = _recipe(tmp_path, tiny_gemma, stages=["train"])
    assert main(["run", "--no-progress", str(recipe)]) == 0
    seen = []
    import glotkit.data.chat as chat_mod

    render = chat_mod.ChatEncoder.render

    def spy(self, messages, generation_prompt=False):
        seen.append([m["role"] for m in messages])
        return render(self, messages, generation_prompt)

    monkeypatch.setattr(chat_mod.ChatEncoder, "render", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Unde e Sibiul?\nPe ce râu?\n/reset\nSalut\n/exit\n"))
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "runs" / "chat"), "--max-new-tokens", "4", "--system", "Fii scurt."]) == 0
    out = capsys.readouterr()
    asked = [r for r in seen if r[-1] == "user" and r[0] == "system"]  # (not the end-of-turn probe)
    assert asked == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert out.out.count("> ") == 5 and "(new conversation)" in out.out
    assert "chat with" in out.err


def test_generate_file_resumes_and_keeps_order(tmp_path, tiny_gemma, capsys):
    inp = _jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Context: Sibiu"},
                                         {"id": "b", "messages": [{"role": "user", "content": "Salut"}]},
                                         {"prompt": "Întrebare: unde?"}])
    out = tmp_path / "out.jsonl"
    args = ["generate", str(tiny_gemma), "--template", str(_recipe(tmp_path, tiny_gemma).parent / "chatml.jinja"),
            "--input", str(inp), "--output", str(out), "--max-new-tokens", "5", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(s) for s in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "3"] and all("generation" in r for r in rows)
    # an interrupted run left two answers in the partial file: only the third is generated again
    (tmp_path / "out.jsonl.partial").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    out.unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming, 2 of 3" in capsys.readouterr().err
    assert [json.loads(s) for s in out.read_text().splitlines()] == rows


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "must end with a user turn"),
    ({"text": "x"}, "needs 'prompt' (text) or 'messages'"),
])
def test_generate_bad_input(tmp_path, tiny_gemma, capsys, record, message):
    inp = _jsonl(tmp_path / "in.jsonl", [record])
    assert main(["generate", str(tiny_gemma), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


def test_chat_on_a_run_without_adapter_says_so(tmp_path, tiny_gemma, capsys):
    recipe = _recipe(tmp_path, tiny_gemma, stages=["eval_base"])
    assert main(["run", "--no-progress", str(recipe)]) == 0
    assert main(["chat", str(tmp_path / "runs" / "chat")]) == 2
    assert "the run has no adapter yet" in capsys.readouterr().err


def test_full_finetuning_run(tmp_path, tiny_gemma, capsys, monkeypatch):
    """finetune: full trains every weight and saves the whole model in model/; the base model is
    loaded again where a stage after training asks for it."""
    import io

    import torch
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, tiny_gemma, finetune="full", train={"lr": 1e-3})
    assert main(["run", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "chat"
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    result = json.loads((run / "train" / "result.json").read_text())
    assert result["trainable_params"] == result["all_params"] and result["finetune"] == "full"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tuned"]["nll_per_token"] < metrics["base"]["nll_per_token"]
    tuned = AutoModelForCausalLM.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert "full fine-tuning (every weight)" in (run / "report.md").read_text()

    # a stage after training that needs the base gets the original weights back
    from glotkit.systems import load_recipe
    from glotkit.systems.finetune import Loaded

    state = Loaded(tuned, None, "cpu", None, run / "model", full=load_recipe(recipe).model, holds_tuned=True)
    with state.base() as model:
        assert torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(state.tuned().model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)

    monkeypatch.setattr("sys.stdin", io.StringIO("Salut\n"))
    capsys.readouterr()
    assert main(["chat", str(run), "--max-new-tokens", "3"]) == 0
    assert "fully fine-tuned" in capsys.readouterr().err


def test_full_finetuning_refused_where_adapters_are_the_design(tmp_path, capsys):
    import yaml

    recipe = tmp_path / "x.yaml"
    recipe.write_text(yaml.safe_dump({"system": "xllora", "finetune": "full", "runs_dir": str(tmp_path)}))
    assert main(["run", str(recipe)]) == 2
    assert "finetune: full is not supported by system 'xllora'" in capsys.readouterr().err
