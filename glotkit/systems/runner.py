"""Run any system's stages in its run folder.

* The run folder is made, or checked against the recipe that made it (a changed recipe is
  refused unless the key is result-neutral or belongs to a stage that records its own settings).
* One process owns a run folder at a time: a second ``glotkit run`` on it refuses with one line
  naming the owner; a lock left by a process that died is taken over.
* Each stage of the recipe runs in the system's order: a finished stage is skipped; a finished
  stage whose recorded settings or input-file hashes differ from now has its outputs moved
  aside (``NAME.previous-N``; nothing is deleted) and runs again.
* In a launch of several processes the stages marked ``every_process`` (training) run in every
  process first; then process 0 alone runs the rest, and only process 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from glotkit.config import RecipeBase, dump_recipe
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json, sha256_of_files
from glotkit.logs import say
from glotkit.systems import system_of
from glotkit.systems.base import Run, RunFolder, Stage, System

# keys of every recipe that change how a run is carried out but not its results
_RESULT_NEUTRAL = ("train.checkpoint_every", "train.max_tokens_per_forward", "generate.base_url",
                   "generate.base_urls", "generate.api_key_env", "generate.concurrency", "generate.retries",
                   "generate.timeout", "generate.batch_tokens", "generate.max_rows", "sweep", "runs_dir",
                   "train.report_to")
# stages may be added to (or removed from) a finished run
_ALWAYS_REDONE = ("stages",)


def _diff(old: dict, new: dict, neutral: set[str], redone: tuple[str, ...], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if path in neutral or path.startswith(redone):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, neutral, redone, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def _comparable(old: dict, recipe: RecipeBase) -> dict:
    """A saved config.yaml as the current schema would write it: ``task`` is ``system``, a
    section the recipe's system does not have (older versions wrote all of them) is dropped, and
    a setting added to a section since the run was made takes its default (a new setting at its
    default is no change to the run)."""
    old = dict(old)
    if "task" in old:
        old.setdefault("system", old.pop("task"))
    fields = type(recipe).model_fields
    out = {k: v for k, v in old.items() if k in fields}
    for name, value in out.items():
        factory = fields[name].default_factory
        if isinstance(value, dict) and factory is not None:
            default = factory()
            if hasattr(default, "model_dump"):
                out[name] = {**default.model_dump(mode="json"), **value}
    return out


# what a run folder holds before any stage has produced something
_BOOKKEEPING = {"config.yaml", "versions.json", "stages.json", ".lock"}


def has_outputs(root: Path) -> bool:
    """Whether any stage has written something in the run folder (files other than the recipe, the
    versions, the stage records, the lock and temporary files; empty folders do not count)."""
    for path in root.rglob("*"):
        if path.is_file() and not (path.parent == root and path.name in _BOOKKEEPING) \
                and not (path.name.startswith(".") and path.name.endswith(".tmp")):
            return True
    return False


def prepare_folder(recipe: RecipeBase, system: System, log: Callable[[str], None] = say) -> RunFolder:
    """Create the run folder, or check that an existing one was made with the same recipe.  A
    changed recipe is taken while no stage has produced output yet (a failed start is fixed by
    fixing the recipe); after that it is refused unless the change is result-neutral."""
    folder = system.folder_type(recipe.run_dir())
    saved = folder.config
    if saved.is_file():
        try:
            old = _comparable(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, recipe)
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
            raise GlotkitError(f"{saved}: cannot be read ({type(err).__name__}); "
                               "delete the run folder or give the run a new name (--set name=...)") from None
        changes = _diff(old, recipe.to_dict(), set(_RESULT_NEUTRAL) | set(system.result_neutral),
                        _ALWAYS_REDONE + tuple(system.redone_by_settings))
        if changes and has_outputs(folder.root):
            raise GlotkitError(
                f"{saved}: this run folder was made with a different recipe ({changes[0]}"
                f"{f' and {len(changes) - 1} more' if len(changes) > 1 else ''}); "
                "give the run a new name (--set name=...) or delete the folder"
            )
        if changes:
            log(f"the recipe changed ({changes[0]}{f' and {len(changes) - 1} more' if len(changes) > 1 else ''}) "
                "but no stage has produced output yet: the run folder takes the new recipe")
    else:
        folder.root.mkdir(parents=True, exist_ok=True)
    try:
        dump_recipe(recipe, saved)  # when it changed (result-neutral keys, a failed start's fix)
    except OSError as err:
        raise GlotkitError(f"{saved}: cannot write the run's recipe ({err.strerror or err})") from None
    return folder


def versions(device: str) -> dict:
    """Library versions and the device, for ``versions.json``."""
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "platform": platform.platform(), "device": device,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    for pkg in ("glotkit", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# --------------------------------------------------------------------------- one owner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReadOnlyFolder(GlotkitError):
    """The folder to own cannot be written (a read-only folder or file system)."""


@contextlib.contextmanager
def owned(root: Path, what: str, lock_name: str = ".lock") -> Iterator[None]:
    """Hold the folder ``root`` for this process while the block runs.  A folder held by a live
    process is refused with one line naming it; a lock of a process that is gone is taken over;
    a folder that cannot be written raises :class:`ReadOnlyFolder`."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GlotkitError(f"{root}: cannot be made ({err.strerror or err})") from None
    path = root / lock_name
    if not os.access(root, os.W_OK):
        raise ReadOnlyFolder(f"{root}: cannot be written (read-only)")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                time.sleep(0.1)  # being written by its owner right now, or left half-written
                try:
                    holder = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    holder = {}
            pid = holder.get("pid")
            if isinstance(pid, int) and pid != os.getpid():
                if holder.get("host") not in (None, me["host"]):
                    raise GlotkitError(f"{root}: in use by process {pid} on {holder['host']} ({holder.get('command')}, "
                                       f"since {holder.get('since')}); delete {path} if that process is gone")
                if _alive(pid):
                    raise GlotkitError(f"{root}: in use by process {pid} ({holder.get('command')}, since "
                                       f"{holder.get('since')}); wait for it to end or stop it")
            path.unlink(missing_ok=True)  # its process is gone: take the folder over
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        break
    else:
        raise GlotkitError(f"{path}: could not take the lock")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                path.unlink()


