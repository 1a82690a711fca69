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
