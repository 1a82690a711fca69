"""Loading models robustly (issue 16): pickle-only folders, malicious pickles, truncated safetensors,
models that need their own code, devices the machine lacks and mistyped paths are each one
GlotkitError line naming the folder/file/field, never a library traceback or a minute of retries."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest

from conftest import build_tokenizer
from glotkit.cli import main
from glotkit.config import ModelSection
from glotkit.errors import GlotkitError
from glotkit.models import convert, loading, safety
from glotkit.models.loading import load_model, pick_device, resolve_model_path, tokenizer_for
from glotkit.models.trim_vocab import trim_vocabulary

TEXTS = ["Sibiu e pe Cibin.", "Dunărea curge spre Marea Neagră."]


@pytest.fixture(scope="module")
def tiny_safe(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-safe")
    tok = build_tokenizer(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _pickle_only(src: Path, dest: Path) -> Path:
    """The same model with its weights as pytorch_model.bin (a pickle) and no safetensors."""
    import torch
    from safetensors.torch import load_file

    folder = _copy(src, dest)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


class _RunsACommand:
    """Unpickling this would call os.system (a harmless command, that weights_only=True never runs)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _cli(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [s for s in err.splitlines() if s.startswith("glotkit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _trim_cli(capsys, tmp_path: Path, model: str) -> str:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    line = _cli(capsys, "trim-vocab", "--model", model, "--corpus", str(corpus), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    return line


def _run_recipe(capsys, tmp_path: Path, model: dict, qa_files) -> str:
    train, test = qa_files
    raw = {"name": "bad", "runs_dir": str(tmp_path / "runs"), "model": model,
           "data": {"train": str(train), "test": str(test)}, "train": {"max_steps": 1}, "eval": {"max_new_tokens": 2}}
    p = tmp_path / "bad.yaml"
    p.write_text(json.dumps(raw), encoding="utf-8")
    return _cli(capsys, "run", "--no-progress", str(p))


# 1. pickle weights ---------------------------------------------------------------------------------

def test_pickle_only_folder_is_refused_everywhere(tmp_path, tiny_safe, capsys):
    folder = _pickle_only(tiny_safe, tmp_path / "m")
    needles = (str(folder), "only pickle weights (pytorch_model.bin)", "safetensors only", "convert it")
    with pytest.raises(GlotkitError) as err:
        load_model(ModelSection(name=str(folder), device="cpu"), log=lambda m: None)
    _one_line(err, *needles)
    with pytest.raises(GlotkitError) as err:
        trim_vocabulary(folder, TEXTS, tmp_path / "out", log=lambda m: None)
    _one_line(err, *needles)
    assert not (tmp_path / "out").exists()
    line = _trim_cli(capsys, tmp_path, str(folder))
    assert "only pickle weights" in line
    # a PEFT adapter folder with only adapter_model.bin is the same
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(GlotkitError) as err:
        safety.check_weights(tmp_path / "adapter")
    _one_line(err, "adapter_model.bin", "safetensors only")


@pytest.mark.parametrize("form", ["raw-pickle", "torch-save"])
def test_malicious_pickle_is_one_line_and_never_runs(tmp_path, tiny_safe, form):
    import torch

    marker = tmp_path / "ran"
    folder = _copy(tiny_safe, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    evil = folder / "pytorch_model.bin"
    if form == "raw-pickle":
        evil.write_bytes(pickle.dumps(_RunsACommand(marker), protocol=2))
    else:
        torch.save({"w": _RunsACommand(marker)}, evil)
    with pytest.raises(GlotkitError) as err:
        load_model(ModelSection(name=str(folder), device="cpu"), log=lambda m: None)
    _one_line(err, "only pickle weights")
    with pytest.raises(GlotkitError) as err:
        trim_vocabulary(folder, TEXTS, tmp_path / "out", log=lambda m: None)
    _one_line(err, "only pickle weights")
    # loading the file itself: torch.load(weights_only=True) refuses it, in one line naming it
    with pytest.raises(GlotkitError) as err:
        safety.torch_load_weights(evil)
    msg = _one_line(err, str(evil), "refused", "never unpickles code")
    assert "weights_only" not in msg and ("posix.system" in msg or "Unsupported operand" in msg), msg
    # and the training checkpoint reader (the one torch.load in glotkit) does the same
    from glotkit.train.engine import _load_checkpoint

    with pytest.raises(GlotkitError) as err:
        _load_checkpoint(evil, log=lambda m: None)
    msg = _one_line(err, str(evil), "refused: not plain weights")
    assert "weights_only" not in msg and "trust the source" not in msg, msg
    assert not marker.exists()


def test_plain_weights_pickle_still_loads_with_the_helper(tmp_path):
    import torch

    torch.save({"w": torch.ones(2)}, tmp_path / "w.bin")
    assert torch.equal(safety.torch_load_weights(tmp_path / "w.bin")["w"], torch.ones(2))


# 2. truncated or corrupt safetensors ----------------------------------------------------------------

def test_truncated_safetensors_is_one_line_naming_it(tmp_path, tiny_safe, capsys):
    folder = _copy(tiny_safe, tmp_path / "m")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for call in (lambda: load_model(ModelSection(name=str(folder), device="cpu"), log=lambda m: None),
                 lambda: trim_vocabulary(folder, TEXTS, tmp_path / "out", log=lambda m: None),
                 lambda: resolve_model_path(str(folder))):
        with pytest.raises(GlotkitError) as err:
            call()
        _one_line(err, str(f), "truncated or corrupt")
    assert "truncated or corrupt" in _trim_cli(capsys, tmp_path, str(folder))


def test_safetensors_header_checks(tmp_path, tiny_safe):
    good = tiny_safe / "model.safetensors"
    safety.check_safetensors(good)
    data = good.read_bytes()
    cases = {
        "tiny": data[:5],
        "header-too-long": struct.pack("<Q", len(data)) + data[8:],
        "not-json": struct.pack("<Q", 4) + b"\xff\xfe{[" + data[12:],
        "extra-bytes": data + b"abc",
    }
    for name, raw in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(raw)
        with pytest.raises(GlotkitError) as err:
            safety.check_safetensors(tmp_path / f"{name}.safetensors")
        _one_line(err, f"{name}.safetensors", "truncated or corrupt")
    # a sharded folder whose index names a shard that is not there
    folder = _copy(tiny_safe, tmp_path / "sharded")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(GlotkitError) as err:
        resolve_model_path(str(folder))
    _one_line(err, "model.safetensors.index.json", "model-00002-of-00002.safetensors")


# 3. a model that needs its own code -----------------------------------------------------------------

def _needs_remote_code(src: Path, dest: Path, auto_map: bool = True) -> Path:
    folder = _copy(src, dest)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "glotkit_test_custom"
    if auto_map:
        cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                           "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_remote_code_folder_names_the_recipe_key(tmp_path, tiny_safe, qa_files, capsys):
    folder = _needs_remote_code(tiny_safe, tmp_path / "custom")
    cfg = ModelSection(name=str(folder), device="cpu")
    needles = (str(folder), "model.trust_remote_code", "off by default for safety", "auto_map")
    with pytest.raises(GlotkitError) as err:
        load_model(cfg, log=lambda m: None)
    _one_line(err, *needles)
    with pytest.raises(GlotkitError) as err:
        tokenizer_for(cfg, log=lambda m: None)
    _one_line(err, *needles)
    with pytest.raises(GlotkitError) as err:
        trim_vocabulary(folder, TEXTS, tmp_path / "out", log=lambda m: None)
    _one_line(err, str(folder), "own Python files")
    line = _run_recipe(capsys, tmp_path, {"name": str(folder)}, qa_files)
    assert "model.trust_remote_code" in line
    # an unknown model type without auto_map: a newer transformers may know it
    plain = _needs_remote_code(tiny_safe, tmp_path / "unknown", auto_map=False)
    with pytest.raises(GlotkitError) as err:
        load_model(ModelSection(name=str(plain), device="cpu"), log=lambda m: None)
    _one_line(err, "config.json", "'glotkit_test_custom'", "not known to transformers")


def test_corrupt_config_json_is_one_line(tmp_path, tiny_safe):
    folder = _copy(tiny_safe, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(GlotkitError) as err:
        load_model(ModelSection(name=str(folder), device="cpu"), log=lambda m: None)
    _one_line(err, "config.json", "not valid JSON")


# 4. devices -----------------------------------------------------------------------------------------

def test_cuda_on_a_cpu_only_machine(tmp_path, tiny_safe, qa_files, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for spec in ("cuda", "cuda:3"):
        with pytest.raises(GlotkitError) as err:
            pick_device(spec)
        _one_line(err, f"model.device: '{spec}'", "not available", "available: cpu")
    with pytest.raises(GlotkitError) as err:
        load_model(ModelSection(name=str(tiny_safe), device="cuda"), log=lambda m: None)
    _one_line(err, "model.device", "not available")
    line = _run_recipe(capsys, tmp_path, {"name": str(tiny_safe), "device": "cuda"}, qa_files)
    assert "model.device: 'cuda'" in line and "not available" in line


def test_devices_that_do_not_exist(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "cuda", "12.4", raising=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("cuda") == "cuda" and pick_device("cuda:0") == "cuda:0" and pick_device("cpu") == "cpu"
    with pytest.raises(GlotkitError) as err:
        pick_device("cuda:3")
    _one_line(err, "'cuda:3'", "not available", "has 1 CUDA GPU", "available: cpu, cuda:0")
    with pytest.raises(GlotkitError) as err:
        pick_device("mps")
    _one_line(err, "'mps'", "not available")
    with pytest.raises(GlotkitError) as err:
        pick_device("gpu0")
    _one_line(err, "'gpu0'", "not a device")


# 5. mistyped local paths and hub ids ----------------------------------------------------------------

@pytest.fixture
def no_hub(monkeypatch):
    """Offline, and any attempt to probe the network fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def probe(*a, **k):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(loading, "_hub_reachable", probe)


@pytest.mark.parametrize("name", ["models/nosuch", "./nosuch", "~/nosuch", "a/b/c", "/no/such/folder"])
def test_a_path_that_does_not_exist_is_folder_not_found(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    with pytest.raises(GlotkitError) as err:
        resolve_model_path(name)
    _one_line(err, "model.name", name, "folder not found")
    with pytest.raises(GlotkitError) as err:
        load_model(ModelSection(name=name, device="cpu"), log=lambda m: None)
    _one_line(err, "folder not found")


def test_mistyped_path_in_the_cli(tmp_path, monkeypatch, no_hub, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert "folder not found" in _trim_cli(capsys, tmp_path, "models/nosuch")


def test_hub_ids_are_still_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(GlotkitError, match="not a built-in model"):
        resolve_model_path("owner/")
    # with a network the library fetches as before; without one it reads only its cache
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a: True)
    assert loading._hub_kwargs("owner/name") == {}
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a: False)
    assert loading._hub_kwargs("owner/name") == {"local_files_only": True}
    assert loading._hub_kwargs(str(tmp_path / "models")) == {}
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a: True)
    assert loading._hub_kwargs("owner/name") == {"local_files_only": True}


@pytest.mark.parametrize("offline", ["env", "no-network"])
def test_a_hub_id_that_cannot_be_fetched_is_one_line(tmp_path, monkeypatch, offline):
    import huggingface_hub.constants as hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(loading, "_hub_reachable", lambda *a: pytest.fail("the hub was probed"))
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(loading, "_hub_reachable", lambda *a: False)
    name = "glotkit-test-owner/no-such-model"
    for call in (lambda: tokenizer_for(ModelSection(name=name), log=lambda m: None),
                 lambda: load_model(ModelSection(name=name, device="cpu"), log=lambda m: None)):
        with pytest.raises(GlotkitError) as err:
            call()
        _one_line(err, f"model.name: '{name}' is not a local folder and could not be fetched from the hub")


# the converted-model cache ---------------------------------------------------------------------------

def test_a_damaged_manifest_means_convert_again(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for text in ("{not json", "[]", '{"files": 3}', '{"nofiles": {}}'):
        (folder / convert.MANIFEST).write_text(text)
        assert not convert._verify_folder(folder)
