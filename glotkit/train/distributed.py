"""Data-parallel training through accelerate: one recipe, N processes, the same result.

``glotkit run|train|pretrain RECIPE --launcher accelerate --num-processes N`` re-runs the same
command under ``accelerate launch`` (torchrun underneath: gloo on CPU, NCCL on GPUs); running
``accelerate launch [--config_file configs/accelerate/ddp.yaml] -m glotkit train RECIPE`` by hand
does the same.  Inside a launch:

* every process runs the training stage together; each micro-batch of ``train.batch_size``
  examples is split between the processes, so the recipe's batch is the *global* batch and the
  run computes the same steps as one process would (the loss is normalised by the supervised
  tokens of the whole step, summed over the processes);
* DDP launch (``configs/accelerate/ddp.yaml``, or no config): every process holds the whole model,
  ``Accelerator.prepare`` wraps it in DistributedDataParallel, and the gradients are synchronised
  once per optimizer step;
* FSDP launch (``configs/accelerate/fsdp.yaml``, ``fsdp_version: 2``): PyTorch's ``fully_shard``
  (FSDP2) splits every decoder layer and the rest of the model between the processes, so weights,
  gradients and optimizer state of each process are 1/N of the whole.  glotkit applies it itself
  (the same way on GPUs and, for the tests, on the CPU, where accelerate does not shard) and
  reads ``fsdp_reshard_after_forward``, ``fsdp_offload_params`` and
  ``fsdp_transformer_layer_cls_to_wrap`` from the config; checkpoints and the adapter are
  gathered into whole tensors, so they are the same files a single process writes and resume with
  any number of processes.  Every process loads the whole model before it is split;
* only process 0 writes: checkpoints, logs, the adapter, results; after training the other
  processes stop and process 0 runs the remaining stages (evaluation, report) alone.

A checkpoint written by N processes resumes with N processes (each has its own random state).
DeepSpeed is refused: its engine takes the optimizer step itself, on every backward, while
glotkit's loop makes several passes per step.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Sequence

from glotkit.errors import GlotkitError

LAUNCH_ENV = "WORLD_SIZE"


def launched_world() -> int:
    """Number of processes of the launch this process belongs to (1 outside a launch)."""
    try:
        return int(os.environ.get(LAUNCH_ENV, "1"))
    except ValueError:
        return 1


def check_split(batch_size: int, world: int) -> None:
    """Each process needs at least one example of every full micro-batch."""
    if world > batch_size:
        raise GlotkitError(
            f"train.batch_size: {batch_size} examples per micro-batch cannot be split over {world} processes; "
            f"raise train.batch_size to at least {world} (it is the global batch) or use fewer processes"
        )


def check_recipe(recipe, world: int, sharded: bool = False) -> None:
    """What a recipe needs to train in ``world`` processes (checked before launching, and in
    each process of a launch started by hand; whether the recipe's system trains in several
    processes at all is the system's to say)."""
    if sharded and recipe.model.quantization != "none":
        raise GlotkitError(f"model.quantization: {recipe.model.quantization} weights are not sharded by glotkit's "
                           "FSDP; train the 4-bit model data-parallel (configs/accelerate/ddp.yaml)")
    check_split(recipe.train.batch_size, world)


def fsdp_requested() -> bool:
    """Whether this launch asks for FSDP (accelerate passes its config on in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def read_launch_config(config_file: str) -> bool:
    """Check an accelerate config before launching with it; returns whether it asks for FSDP."""
    import yaml

    try:
        cfg = yaml.safe_load(open(config_file, encoding="utf-8")) or {}
    except OSError as e:
        raise GlotkitError(f"--accelerate-config {config_file}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise GlotkitError(f"--accelerate-config {config_file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise GlotkitError(f"--accelerate-config {config_file}: expected a mapping of accelerate settings")
    kind = str(cfg.get("distributed_type", "MULTI_GPU")).upper()
    if kind == "DEEPSPEED":
        raise GlotkitError(f"{config_file}: distributed_type DEEPSPEED {_UNSUPPORTED}")
    if kind != "FSDP":
        return False
    _check_fsdp_version((cfg.get("fsdp_config") or {}).get("fsdp_version", 1), config_file)
    return True


_UNSUPPORTED = ("is not supported by glotkit's training engine (DeepSpeed steps the optimizer on every backward; "
                "glotkit makes several passes per step); use configs/accelerate/ddp.yaml or configs/accelerate/fsdp.yaml")


def _check_fsdp_version(version, where: str) -> None:
    if str(version) != "2":
        raise GlotkitError(f"{where}: fsdp_config.fsdp_version {version}; glotkit shards with FSDP2: set "
                           "fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")


def _env_flag(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes")


def share_of(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's contiguous part of a micro-batch (near-equal sizes, the first parts larger).

    Contiguous, not strided, so that examples about the same context stay together and can still
    share its computation."""
    n = len(batch)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(batch[start : start + base + (1 if rank < extra else 0)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(argv: Sequence[str], num_processes: int, config_file: str | None = None,
                   port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``glotkit ARGV`` in ``num_processes`` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    else:
        # torchrun's launcher; on a machine without GPUs the processes use gloo on the CPU
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cpus = os.cpu_count() or 1
        import torch

        if not torch.cuda.is_available():
            cmd += ["--num_cpu_threads_per_process", str(max(1, cpus // num_processes))]
    cmd += ["--num_processes", str(num_processes), "--main_process_port", str(port or free_port())]
    return cmd + ["-m", "glotkit", *argv]


class Parallel:
    """The processes of a launch, through ``accelerate.Accelerator`` (one process: a no-op)."""

    def __init__(self, accelerator=None, sharded: bool = False):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0
        self.sharded = bool(accelerator) and sharded
        self.kind = "FSDP" if self.sharded else (str(accelerator.distributed_type).split(".")[-1] if accelerator else "single")
        self.ended = False

    @classmethod
    def from_launch(cls) -> "Parallel":
        """The launch this process runs in (``Parallel()`` when there is none)."""
        if launched_world() <= 1:
            return cls()
        try:
            from accelerate import Accelerator
        except ImportError:  # pragma: no cover - accelerate is a core dependency
            raise GlotkitError("distributed training needs accelerate: pip install accelerate") from None
        import torch

        sharded = fsdp_requested()
        if sharded:
            _check_fsdp_version(os.environ.get("FSDP_VERSION", "1"), "accelerate config")
        # without GPUs accelerate only forms a CPU process group (gloo) when told it is on the CPU
        acc = Accelerator(cpu=not torch.cuda.is_available())
        kind = str(acc.distributed_type).split(".")[-1]
        if kind not in ("MULTI_CPU", "MULTI_GPU", "FSDP"):
            raise GlotkitError(f"accelerate config: distributed_type {kind} {_UNSUPPORTED}")
        if acc.num_processes != launched_world():
            raise GlotkitError(f"accelerate formed a group of {acc.num_processes} process(es) in a launch of "
                               f"{launched_world()}; check the accelerate config")
        return cls(acc, sharded=sharded)

    @property
    def device(self):
        return self.accelerator.device if self.accelerator else None

    def shard(self, root, model) -> None:
        """FSDP2 (``fully_shard``) in place: each decoder layer of ``model`` is one unit, the rest
        of ``root`` (embeddings, final norm, LM head; ``root`` runs ``model``) the last.  The
        optimizer must be made afterwards, from the sharded parameters."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        wanted = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
        names = {n.strip() for n in wanted.split(",") if n.strip()} or set(getattr(base, "_no_split_modules", None) or ())
        if not names:
            raise GlotkitError(f"{type(base).__name__}: no decoder layer class to shard by; set "
                               "fsdp_config.fsdp_transformer_layer_cls_to_wrap in the accelerate config")
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers:
            raise GlotkitError(f"fsdp_transformer_layer_cls_to_wrap: no module of class {', '.join(sorted(names))} "
                               f"in {type(base).__name__}")
        kwargs = {"reshard_after_forward": _env_flag("FSDP_RESHARD_AFTER_FORWARD", True),
                  "offload_policy": CPUOffloadPolicy() if _env_flag("FSDP_OFFLOAD_PARAMS", False) else OffloadPolicy()}
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(root, offload_policy=kwargs["offload_policy"])

    def prepare(self, module, optimizer):
        if not self.accelerator or self.sharded:  # (sharded: done by shard())
            return module, optimizer
        return self.accelerator.prepare(module, optimizer)

    def backward(self, loss) -> None:
        if self.accelerator and not self.sharded:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def no_sync(self, module, skip: bool):
        """Accumulate gradients locally (no all-reduce) for this backward pass when ``skip``.
        Sharded gradients are reduced on every pass instead (each process keeps only its part)."""
        if self.accelerator and skip and not self.sharded:
            return self.accelerator.no_sync(module)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm: float) -> None:
        if self.accelerator and not self.sharded:
            self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            import torch

            torch.nn.utils.clip_grad_norm_(params, max_norm)  # (works on sharded DTensor gradients)

    def trainable_state(self, model) -> dict:
        """The trainable parameters as whole CPU tensors, by name; sharded ones are gathered
        (every process must call this, in step)."""
        from torch.distributed.tensor import DTensor

        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                for n, p in model.named_parameters() if p.requires_grad}

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer state to checkpoint.  Sharded: gathered whole and keyed by parameter name
        (every process must call this; only process 0 gets it)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state | {"keyed_by": "name"}

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """Load a checkpoint's optimizer state, whichever way it was written (by position or by
        parameter name), into this process's optimizer (sharded or not)."""
        state = dict(state)
        by_name = state.pop("keyed_by", None) == "name"
        if not by_name and not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not by_name:  # positions -> names, in the optimizer's own order of parameters
            names = {id(p): n for n, p in model.named_parameters()}
            order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
            state = {"state": {order[i]: v for i, v in state["state"].items()},
                     "param_groups": [g | {"params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the processes."""
        if not self.accelerator:
            return list(values)
        import torch

        t = torch.tensor(list(values), dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def most(self, value: int) -> int:
        """The largest ``value`` over the processes."""
        return max(self.gather(value)) if self.accelerator else value

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order (on every process)."""
        if not self.accelerator:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def main_first(self):
        return self.accelerator.main_process_first() if self.accelerator else contextlib.nullcontext()

    def end(self) -> None:
        """Leave the process group (process 0 goes on alone with the remaining stages)."""
        if self.accelerator and not self.ended:
            self.barrier()
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        self.ended = True
