"""The recipe schema: one YAML file describes a whole run.

A recipe is validated when it is loaded, so a typo or a bad value fails before any model is
touched, with a one-line message naming the file, the field and the value.  ``--set key=value``
overrides are applied on top of the file before validation.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from glotkit.errors import GlotkitError
from glotkit.languages import language_code


def template_fields(text: str) -> list[str]:
    """The placeholders of a ``str.format`` template, in order; a lone brace, an empty ``{}`` or a
    placeholder that is not a plain field name (``{a.b}``, ``{0}``) is a ValueError that says so."""
    import string

    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as err:
        raise ValueError(f"{err} (write '{{{{' or '}}}}' for a literal brace)") from None
    out = []
    for _, name, spec, _conv in parts:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"placeholder {{{name}}} is not a field name (write '{{{{' or '}}}}' for a literal brace)")
        if spec and ("{" in spec):
            raise ValueError(f"placeholder {{{name}}}: nested braces in its format are not supported")
        out.append(name)
    return out


def _check_template(v: str, allowed: tuple[str, ...], needed: str) -> str:
    fields = template_fields(v)
    unknown = [f for f in fields if f not in allowed]
    if unknown:
        raise ValueError(f"unknown placeholder {{{unknown[0]}}} (known: {', '.join('{' + a + '}' for a in allowed)})")
    if needed not in fields:
        raise ValueError(f"must contain {{{needed}}}")
    return v


def folder_name(v: str) -> str:
    """A name that becomes a folder: plain characters only."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*", v):
        raise ValueError(f"must be a plain folder name (letters, digits, . _ - = , +), got {v!r}")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """Which model to adapt: a registry name, a local Hugging Face folder, or a hub id."""

    name: str = "gemma-3-270m"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    chat_template: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    # QLoRA: base weights in 4-bit NF4 through bitsandbytes (pip install 'glotkit[quant]')
    quantization: Literal["none", "nf4"] = "none"
    double_quant: bool = False


class DataSection(_Section):
    """Where the (context, question, answer) examples come from and how to split them."""

    train: str | None = None
    test: str | None = None
    format: Literal["auto", "squad", "jsonl", "csv", "hf"] = "auto"
    context_field: str = "context"
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str = "id"
    test_ratio: float = Field(0.2, gt=0.0, lt=1.0)
    language: str = "ro"  # ISO 639 code or a known name: Romanian letter fixes, English articles in EM/F1
    max_train: StrictInt | None = Field(None, gt=0)
    max_test: StrictInt | None = Field(None, gt=0)

    _language = field_validator("language")(classmethod(lambda cls, v: language_code(v)))


class PromptSection(_Section):
    """How an example becomes text: the prompt, and the target the model learns to write."""

    template: str = "Context: {context}\nQuestion: {question}\nAnswer:"
    target: str = " {answer}\n"
    answer_marker: str = "Answer:"

    @field_validator("template")
    @classmethod
    def _needs_question(cls, v: str) -> str:
        return _check_template(v, ("context", "question"), "question")

    @field_validator("target")
    @classmethod
    def _needs_answer(cls, v: str) -> str:
        return _check_template(v, ("answer",), "answer")


