"""Generation through an OpenAI-compatible server (vLLM, TGI, llama.cpp's server), with the
``openai`` client: ``/v1/completions`` with the same prompt text the local backend would feed
the model, greedy or sampled, several requests in flight.

* Before any request the server's ``/v1/models`` must list the model asked for, and every answer
  must name it: a server that serves something else is an error, not a silent mix-up.
* Each request is retried with exponential backoff (the client's own), and bounded by a timeout;
  an unreachable server ends the stage with one line naming the URL.  What was answered before
  has already been handed to ``on_batch`` (the stages append it to their files), so the rerun
  continues where it stopped.
* The texts come back in input order.  With stop strings the answer is streamed and checked
  piece by piece exactly as the local backend checks it (a stop string in the leading blanks
  does not stop an answer, which the API's own ``stop`` would), and the connection is closed at
  the first stop string, which ends the generation on vLLM's and llama.cpp's servers: the same
  parsers see the same text, and the server does not spend ``max_tokens`` on every answer.
  A stream broken off mid-answer is asked again (``retries`` times, with backoff).
* :meth:`ServerGenerator.logliks` scores continuations (the task suite's ``loglik`` mode) the way
  lm-evaluation-harness does on a completions server: the prompt and the continuation in one
  request with ``echo`` and ``logprobs``, summing the log-probabilities of the tokens that start
  at or after the continuation's first character.  Before the first score the server is checked
  against itself: the log-probability it gives a token it has just generated must be the one it
  gives that token when the same text comes back as a prompt.  llama-cpp-python's server (0.3.36)
  fails this check (its prompt log-probabilities are those of each token *after* it is read:
  abetlen/llama-cpp-python#1983), and llama.cpp's own server returns none; both are refused with
  a message, where a silent run would score by chance.  vLLM's prompt log-probabilities are the
  ones lm-evaluation-harness relies on.

Start a server for the built-in SmolLM2 (the test does this)::

    python -m llama_cpp.server --model .../SmolLM2-135M-Instruct.Q4_1.gguf --model_alias smollm2 \\
        --host 127.0.0.1 --port 8000 --interrupt_requests false
"""

from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Sequence

from glotkit.config import GenerateSection
from glotkit.errors import GlotkitError
from glotkit.generate.local import cut_at_stop


def prompt_text(tokenizer, ids: Sequence[int]) -> str:
    """The text of a prompt the local backend would feed as ``ids``.  A leading BOS is left out:
    the server's tokenizer adds its own, as the model's tokenizer config says."""
    ids = list(ids)
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _tries(n: int) -> str:
    return f"{n} {'try' if n == 1 else 'tries'}"


class _BrokenStream(Exception):
    pass


def _stream_errors(openai) -> tuple[type[Exception], ...]:
    """What a stream broken off mid-answer raises: openai 3 wraps its transport's errors in
    ``APIError``s, openai 1 lets httpx's through."""
    import importlib

    errors: list[type[Exception]] = [openai.APIError, _BrokenStream]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