# --------------------------------------------------------------------------- stale outputs


def move_aside(paths: Sequence[Path], log: Callable[[str], None], why: str) -> None:
    """Move existing ``paths`` to ``NAME.previous-N`` (one N for all of them); nothing is deleted."""
    existing = [p for p in paths if p.exists()]
    if not existing:
        return
    n = 1
    while any(p.with_name(f"{p.name}.previous-{n}").exists() for p in existing):
        n += 1
    for p in existing:
        aside = p.with_name(f"{p.name}.previous-{n}")
        shutil.move(str(p), str(aside))
        log(f"{p.name}: {why}; earlier outputs moved to {aside}")


def settle(folder: Path, settings: dict, restart_keys: Sequence[str] | None, log: Callable[[str], None]) -> None:
    """For a stage that keeps its settings in ``folder/settings.json``: a change of a
    ``restart_keys`` key (any key when None) moves the folder aside; any other change only removes
    the stage's 'done' marker (``summary.json``) so that it runs again on what it has."""
    path = folder / "settings.json"
    if folder.is_dir() and path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if not changed:
            return
        if restart_keys is None or any(k in restart_keys for k in changed):
            move_aside([folder], log, f"settings changed ({', '.join(changed)})")
        else:
            (folder / "summary.json").unlink(missing_ok=True)
            log(f"{folder.name}: settings changed ({', '.join(changed)}); continuing on the existing generations")
    elif folder.is_dir() and any(folder.iterdir()) and not path.is_file():
        return  # made before settings were recorded: keep as is
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def _file_hash(path: Path, known: dict) -> str:
    """sha256 of a file, taken from ``known`` (path -> [size, mtime_ns, hash], the stage records'
    memo) when its size and time are unchanged, so that large inputs are read once."""
    st = path.stat()
    memo = known.get(str(path))
    if memo and memo[:2] == [st.st_size, st.st_mtime_ns]:
        return memo[2]
    digest = sha256_of_files([path])
    known[str(path)] = [st.st_size, st.st_mtime_ns, digest]
    return digest