class LoraSection(_Section):
    """LoRA adapter settings.  ``alpha`` may be a number or tied to the rank: ``"4r"``."""

    r: StrictInt = Field(8, gt=0)
    alpha: Union[float, str] = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[list[str], str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    # PEFT's variants, passed through: DoRA (weight-decomposed), rank-stabilised scaling alpha/sqrt(r),
    # the initialisation (default: A Kaiming-uniform, B zero; pissa/olora start from the weights' own
    # principal directions and the saved adapter is converted to plain LoRA of rank 2r for the
    # original base model), whole modules trained and saved beside the adapter (e.g. [lm_head]),
    # and token rows of the embedding trained on their own (ids; for new or language-specific tokens)
    use_dora: bool = False
    use_rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    modules_to_save: list[str] = Field(default_factory=list)
    trainable_tokens: list[StrictInt] = Field(default_factory=list)

    @field_validator("alpha")
    @classmethod
    def _alpha_form(cls, v: float | str) -> float | str:
        if isinstance(v, str) and not re.fullmatch(r"\s*\d+(\.\d+)?\s*\*?\s*r\s*", v):
            raise ValueError(f"must be a number or a multiple of the rank like '4r', got {v!r}")
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            v = v.strip()
            if v == "all-linear":
                return v
            v = [p.strip() for p in v.split(",") if p.strip()]
        if not v:
            raise ValueError("must name at least one module")
        return v

    @field_validator("trainable_tokens")
    @classmethod
    def _token_ids(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("token ids must be ≥ 0")
        return sorted(set(v))

    def changes_base(self) -> bool:
        """Whether the initialisation rewrites the base weights (PiSSA, OLoRA): the base model is
        then the residual while the adapter is on, and must be loaded afresh to be used alone."""
        return self.init in ("pissa", "olora")

    def resolved_alpha(self) -> float:
        """The alpha value, with a rank-tied form like '4r' multiplied out."""
        if isinstance(self.alpha, str):
            return float(self.alpha.replace("*", "").strip()[:-1].strip()) * self.r
        return float(self.alpha)


class TrainSection(_Section):
    """The training loop: optimisation, batching, checkpoints."""

    lr: float = Field(1e-4, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: StrictInt | None = Field(None, gt=0)
    batch_size: StrictInt = Field(4, gt=0)
    grad_accum: StrictInt = Field(1, gt=0)
    max_length: StrictInt = Field(512, gt=8)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    optimizer: Literal["adamw", "paged_adamw"] = "adamw"
    too_long: Literal["drop", "truncate_context"] = "drop"
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    # split each batch into forward passes of at most this many (padded) tokens: same loss and
    # gradients, a fraction of the activation memory; null = the whole batch in one pass
    max_tokens_per_forward: StrictInt | None = Field(1024, gt=0)
    # questions about the same context share one computation of it (same loss and gradients);
    # batches then hold questions of the same context together
    share_prefix: bool = True
    checkpoint_every: StrictInt = Field(25, gt=0)
    # experiment trackers for the steps and each stage's metrics (any of tensorboard, mlflow,
    # wandb, trackio; offline: files under the run folder's tracking/); none by default
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(default_factory=list)


class EvalSection(_Section):
    """Generation settings for evaluation."""

    max_new_tokens: StrictInt = Field(32, gt=0)
    batch_size: StrictInt = Field(8, gt=0)
    limit: StrictInt | None = Field(None, gt=0)


class GenerateSection(_Section):
    """Where generation runs: the local model (default) or an OpenAI-compatible server (vLLM, TGI,
    llama.cpp's server) that serves the same models.  With a server, the QA evaluation stages and
    the task suite, XL-LoRA's synthesis, and the distillation's prompt comparison, traces and
    evaluation send their prompts (text, the same prompts as the local backend) to ``base_url``
    and parse the answers as usual; ``models`` names what the server calls each model of the run."""

    backend: Literal["local", "openai"] = "local"
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    # role -> served model name: base (the model as loaded), tuned (the run's adapter, e.g. a
    # LoRA served by name with `vllm serve MODEL --enable-lora --lora-modules NAME=runs/NAME/adapter`);
    # XL-LoRA: positive and negative (the two generator adapters); distillation: base (the
    # teacher's base model), teacher (its adapter), student.NAME (a student's adapter),
    # student.NAME.base (that student's base model, untuned), compare.MODEL (a compared model
    # other than the teacher's base); an evaluation row whose role has no served name runs locally
    models: dict[str, str] = Field(default_factory=dict)
    # role -> the URL of the server of that role's model, where it is not base_url (vLLM serves
    # one base model, with its adapters, per server)
    base_urls: dict[str, str] = Field(default_factory=dict)
    api_key_env: str | None = None  # environment variable holding the key; none for a local server
    concurrency: StrictInt = Field(4, gt=0)  # requests in flight
    retries: StrictInt = Field(3, ge=0)  # per request, with exponential backoff
    timeout: float = Field(120.0, gt=0)  # seconds per request
    # the local backend's generation batches: as many prompts as fit in batch_tokens (rows x
    # (padded prompt + new tokens): the key/value cache a batch holds), at most max_rows;
    # batch_tokens 0: each stage's batch_size prompts a batch
    batch_tokens: StrictInt = Field(16384, ge=0)
    max_rows: StrictInt = Field(64, gt=0)
    # local generation chooses only among the tokens these files/folders use (a corpus of the
    # language the model writes; .txt/.jsonl/TEI .xml, like pretrain.corpus), the prompts' own
    # tokens and end-of-sequence: the LM head runs on those rows only (faster decoding; the
    # same greedy text wherever the whole head's choice is among them). Empty: the whole head.
    vocab_corpus: list[str] = Field(default_factory=list)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v):
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"'{v}' is not an http(s) URL")
        return v.rstrip("/") if v else v

    @field_validator("base_urls")
    @classmethod
    def _urls(cls, v):
        return {role: cls._url(url) for role, url in v.items()}

    def url_of(self, role: str) -> str | None:
        return self.base_urls.get(role, self.base_url)


class SuiteSection(_Section):
    """The task suite (stage ``suite``): base and adapted model on the same tasks and shots."""

    tasks: list[str] = Field(default_factory=lambda: ["sentiment", "nli", "emotion", "sts", "legal-mcq", "qa"])
    shots: list[StrictInt] = Field(default_factory=lambda: [0, 3])
    mode: Literal["loglik", "generate"] = "loglik"
    limit: StrictInt | None = Field(None, gt=0)
    seed: StrictInt = 1234
    # k-shot rows are also run with these demonstration seeds; the table shows the range of scores
    shot_seeds: list[StrictInt] = Field(default_factory=list)
    batch_size: StrictInt = Field(8, gt=0)
    models: list[Literal["base", "tuned"]] = Field(default_factory=lambda: ["base", "tuned"])
    data_root: str | None = None  # default: ../shared/data beside the checkout
    task_files: list[str] = Field(default_factory=list)  # YAML files of user tasks
    task_data: dict[str, str] = Field(default_factory=dict)  # task -> data file (e.g. summarization)

    @field_validator("shots")
    @classmethod
    def _shots(cls, v):
        if not v or any(k < 0 for k in v):
            raise ValueError("must be a list of numbers ≥ 0, e.g. [0, 3]")
        return v


class MemorySection(_Section):
    """The memory table (stage ``memory``): M1 after loading, M2 peak generating from a long prompt."""

    modes: list[Literal["fp32", "bf16", "nf4"]] = Field(default_factory=lambda: ["fp32", "bf16", "nf4"])
    prompt_tokens: StrictInt = Field(1000, gt=0)
    new_tokens: StrictInt = Field(16, gt=0)


class RecipeBase(_Section):
    """What every system's recipe has: a name (its run folder), the system, a seed, the model and
    its adapter, the training loop, where generation runs, the stages to run, and a sweep grid.
    Each system extends it with its own sections (see ``glotkit/systems/``)."""

    name: str = "run"
    system: str = "qa"
    seed: StrictInt = 42
    runs_dir: str = "runs"
    model: ModelSection = Field(default_factory=ModelSection)
    # lora: train a LoRA adapter (the lora section); full: train every weight of the model (small
    # models; the run folder then holds the whole tuned model in model/ instead of adapter/)
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    stages: list[str] = Field(default_factory=list)  # empty: the system's default stages
    # for `glotkit sweep`: dotted key -> list of values, e.g. {"lora.r": [1, 2, 4, 8]}
    sweep: dict[str, list[Any]] = Field(default_factory=dict)

    # filled in by each system's schema
    default_stages: ClassVar[tuple[str, ...]] = ()
    all_stages: ClassVar[tuple[str, ...]] = ()
    path_keys: ClassVar[tuple[tuple[str, str], ...]] = ()  # (section, key) of file paths: relative to the recipe
    served: ClassVar[bool] = False  # whether generate.backend 'openai' serves some of its stages

    _safe_name = field_validator("name")(classmethod(lambda cls, v: folder_name(v)))

    def model_post_init(self, __context) -> None:
        if not self.stages:
            self.stages = list(self.default_stages)
        bad = [st for st in self.stages if st not in self.all_stages]
        if bad:
            raise GlotkitError(f"stages: '{bad[0]}' is not a stage of system '{self.system}' "
                               f"(stages: {', '.join(self.all_stages)})")
        gen_cfg = self.generate
        roles = self.served_roles()
        for field, mapping in (("models", gen_cfg.models), ("base_urls", gen_cfg.base_urls)):
            for role in mapping:
                if role not in roles:
                    raise GlotkitError(f"generate.{field}.{role}: not a model role of system '{self.system}' "
                                       f"(roles: {', '.join(roles)})")
        if gen_cfg.backend == "openai":
            if not self.served:
                raise GlotkitError(f"generate.backend: 'openai' serves QA evaluation and the task suite, XL-LoRA's "
                                   f"synthesis and the distillation stages; system '{self.system}' generates with the "
                                   "local model")
            for stage, role in self.served_needs():
                if role not in gen_cfg.models:
                    raise GlotkitError(f"generate.models.{role}: the served name of the {role} model is needed "
                                       f"for stage {stage} with backend 'openai'")
            for role in [r for _, r in self.served_needs()] + list(gen_cfg.models):
                if not gen_cfg.url_of(role):
                    raise GlotkitError(f"generate.base_url: needed with backend 'openai' for the {role} model "
                                       f"(or generate.base_urls.{role}), e.g. http://127.0.0.1:8000/v1")

    def served_roles(self) -> list[str]:
        """The roles ``generate.models`` may name (see :class:`GenerateSection`)."""
        return ["base", "tuned"]

    def served_needs(self) -> list[tuple[str, str]]:
        """(stage, role) of each model a stage of this recipe generates with on a server."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, every default filled in (the stages and the sweep grid last)."""
        out = self.model_dump(mode="json")
        for key in ("stages", "sweep"):
            out[key] = out.pop(key)
        return out

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @classmethod
    def resolve_paths(cls, raw: dict[str, Any], resolve: Callable[[str], str]) -> None:
        """Make the file paths of ``raw`` (plain recipe data) relative to the recipe's folder."""
        for section, key in cls.path_keys + (("generate", "vocab_corpus"),):
            sec = raw.get(section)
            if isinstance(sec, dict) and key in sec:
                value = sec[key]
                if isinstance(value, dict):
                    sec[key] = {k: resolve(v) for k, v in value.items()}
                else:
                    sec[key] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)


