"""Model registry and conversion: checksums, cache manifest, folder and hub-id resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from glotkit.errors import GlotkitError
from glotkit.models import convert
from glotkit.models.loading import resolve_model_path
from glotkit.models.registry import BuiltinModel


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOTKIT_CACHE", str(tmp_path / "cache"))
    fake = BuiltinModel("fake", "x", "fake-pkg", "0" * 64, lambda p: Path(p).write_bytes(b"not a gguf"), False)
    with pytest.raises(GlotkitError, match="sha256"):
        convert.ensure_converted(fake, log=lambda m: None)
    # nothing half-written is left in the cache
    assert not (tmp_path / "cache" / "models" / "fake").exists()
    assert not [p for p in (tmp_path / "cache" / "models").iterdir()]


def test_cached_folder_is_verified(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"abc")
    (folder / convert.MANIFEST).write_text('{"files": {"model.safetensors": "%s"}}'
                                           % convert.sha256_file(folder / "model.safetensors"))
    assert convert._verify_folder(folder)
    (folder / "model.safetensors").write_bytes(b"tampered")
    assert not convert._verify_folder(folder)


def test_resolution(tmp_path, tiny_llama):
    assert resolve_model_path(str(tiny_llama)) == str(tiny_llama)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlotkitError, match="config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(GlotkitError, match="not a built-in model"):
        resolve_model_path("no-such-model")