def hash_input(path: Path, known: dict) -> str | None:
    """The content hash of an input: a file's sha256, a folder's over its files' relative names
    and hashes (sorted; hidden files left out), None when it does not exist."""
    import hashlib

    if path.is_file():
        return _file_hash(path, known)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(f"{f.relative_to(path).as_posix()}\0{_file_hash(f, known)}\n".encode())
        return "dir:" + h.hexdigest()
    return None


def _fingerprint(stage: Stage, run: Run, known: dict) -> dict | None:
    if stage.settings is None and stage.inputs is None:
        return None
    out: dict[str, Any] = {}
    if stage.settings is not None:
        out["settings"] = stage.settings(run)
    if stage.inputs is not None:
        files = [Path(p) for p in stage.inputs(run) if p]
        out["inputs"] = {str(p): hash_input(p, known) for p in files}
    return json.loads(json.dumps(out))


def _changed(old: dict, new: dict) -> list[str]:
    """The recorded things that differ now (``part key``).  A key the record does not have yet
    (recorded by an older glotkit), or an input that did not exist when it was recorded (a model
    converted by the stage itself), is not a change: the record is completed."""
    was, now = old.get("settings") or {}, new.get("settings") or {}
    out = [f"settings {k}" for k in sorted(set(was) & set(now)) if was[k] != now[k]]
    was, now = old.get("inputs") or {}, new.get("inputs") or {}
    return out + [f"inputs {k}" for k in sorted(set(was) & set(now)) if was[k] is not None and was[k] != now[k]]


def _what_changed(keys: list[str]) -> str:
    shown = [k if len(k) < 80 else "…" + k[-77:] for k in keys[:2]]
    return ", ".join(shown) + (f" and {len(keys) - 2} more" if len(keys) > 2 else "") or "its record"


def _run_stage(stage: Stage, run: Run, records: dict) -> bool:
    """Run the stage unless it is done and current; whether it ran."""
    known = records.setdefault("_file_hashes", {})
    fp = _fingerprint(stage, run, known)
    if stage.done(run):
        old = records.get(stage.name)
        if fp is None or old is None or old == fp:
            return False
        changed = _changed(old, fp)
        if not changed:  # a record of an older glotkit: completed, nothing to redo
            if run.parallel.is_main:
                records[stage.name] = fp
                atomic_write_json(run.folder.stage_records, records)
            return False
        if stage.outputs is None:
            raise GlotkitError(f"stage {stage.name}: made from other inputs ({_what_changed(changed)})")
        move_aside(list(stage.outputs(run)), run.log, f"stage {stage.name} was made from other inputs "
                                                        f"({_what_changed(changed)})")
    stage.run(run)
    if fp is not None and stage.done(run) and run.parallel.is_main:
        records[stage.name] = fp
        atomic_write_json(run.folder.stage_records, records)
    return True


# --------------------------------------------------------------------------- the runner