# --------------------------------------------------------------------------- loading


# names users bring from PEFT/transformers/other tools -> ours
_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "targets": "target_modules",
    "target": "target_modules", "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length", "lr_scheduler_type": "scheduler", "model_name": "name", "path": "name",
    "steps": "max_steps", "warmup": "warmup_ratio",
}


def check_unknown_keys(raw: dict[str, Any], model: type[BaseModel], where: str, prefix: str = "",
                       elsewhere: Callable[[str], str | None] | None = None) -> None:
    """Reject keys the schema does not know, suggesting the closest known one (``elsewhere``
    names the other schema a top-level key belongs to, if any)."""
    fields = dict(model.model_fields)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            other = elsewhere(str(key)) if elsewhere and not prefix else None
            if other:
                raise GlotkitError(f"{where}: '{dotted}' is a section of {other}, not of this recipe's")
            close = [_SYNONYMS[key]] if _SYNONYMS.get(key) in fields else []
            close = close or difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise GlotkitError(f"{where}: unknown recipe key '{dotted}'{hint}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise GlotkitError(f"{where}: '{dotted}' must be a mapping, got {value!r}")
            check_unknown_keys(value, annotation, where, prefix=f"{dotted}.")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    if "=" not in item:
        raise GlotkitError(f"--set {item!r}: expected key=value, e.g. --set lora.r=4")
    key, _, text = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise GlotkitError(f"--set {item!r}: empty key")
    if path[:2] in (["generate", "models"], ["generate", "base_urls"]) and len(path) > 3:
        path = path[:2] + [".".join(path[2:])]  # a role name holds dots: student.NAME.base
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return path, value


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise GlotkitError(f"--set {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def format_validation_error(err: ValidationError, where: str, raw: dict[str, Any]) -> str:
    """One line for the first error of a pydantic validation: file, field, message, value."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    value: Any = raw
    for part in first["loc"]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            value = first.get("input")
            break
    msg = first["msg"]
    msg = msg.replace("Value error, ", "")
    return f"{where}: {loc}: {msg} (got {value!r})"


def validate_as(schema: type[RecipeBase], raw: dict[str, Any], where: str = "recipe",
                elsewhere: Callable[[str], str | None] | None = None) -> RecipeBase:
    """Validate plain data against one system's schema, raising a one-line :class:`GlotkitError`."""
    check_unknown_keys(raw, schema, where, elsewhere=elsewhere)
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise GlotkitError(format_validation_error(err, where, raw)) from None


class _RecipeLoader(yaml.SafeLoader):
    """yaml's safe loader that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise GlotkitError(f"{self.name}: line {line}: key '{key}' is given twice (first on line {seen[key]})")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, where: str) -> Any:
    """YAML text as plain data (safe types only; a key given twice is refused), one-line errors."""
    loader = _RecipeLoader(text)
    loader.name = where
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise GlotkitError(f"{where}:{line} is not valid YAML: {getattr(err, 'problem', None) or err}") from None
    finally:
        loader.dispose()


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The plain data of a recipe file (a YAML mapping), with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise GlotkitError(f"{path}: recipe file not found" if not path.exists() else f"{path}: not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise GlotkitError(f"{path}: not a text file in UTF-8 (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                           "a recipe is a YAML file") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise GlotkitError(f"{path}: line {line}: NUL byte; a recipe is a YAML text file")
    raw = load_yaml_text(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise GlotkitError(f"{path}: a recipe must be a YAML mapping")
    return copy.deepcopy(raw)


def relative_to(folder: Path) -> Callable[[Any], Any]:
    """A function that makes a relative path string relative to ``folder`` (absolute)."""
    def resolve(value):
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str((folder / value).resolve())
        return value

    return resolve


def dump_recipe(recipe: RecipeBase, path: Path) -> bool:
    """Write the fully resolved recipe as YAML, atomically, and only when it differs from what the
    file holds (a finished run in a read-only folder reruns as a no-op); True when written."""
    from glotkit.io import atomic_write_text

    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
    path = Path(path)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True
