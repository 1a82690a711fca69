"""The systems glotkit runs from a recipe, one module each, and the one registry that names them.

    qa        Romanian contextual QA with LoRA (eval_base -> train -> eval_tuned -> report)
    pretrain  continued pretraining (QLoRA), held-out perplexity, task suite, memory table
    xllora    XL-LoRA: generator adapters -> synthetic triplets -> sentence embeddings
    distill   HIPE-2026 relations: prompt comparison -> teacher -> traces -> students -> table
    sft       instruction and chat fine-tuning: held-out loss and answers before and after

A recipe names its system with ``system:`` (``task:`` is accepted as an older spelling).  A new
system is a module with an object satisfying :class:`glotkit.systems.base.System`, passed to
:func:`register`; the runner, the CLI, ``glotkit validate`` and sweeps then know it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glotkit.config import RecipeBase, apply_override, parse_override, read_recipe_file, relative_to, validate_as
from glotkit.errors import GlotkitError
from glotkit.systems.base import System

_SYSTEMS: dict[str, System] = {}
_BUILTIN = ("qa", "pretrain", "xllora", "distill", "sft")  # modules of this package, each with a SYSTEM


def register(system: System) -> System:
    """Make a system known by its name (a later registration of the same name replaces it)."""
    _builtins()
    _SYSTEMS[system.name] = system
    return system


def _builtins() -> None:
    if not all(name in _SYSTEMS for name in _BUILTIN):
        import importlib

        for name in _BUILTIN:
            _SYSTEMS.setdefault(name, importlib.import_module(f"glotkit.systems.{name}").SYSTEM)


def systems() -> dict[str, System]:
    """Every registered system by name."""
    _builtins()
    return dict(_SYSTEMS)


def get_system(name: str) -> System:
    _builtins()
    if name not in _SYSTEMS:
        raise GlotkitError(f"system: '{name}' is not a system (systems: {', '.join(_SYSTEMS)})")
    return _SYSTEMS[name]


def system_of(recipe: RecipeBase) -> System:
    return get_system(recipe.system)


def _system_name(raw: dict[str, Any], where: str) -> str:
    """The recipe's system, with ``task:`` taken as its older name (moved to ``system`` in ``raw``)."""
    if "task" in raw:
        old = raw.pop("task")
        if "system" in raw and raw["system"] != old:
            raise GlotkitError(f"{where}: system: '{raw['system']}' and task: '{old}' disagree; give only system")
        raw.setdefault("system", old)
    name = raw.get("system", "qa")
    if not isinstance(name, str):
        raise GlotkitError(f"{where}: system: must be a name, got {name!r}")
    return name


def _elsewhere(own: type[RecipeBase]):
    """Which other system a top-level section belongs to (for a clearer unknown-key error)."""
    def find(key: str) -> str | None:
        if key in own.model_fields:
            return None
        owners = [n for n, s in systems().items() if key in s.schema.model_fields]
        return f"system '{owners[0]}'" if owners else None

    return find


def validate_recipe(raw: dict[str, Any], where: str = "recipe") -> RecipeBase:
    """Validate plain recipe data against its system's schema (one-line errors)."""
    if not isinstance(raw, dict):
        raise GlotkitError(f"{where}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw = dict(raw)
    schema = get_system(_system_name(raw, where)).schema
    return validate_as(schema, raw, where, elsewhere=_elsewhere(schema))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeBase:
    """Read a recipe file, apply ``key=value`` overrides, validate against its system's schema.

    Relative paths written in the file are taken relative to the file's folder; paths given with
    ``--set`` are taken relative to the current directory.
    """
    path = Path(path)
    raw = read_recipe_file(path)
    schema = get_system(_system_name(raw, str(path))).schema
    schema.resolve_paths(raw, relative_to(path.parent))
    for item in overrides or []:
        key_path, value = parse_override(item)
        if key_path == ["task"]:
            key_path = ["system"]
        apply_override(raw, key_path, value)
    return validate_recipe(raw, where=str(path))