def run_recipe(recipe: RecipeBase, log: Callable[[str], None] = say, progress: bool = True) -> Path:
    """Run every stage of the recipe that is not finished (or is stale); return the run folder."""
    from glotkit.train.distributed import Parallel, check_recipe

    system = system_of(recipe)
    par = Parallel.from_launch()
    if par.world > 1:
        if not system.multi_process:
            from glotkit.systems import systems

            raise GlotkitError(f"system: '{recipe.system}' trains in one process; multi-process training (accelerate) "
                               "runs recipes of systems " + ", ".join(n for n, s in systems().items() if s.multi_process))
        check_recipe(recipe, par.world, sharded=par.sharded)
    if not par.is_main:
        log = lambda msg: None  # noqa: E731 - one voice: process 0 speaks and writes
    folder = system.folder_type(recipe.run_dir())
    checked = system.check(recipe, folder, log)
    lock = owned(folder.root, f"glotkit {recipe.system} run '{recipe.name}'") if par.is_main \
        else contextlib.nullcontext()
    held = contextlib.ExitStack()
    try:
        held.enter_context(lock)
    except ReadOnlyFolder as err:
        _finished_read_only(recipe, system, folder, log, checked, err)
        return folder.root
    with held:
        with par.main_first():  # process 0 makes or checks the folder; the others wait and only read
            if par.is_main:
                prepare_folder(recipe, system, log)
        run = Run(recipe, folder, log=log, progress=progress, parallel=par, checked=checked)
        log(f"run '{recipe.name}' in {folder.root}: {system.describe(run)}")
        chosen = set(recipe.stages)
        stages = [s for s in system.stages(recipe) if s.name in chosen]
        records = folder.read_json(folder.stage_records) or {}
        tracker = None
        if recipe.train.report_to and par.is_main:
            from glotkit.train.tracking import Tracker

            tracker = Tracker(list(recipe.train.report_to), folder.root, recipe.name, recipe.to_dict(), log)
            run.shared["tracker"] = tracker
        finished = False
        try:
            if par.world > 1:
                together = [s for s in stages if s.every_process]
                log(f"{par.world} processes ({par.kind}): they train together, then process 0 runs the "
                    "other stages")
                if not any(not s.done(run) for s in together):
                    log("note: training is already done; the other processes have nothing to do")
                for s in together:
                    _run_stage(s, run, records)
                par.end()
                if not par.is_main:
                    return folder.root
                stages = [s for s in stages if not s.every_process]
                run.shared["after_launch"] = True
            for s in stages:
                ran = _run_stage(s, run, records)
                if tracker is not None and ran:
                    _track_stage(tracker, s, run, system)
            finished = True
        finally:
            run.shared.clear()  # models loaded for the stages
            if tracker is not None:
                tracker.close(finished)
    return folder.root


def _track_stage(tracker, stage: Stage, run: Run, system: System) -> None:
    """A stage that ran: its figures (and the system's headline figures) to the trackers."""
    from glotkit.train.tracking import numbers

    figures = stage.metrics(run) if stage.metrics is not None else None
    if figures:
        tracker.log(numbers({k: v for k, v in figures.items() if k != "log"}, f"{stage.name}/"))
    summary = system.summary(run.folder)
    if summary:
        tracker.log(numbers(summary, "summary/"))


def _finished_read_only(recipe: RecipeBase, system: System, folder: RunFolder, log: Callable[[str], None],
                        checked: Any, err: ReadOnlyFolder) -> None:
    """A run folder that cannot be written: fine when the recipe is the one that made it and every
    stage asked for is done (a rerun is then a no-op); else one line saying what would run."""
    saved = folder.config
    if not saved.is_file():
        raise GlotkitError(f"{err}; the run cannot start there") from None
    old = _comparable(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, recipe)
    changes = _diff(old, recipe.to_dict(), set(_RESULT_NEUTRAL) | set(system.result_neutral),
                    _ALWAYS_REDONE + tuple(system.redone_by_settings))
    if changes:
        raise GlotkitError(f"{err}, and the recipe differs from the one that made it ({changes[0]})") from None
    run = Run(recipe, folder, log=log, progress=False, parallel=None, checked=checked)
    records = folder.read_json(folder.stage_records) or {}
    for stage in [s for s in system.stages(recipe) if s.name in set(recipe.stages)]:
        done = stage.done(run) or (stage.name == "report" and folder.report.is_file())
        if done and stage.name in records and _changed(records[stage.name],
                                                        _fingerprint(stage, run, dict(records.get("_file_hashes", {})))):
            done = False
        if not done:
            raise GlotkitError(f"{err}; stage {stage.name} still has to run there") from None
    log(f"run '{recipe.name}' in {folder.root}: every stage is done (the folder is read-only: nothing written)")
