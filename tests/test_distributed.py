"""Data-parallel training through accelerate, on the CPU with 2 processes (gloo), DDP and FSDP
(configs/accelerate/fsdp.yaml): the same steps as one process, only process 0 writes, and a killed
2-process run resumes to the same result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_qa_jsonl
from glotkit.cli import main
from glotkit.errors import GlotkitError
from glotkit.train.distributed import check_split, launch_command, share_of

REPO = Path(__file__).resolve().parents[1]
STEPS = 120

# Installed in every process of the launch through PYTHONPATH: records each file a process opens
# for writing, creates or renames under the run folder (Python's audit events), one log per rank.
SITECUSTOMIZE = '''
import atexit, os, sys
_root = os.environ.get("GLOTKIT_TEST_WATCH")
_rank = os.environ.get("RANK")
if _root and _rank is not None:
    _seen = []
    _flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _under(p):
        try:
            return os.path.abspath(os.fsdecode(p)).startswith(_root)
        except TypeError:
            return False
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and flags & _flags)
            if writing and _under(path):
                _seen.append(os.fsdecode(path))
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove") and _under(args[0]):
            _seen.append(event + " " + os.fsdecode(args[0]))
    sys.addaudithook(_hook)
    atexit.register(lambda: open(os.environ["GLOTKIT_TEST_WRITES"] + "." + _rank, "w").write("\\n".join(_seen)))
'''


def test_share_of_splits_contiguously_and_completely():
    for n in range(0, 9):
        for world in (1, 2, 3):
            parts = [share_of(list(range(n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_more_processes_than_the_batch_splits_into(tmp_path, tiny_llama, qa_files, capsys):
    check_split(2, 2)
    with pytest.raises(GlotkitError, match="train.batch_size: 2 .* over 3 processes"):
        check_split(2, 3)
    recipe = _recipe(tmp_path, tiny_llama, *qa_files, batch_size=2)
    assert main(["train", str(recipe), "--launcher", "accelerate", "--num-processes", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.batch_size: 2 examples per micro-batch cannot be split over 3 processes" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config, message", [
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 1}\n", "fsdp_config.fsdp_version 1; glotkit shards with FSDP2"),
    ("distributed_type: DEEPSPEED\n", "distributed_type DEEPSPEED is not supported"),
    ("distributed_type: [FSDP\n", "not valid YAML"),
    ("- FSDP\n", "expected a mapping"),
])
def test_an_accelerate_config_glotkit_cannot_run_is_refused_before_launching(tmp_path, tiny_llama, qa_files, capsys,
                                                                          config, message):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text(config, encoding="utf-8")
    recipe = _recipe(tmp_path, tiny_llama, *qa_files)
    assert main(["train", str(recipe), "--launcher", "accelerate", "--accelerate-config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_fsdp_refuses_a_4bit_model_before_launching(tmp_path, tiny_llama, qa_files, capsys):
    recipe = _recipe(tmp_path, tiny_llama, *qa_files)
    fsdp = str(REPO / "configs" / "accelerate" / "fsdp.yaml")
    assert main(["train", str(recipe), "--set", "model.quantization=nf4", "--launcher", "accelerate",
                 "--accelerate-config", fsdp]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.quantization: nf4 weights are not sharded" in err[0] and "ddp.yaml" in err[0]


def test_launch_command_reruns_glotkit_under_accelerate():
    cmd = launch_command(["train", "r.yaml", "--set", "lora.r=4"], 4, port=12345)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--main_process_port") + 1] == "12345"
    assert cmd[-6:] == ["-m", "glotkit", "train", "r.yaml", "--set", "lora.r=4"]
    cmd = launch_command(["train", "r.yaml"], 2, config_file="configs/accelerate/ddp.yaml")
    assert cmd[cmd.index("--config_file") + 1] == "configs/accelerate/ddp.yaml" and "--multi_gpu" not in cmd


def _recipe(root: Path, model: Path, train: Path, test: Path, name: str = "tiny", batch_size: int = 2,
            stages: tuple = ("train",)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    raw = {"name": name, "runs_dir": str(root / "runs"), "model": {"name": str(model)},
           "data": {"train": str(train), "test": str(test)}, "stages": list(stages),
           "lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.0},
           "train": {"max_steps": STEPS, "batch_size": batch_size, "grad_accum": 2, "lr": 1e-3, "checkpoint_every": 5}}
    p = root / "recipe.yaml"
    p.write_text(json.dumps(raw), encoding="utf-8")
    return p


def _env(tmp_path: Path, watch: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", GLOTKIT_TEST_WATCH=str(watch.resolve()),
                GLOTKIT_TEST_WRITES=str(tmp_path / "writes"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train" / "log.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """23 examples in micro-batches of 2: the last micro-batch of an epoch has one example, so one
    process has none and takes part with a zero-weight pass."""
    root = tmp_path_factory.mktemp("data")
    return write_qa_jsonl(root / "train.jsonl", 23), write_qa_jsonl(root / "test.jsonl", 4, offset=100)


CMD = [sys.executable, "-m", "glotkit", "run", "--no-progress"]
LAUNCH = {"one": [], "ddp": ["--launcher", "accelerate", "--num-processes", "2"],
          "fsdp": ["--launcher", "accelerate", "--num-processes", "2",
                   "--accelerate-config", str(REPO / "configs" / "accelerate" / "fsdp.yaml")]}


@pytest.fixture(scope="module")
def one(tmp_path_factory, tiny_llama, data):
    """The reference: one process, in-line."""
    root = tmp_path_factory.mktemp("one")
    recipe = _recipe(root, tiny_llama, *data)
    subprocess.run(CMD + [str(recipe)], env=_env(root, root), check=True, capture_output=True, timeout=300)
    return root / "runs" / "tiny"


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def runs(request, tmp_path_factory, tiny_llama, data, one):
    """2 processes through --launcher accelerate, DDP (no config) or FSDP (configs/accelerate/fsdp.yaml):
    uninterrupted (then evaluated by process 0), and killed with SIGKILL after a checkpoint then rerun."""
    root = tmp_path_factory.mktemp(request.param)
    launch = LAUNCH[request.param]
    out = {"one": one, "kind": request.param}

    two = _recipe(root / "two", tiny_llama, *data, stages=("train", "eval_tuned"))
    res = subprocess.run(CMD + [str(two)] + launch, env=_env(root / "two", root / "two" / "runs"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out["two"], out["two_err"], out["writes"] = root / "two" / "runs" / "tiny", res.stderr, root / "two" / "writes"

    kill = _recipe(root / "kill", tiny_llama, *data)
    ckpt = root / "kill" / "runs" / "tiny" / "train" / "checkpoint.pt"
    proc = subprocess.Popen(CMD + [str(kill)] + launch, env=_env(root / "kill", root / "kill" / "runs"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 900  # bounds a hang only
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    finished_early = proc.poll() is not None
    import psutil

    # the launcher, accelerate, torchrun and both training processes (torchrun starts the
    # training processes in sessions of their own)
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        p.kill()
    _, err = proc.communicate(timeout=60)
    if finished_early or not ckpt.exists():
        pytest.fail(f"the 2-process run ended before a checkpoint could be killed (raise STEPS): {err[-2000:]!r}")
    out["killed_at"] = torch.load(ckpt, weights_only=True)["step"]
    out["checkpoint"] = root / "checkpoint-at-kill.pt"
    shutil.copy(ckpt, out["checkpoint"])
    res = subprocess.run(CMD + [str(kill)] + launch, env=_env(root / "kill", root / "kill" / "runs"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out["kill"], out["kill_err"] = root / "kill" / "runs" / "tiny", res.stderr
    return out


def test_two_processes_take_the_same_steps_as_one(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert len(one) == len(two) == STEPS
    assert two == pytest.approx(one, abs=2e-5)
    a, b = _adapter(runs["one"]), _adapter(runs["two"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    result = json.loads((runs["two"] / "train" / "result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == STEPS
    assert json.loads((runs["one"] / "train" / "result.json").read_text())["processes"] == 1
    assert ("2 processes (FSDP)" if runs["kind"] == "fsdp" else "2 processes (MULTI_CPU)") in runs["two_err"]
    assert runs["two_err"].count("trainable params:") == 1  # one voice
    # process 0 evaluates the adapter it saved (after FSDP: on the model loaded again, whole)
    assert json.loads((runs["two"] / "eval_tuned" / "metrics.json").read_text())["n"] == 4


def test_only_process_zero_writes(runs):
    rank0 = (runs["writes"].parent / "writes.0").read_text().splitlines()
    rank1 = (runs["writes"].parent / "writes.1").read_text().splitlines()
    assert any("adapter_config.json" in w for w in rank0) and any("checkpoint.pt" in w for w in rank0)
    assert rank1 == []


def test_killed_two_process_run_resumes_to_the_same_result(runs):
    assert 0 < runs["killed_at"] < STEPS
    assert f"resuming training from step {runs['killed_at']}/{STEPS}" in runs["kill_err"]
    assert _losses(runs["kill"]) == pytest.approx(_losses(runs["two"]), abs=1e-6)
    a, b = _adapter(runs["two"]), _adapter(runs["kill"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_a_checkpoint_resumes_in_another_kind_of_launch(runs, tiny_llama, data, tmp_path):
    """A DDP checkpoint (optimizer state by position) resumes sharded, an FSDP one (gathered,
    by parameter name) in one process: the steps are those of the uninterrupted run."""
    other = "fsdp" if runs["kind"] == "ddp" else "one"
    recipe = _recipe(tmp_path, tiny_llama, *data)
    (tmp_path / "runs" / "tiny" / "train").mkdir(parents=True)
    shutil.copy(runs["checkpoint"], tmp_path / "runs" / "tiny" / "train" / "checkpoint.pt")
    res = subprocess.run(CMD + [str(recipe)] + LAUNCH[other], env=_env(tmp_path, tmp_path / "runs"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming training from step {runs['killed_at']}/{STEPS}" in res.stderr
    assert _losses(tmp_path / "runs" / "tiny") == pytest.approx(_losses(runs["one"]), abs=2e-5)
