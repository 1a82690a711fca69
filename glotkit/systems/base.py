"""What a system is, what a stage is, and the run a stage works in.

A *system* (QA with LoRA, continued pretraining, XL-LoRA, HIPE distillation, ...) is a module of
``glotkit/systems/`` holding an object that satisfies :class:`System`: its recipe schema, its
stages, its CLI verbs, a check that runs before any model is loaded, and a summary of its
headline metrics.  There is no base class to inherit; the registry (``glotkit/systems/__init__``)
only asks for these attributes.  :mod:`glotkit.systems.runner` runs any system's stages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from glotkit.config import RecipeBase
from glotkit.logs import say

Log = Callable[[str], None]


class RunFolder:
    """The paths of a run folder, each named once.  Systems extend it with their own outputs
    (``eval_tuned``, ``synth``, ...) as properties, so writers and readers (the report, sweeps)
    share one name for each file."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __truediv__(self, part: str) -> Path:
        return self.root / part

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    config = property(lambda self: self.root / "config.yaml", doc="the fully resolved recipe")
    versions = property(lambda self: self.root / "versions.json", doc="library versions and the device")
    report = property(lambda self: self.root / "report.md", doc="the human-readable report")
    lock = property(lambda self: self.root / ".lock", doc="the process that owns the folder")
    stage_records = property(lambda self: self.root / "stages.json",
                             doc="what each finished stage was made from (settings, input hashes)")

    def read_json(self, path: Path) -> Any:
        """A JSON file of the run, or None when it is not there (yet)."""
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def read_jsonl(self, path: Path) -> list[dict]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class Stage:
    """One step of a system: ``run`` makes its outputs; ``done`` says they are complete (the
    runner then skips it); ``settings`` and ``inputs`` say what it was made from — when a finished
    stage's recorded settings or input-file hashes differ from the recipe's, its ``outputs`` are
    moved aside (``NAME.previous-N``, never deleted) and it runs again.  ``every_process``: in a
    multi-process launch every process runs it (training); other stages run on process 0 only."""

    name: str
    run: Callable[["Run"], None]
    done: Callable[["Run"], bool] = lambda run: False
    settings: Callable[["Run"], dict] | None = None
    inputs: Callable[["Run"], Sequence[Path]] | None = None
    outputs: Callable[["Run"], Sequence[Path]] | None = None
    every_process: bool = False
    metrics: Callable[["Run"], dict | None] | None = None  # its figures, for experiment trackers


@dataclass
class Run:
    """What a stage works with: the recipe, its run folder, the process group, the result of the
    system's check, and a place for what stages share within one process (a loaded model)."""

    recipe: RecipeBase
    folder: RunFolder
    log: Log = say
    progress: bool = True
    parallel: Any = None  # glotkit.train.distributed.Parallel
    checked: Any = None  # what the system's check returned (e.g. data it read)
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tool:
    """A command under a system's verb that takes no recipe (``glotkit distill score GOLD PRED``):
    ``arguments`` adds its arguments to its argparse parser, ``run`` runs it on the parsed
    arguments and returns the exit status (errors the user can fix: raise GlotkitError)."""

    help: str
    arguments: Callable[[Any], None]
    run: Callable[[Any], int]


@dataclass(frozen=True)
class Verb:
    """A CLI verb of a system: ``glotkit NAME [WHAT] RECIPE`` runs these stages of the recipe.
    ``choices`` maps WHAT to stages for verbs that take one (``glotkit distill compare``);
    ``tools`` maps WHAT to commands that need no recipe (``glotkit distill score``)."""

    name: str
    help: str
    stages: tuple[str, ...] = ()
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    launchable: bool = False  # takes --launcher accelerate
    tools: dict[str, Tool] = field(default_factory=dict)


class System(Protocol):
    """A system glotkit runs from a recipe (``system: NAME``)."""

    name: str  # the recipe's ``system:``
    title: str  # for logs and reports
    schema: type[RecipeBase]  # its recipe: the shared base plus its own sections
    folder_type: type[RunFolder]  # its run folder's paths
    verbs: Sequence[Verb]  # its own CLI verbs, and 'train' (which stages `glotkit train` runs)
    result_neutral: Sequence[str]  # dotted keys that may change on an existing run folder
    redone_by_settings: Sequence[str]  # prefixes of keys whose stages record and redo their settings
    multi_process: bool  # whether its training runs in a launch of several processes

    def stages(self, recipe: RecipeBase) -> Sequence[Stage]:
        """Every stage the system knows, in the order they run."""

    def check(self, recipe: RecipeBase, folder: RunFolder, log: Log) -> Any:
        """Fail on bad input before any model is loaded; the result is handed to the stages."""

    def summary(self, folder: RunFolder) -> dict[str, Any]:
        """The headline figures of a finished run (sweeps tabulate them); {} when not done."""
