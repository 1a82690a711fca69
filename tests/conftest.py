"""Shared fixtures: tiny random-initialised models and a tokenizer built in the test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared"

_CORPUS = [
    "Context: Bucureștiul este capitala României. Question: Care este capitala? Answer: București",
    "Întrebare: Unde se află Sibiul? Răspuns: în Transilvania",
    "Râul Mureș trece prin Târgu Mureș și Alba Iulia. Munții Carpați, Pleșuv, Brașov, Iași, Cluj-Napoca.",
    "The quick brown fox jumps over the lazy dog. 1234567890 ăâîșțĂÂÎȘȚ şţ",
]


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, arch: str = "gemma3", seed: int = 0, init: float = 0.02, hidden: int = 32,
                window: int = 16):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=init)
    if arch == "gemma3":
        cfg = Gemma3TextConfig(head_dim=16, sliding_window=window, final_logit_softcapping=30.0,
                               query_pre_attn_scalar=16, **common)
        model = Gemma3ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return model, tok


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gemma3")
    build_model(path, "gemma3")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(path, "llama")
    return path


QA_ROWS = [
    ("Sibiu este un oraș din Transilvania, pe râul Cibin.", "Pe ce râu este Sibiu?", "Cibin"),
    ("Mihai Eminescu s-a născut în 1850 la Botoșani.", "Când s-a născut Eminescu?", "1850"),
    ("Vârful Moldoveanu are 2544 de metri și este în Munții Făgăraș.", "Cât de înalt este vârful?", "2544 de metri"),
    ("Constantin Brâncuși a sculptat Coloana fără sfârșit la Târgu Jiu.", "Unde este Coloana?", "Târgu Jiu"),
    ("Dunărea se varsă în Marea Neagră printr-o deltă.", "Unde se varsă Dunărea?", "Marea Neagră"),
    ("Cetatea Râșnov a fost construită de cavalerii teutoni.", "Cine a construit cetatea?", "cavalerii teutoni"),
]


def write_qa_jsonl(path: Path, n: int = 24, offset: int = 0) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            c, q, a = QA_ROWS[(i + offset) % len(QA_ROWS)]
            fh.write(json.dumps({"id": f"q{offset + i}", "context": f"{c} ({i + offset})", "question": q,
                                 "answer": a}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture
def qa_files(tmp_path) -> tuple[Path, Path]:
    return write_qa_jsonl(tmp_path / "train.jsonl", 24), write_qa_jsonl(tmp_path / "test.jsonl", 6, offset=100)


def build_encoder(path: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random BERT encoder folder (Hugging Face format) with the test tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=128, pad_token_id=0)
    BertModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return build_encoder(tmp_path_factory.mktemp("tiny-bert"))
