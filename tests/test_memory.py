"""`glotkit memory`: the static estimate's arithmetic and a measured run on a tiny model."""

from __future__ import annotations

import pytest

from conftest import build_model
from glotkit.cli import main
from glotkit.eval.memory import measure, static_estimate, table


def test_static_estimate_counts(tmp_path):
    model, _ = build_model(tmp_path, "llama", hidden=64)
    est = static_estimate(model)
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert est.linear_params + est.other_params == total
    assert est.embedding_params == model.get_input_embeddings().weight.numel()
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if type(m).__name__ == "Linear" and m is not model.get_output_embeddings())
    assert est.linear_params == linear
    assert est.weights_mb("fp32") == pytest.approx(total * 4 / 2**20)
    assert est.weights_mb("bf16") == pytest.approx(total * 2 / 2**20)
    assert est.weights_mb("nf4") == pytest.approx((linear * (0.5 + 4 / 64) + est.other_params * 4) / 2**20)


def test_measure_in_fresh_processes(tmp_path):
    build_model(tmp_path / "m", "llama", hidden=64)
    rows = measure(str(tmp_path / "m"), ["fp32", "bf16"], prompt_tokens=64, new_tokens=2)
    assert [r["mode"] for r in rows] == ["fp32", "bf16"] and all("error" not in r for r in rows), rows
    for r in rows:
        assert r["m1_mb"] > 0 and r["m2_mb"] >= r["m1_mb"] * 0.9 and r["prompt_tokens"] == 64
    assert "| fp32 |" in table(rows)


def test_unknown_mode_is_a_clear_error(capsys):
    assert main(["memory", "--modes", "fp32,int3"]) == 2
    assert "unknown mode 'int3'" in capsys.readouterr().err


def test_release_file_mapping_moves_weights_out_of_the_file_and_keeps_the_model(tmp_path):
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from conftest import build_model
    from glotkit.models.loading import release_file_mapping

    if not sys.platform.startswith("linux"):
        import pytest

        pytest.skip("reads /proc/self/maps")
    build_model(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)

    def mapped() -> int:
        regions = []
        for line in open("/proc/self/maps", encoding="utf-8"):
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith(str(tmp_path)) and parts[5].endswith(".safetensors"):
                regions.append(tuple(int(x, 16) for x in parts[0].split("-")))
        return sum(any(lo <= p.untyped_storage().data_ptr() < hi for lo, hi in regions) for p in model.parameters())

    ids = torch.tensor([[2, 5, 9, 14]])
    with torch.no_grad():
        before = model(ids).logits
    assert mapped() > 0  # transformers reads safetensors through a file mapping: the weights are views of it
    assert release_file_mapping(model) > 0
    assert mapped() == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