class ServerGenerator:
    """One served model (``model``) on the server of ``cfg``: the
    :class:`~glotkit.generate.Generator` of a served model.  ``tokenizer`` (the model's) turns
    token-id prompts into the text the server is sent."""

    def __init__(self, cfg: GenerateSection, model: str, url: str | None = None, tokenizer=None):
        try:
            import openai
        except ImportError:
            raise GlotkitError("generate.backend: 'openai' needs the openai client: pip install 'glotkit[server]'") from None
        self.openai = openai
        self.cfg, self.model, self.url = cfg, model, url or cfg.base_url
        self.tokenizer = tokenizer
        self.backend = f"openai {self.url} {model}"
        self.logliks_checked = False
        self.broken = _stream_errors(openai)  # what a stream broken off mid-answer raises
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not key:
            raise GlotkitError(f"generate.api_key_env: the environment variable {cfg.api_key_env} is not set")
        self.client = openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=cfg.retries,
                                    timeout=cfg.timeout)

    def _unreachable(self, err) -> GlotkitError:
        return GlotkitError(f"generate.base_url: no answer from {self.url} after {_tries(self.cfg.retries + 1)} "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}); "
                            "start the server (or fix the URL) and rerun: finished answers are kept")

    def check(self) -> None:
        """The server answers and serves ``self.model``."""
        try:
            served = [m.id for m in self.client.models.list()]
        except (self.openai.APIConnectionError, self.openai.APITimeoutError) as err:
            raise self._unreachable(err) from None
        except self.openai.APIStatusError as err:
            raise GlotkitError(f"generate.base_url: {self.url}/models answered HTTP {err.status_code}") from None
        if self.model not in served:
            raise GlotkitError(f"generate.models: the server at {self.url} serves {', '.join(served) or 'nothing'}, "
                               f"not '{self.model}'")

    def _complete(self, asking: str = "", **request):
        """One ``/v1/completions`` request for this model; every failure is one line (``asking``
        says what was asked, after the status)."""
        try:
            r = self.client.completions.create(model=self.model, **request)
        except (self.openai.APIConnectionError, self.openai.APITimeoutError) as err:
            raise self._unreachable(err) from None
        except self.openai.APIStatusError as err:
            raise GlotkitError(f"generate: {self.url} answered HTTP {err.status_code} for model '{self.model}'"
                               f"{asking}: {str(err).splitlines()[0][:300]}") from None
        if request.get("stream"):
            return r  # checked piece by piece
        if r.model != self.model:
            raise GlotkitError(f"generate.models: asked {self.url} for '{self.model}', it answered as '{r.model}'")
        if not r.choices:
            raise GlotkitError(f"generate: {self.url} returned no choice for model '{self.model}'")
        return r

    def _one(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int, stop: Sequence[str] | None, keep_stop: bool) -> tuple[str, int]:
        # top_k is not in OpenAI's API; vLLM, TGI and llama.cpp read it from the request body
        extra = {"top_k": top_k} if top_k and temperature > 0 else None
        request = dict(prompt=prompt, max_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p if temperature > 0 else 1.0, seed=seed, extra_body=extra)
        if stop:
            return self._streamed(stop, keep_stop, **request)
        r = self._complete(**request)
        used = r.usage.completion_tokens if r.usage else 0
        return r.choices[0].text or "", used

    def _streamed(self, stop: Sequence[str], keep_stop: bool, **request) -> tuple[str, int]:
        """The answer streamed up to its first stop string (found as the local backend finds it),
        and the pieces of text received (one per token on vLLM's and llama.cpp's servers).  The
        stream is closed there, which ends the generation on the server."""
        for attempt in range(self.cfg.retries + 1):
            stream = self._complete(stream=True, **request)
            text, pieces, finished = "", 0, False
            try:
                for chunk in stream:
                    if chunk.model != self.model:
                        raise GlotkitError(f"generate.models: asked {self.url} for '{self.model}', "
                                           f"it answered as '{chunk.model}'")
                    if not chunk.choices:
                        continue
                    finished = chunk.choices[0].finish_reason is not None
                    piece = chunk.choices[0].text or ""
                    if not piece:
                        continue
                    text += piece
                    pieces += 1
                    cut = cut_at_stop(text, stop, keep_stop)
                    if cut is not None:
                        return cut, pieces
                if not finished:  # the last piece of an answer says why it ends
                    raise _BrokenStream("the stream ended before the answer did")
                return text, pieces
            except self.broken as err:  # broken off mid-answer
                if attempt == self.cfg.retries and isinstance(err, _BrokenStream):
                    raise GlotkitError(
                        f"generate: {self.url} ended the stream of an answer before the answer ended "
                        f"({self.cfg.retries + 1} tries, model '{self.model}'); llama-cpp-python's server cuts a "
                        "stream off when another request comes in: start it with --interrupt_requests false, or "
                        "set generate.concurrency: 1") from None
                if attempt == self.cfg.retries:
                    raise self._unreachable(err) from None
                time.sleep(min(8.0, 0.5 * 2**attempt))
            finally:
                stream.close()
        raise AssertionError("unreachable")

    def _echo(self, text: str) -> tuple[list[int], list[str], list[float | None]]:
        """(character offsets, tokens, log-probabilities) of ``text``'s tokens as the server reads them."""
        r = self._complete(" when asked for prompt log-probabilities (echo + logprobs; llama-cpp-python's server "
                           "needs --logits_all true)", prompt=text, max_tokens=1, temperature=0.0, echo=True,
                           logprobs=1)
        lp = r.choices[0].logprobs
        offsets = list(getattr(lp, "text_offset", None) or [])
        values = list(getattr(lp, "token_logprobs", None) or [])
        tokens = list(getattr(lp, "tokens", None) or [])
        if not offsets or len(offsets) != len(values) or len(tokens) != len(values):
            raise GlotkitError(f"generate: {self.url} returned no prompt log-probabilities for model '{self.model}' "
                               "(the loglik mode needs echo with logprobs and text offsets; use suite.mode: generate, "
                               "or distill.labels: generate)")
        # the offsets count characters of the echoed text, which may start with the BOS token's text
        shift = (r.choices[0].text or "").find(text)
        if shift < 0:
            raise GlotkitError(f"generate: {self.url} echoed another text than the prompt for model '{self.model}'; "
                               "cannot place the continuation's tokens (use suite.mode: generate, or distill.labels: "
                               "generate)")
        return [o - shift for o in offsets], tokens, values

    def _loglik(self, context: str, continuation: str) -> float:
        offsets, _, values = self._echo(context + continuation)
        start, end = len(context), len(context) + len(continuation)
        picked = [v for o, v in zip(offsets, values) if start <= o < end]
        if not picked or any(v is None for v in picked):
            raise GlotkitError(f"generate: {self.url} gave no log-probability for the continuation "
                               f"{continuation!r} of model '{self.model}'")
        return float(sum(picked))

    def check_logliks(self, context: str, tolerance: float = 0.1) -> None:
        """The server's prompt log-probabilities agree with its generation: the token it generates
        after ``context`` gets the same log-probability when sent back as part of the prompt."""
        r = self._complete(" when asked for log-probabilities", prompt=context, max_tokens=1, temperature=0.0,
                           logprobs=1)
        lp = r.choices[0].logprobs
        generated = list(getattr(lp, "token_logprobs", None) or [])
        token = (list(getattr(lp, "tokens", None) or []) or [r.choices[0].text])[0]
        if not token or "\ufffd" in token or not generated or generated[0] is None:
            return  # nothing (or a piece of a character) to compare with: no evidence, asked again later
        offsets, tokens, values = self._echo(context + token)
        at = [k for k, o in enumerate(offsets) if len(context) <= o < len(context) + len(token)]
        if len(at) != 1 or offsets[at[0]] != len(context) or tokens[at[0]] != token or values[at[0]] is None:
            return  # read back, the text splits into other tokens: no evidence, asked again later
        want, got = float(generated[0]), float(values[at[0]])
        if abs(got - want) > tolerance:
            raise GlotkitError(
                f"generate: {self.url} ('{self.model}') gives prompt log-probabilities that disagree with its own "
                f"generation ({token!r}: {got:.3f} read in the prompt, {want:.3f} when generated), so the loglik "
                "mode would score wrongly; llama-cpp-python's server has this bug (abetlen/llama-cpp-python#1983). "
                "Use suite.mode: generate (--mode generate), or a server whose prompt log-probabilities are right "
                "(vLLM)")
        self.logliks_checked = True

    def logliks(self, contexts: Sequence[str], continuations: Sequence[str], *, progress: bool = True,
                desc: str = "loglik") -> list[list[float]]:
        """Sum of log-probabilities of each continuation after each context (one request each,
        ``concurrency`` in flight), as ``option_logliks`` gives them for the local model."""
        from tqdm.auto import tqdm

        for context in contexts[:8]:  # until one gives evidence (a whole token generated and read back)
            if self.logliks_checked:
                break
            self.check_logliks(context)
        jobs = [(i, j) for i in range(len(contexts)) for j in range(len(continuations))]
        out = [[0.0] * len(continuations) for _ in contexts]
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool, \
                tqdm(total=len(contexts), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True) as bar:
            futures = [pool.submit(self._loglik, contexts[i], continuations[j]) for i, j in jobs]
            try:
                for (i, j), fut in zip(jobs, futures):
                    out[i][j] = fut.result()
                    if j == len(continuations) - 1:
                        bar.update(1)
            finally:
                for fut in futures:
                    fut.cancel()
        return out

    @classmethod
    def connect(cls, cfg: GenerateSection, role: str, log: Callable[[str], None], what: str,
                tokenizer=None) -> "ServerGenerator":
        """The server's model for ``role`` (``cfg.models[role]``, at ``cfg.url_of(role)``), checked
        to be served."""
        server = cls(cfg, cfg.models[role], cfg.url_of(role), tokenizer=tokenizer)
        log(f"{what}: asking {server.url} for its models (each request waits up to {cfg.timeout:g} s, "
            f"{_tries(cfg.retries + 1)})")
        server.check()
        log(f"{what}: the {role} model is served by {server.url} as '{server.model}'")
        return server

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, stop: Sequence[str] | None = ("\n",), keep_stop: bool = False,
                 progress: bool = True, desc: str = "generate",
                 on_batch: Callable[[list[int], list[str]], None] | None = None) -> tuple[list[str], int]:
        """Texts for ``prompts`` in input order and the number of tokens generated (with stop
        strings: the pieces streamed up to the stop); ``on_batch`` gets each answer as it arrives
        (in the calling thread).  Prompt ``i`` is sampled with seed ``seed * 1_000_003 + i``."""
        from tqdm.auto import tqdm

        out: list[str] = [""] * len(prompts)
        produced = 0
        bar = tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        pending = {}
        nxt = 0
        try:
            while nxt < len(prompts) or pending:
                while nxt < len(prompts) and len(pending) < self.cfg.concurrency:
                    pending[pool.submit(self._one, prompts[nxt], max_new_tokens, temperature, top_p, top_k,
                                        seed * 1_000_003 + nxt, stop, keep_stop)] = nxt
                    nxt += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    text, used = fut.result()  # a GlotkitError stops the stage; answers so far are kept
                    out[i] = text
                    produced += used
                    if on_batch:
                        on_batch([i], [text])
                    bar.update(1)
        finally:
            bar.close()
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
        return out, produced

    def _texts(self, prompts: Sequence[list[int]], texts: Sequence[str] | None) -> list[str]:
        if texts is not None:
            return list(texts)
        if self.tokenizer is None:
            raise ValueError("ServerGenerator: token-id prompts need the model's tokenizer (tokenizer=...)")
        return [prompt_text(self.tokenizer, ids) for ids in prompts]

    def greedy(self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
               stop: Sequence[str] | None = ("\n",), texts: Sequence[str] | None = None, progress: bool = True,
               desc: str = "generate", on_batch: Callable[[list[int], list[str]], None] | None = None):
        """Greedy answers to the prompts' text (``batch_size`` is the local backend's: here
        ``generate.concurrency`` requests are in flight)."""
        from glotkit.generate import Generations

        return Generations(*self.generate(self._texts(prompts, texts), max_new_tokens=max_new_tokens, stop=stop,
                                          progress=progress, desc=desc, on_batch=on_batch))

    def sample(self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
               temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
               stop: Sequence[str] | None = ("\n",), keep_stop: bool = False, texts: Sequence[str] | None = None,
               progress: bool = True, desc: str = "generate",
               on_batch: Callable[[list[int], list[str]], None] | None = None):
        """Sampled answers (prompt ``i`` with seed ``seed * 1_000_003 + i``)."""
        from glotkit.generate import Generations

        return Generations(*self.generate(self._texts(prompts, texts), max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                          keep_stop=keep_stop, progress=progress, desc=desc, on_batch=on_batch))

    def option_logliks(self, prompts: Sequence[list[int]], options: Sequence[str], *, batch_size: int = 8,
                       texts: Sequence[str] | None = None, progress: bool = True,
                       desc: str = "loglik") -> list[list[float]]:
        """:meth:`logliks` of each option after each prompt's text."""
        return self.logliks(self._texts(prompts, texts), list(options), progress=progress, desc=desc)

