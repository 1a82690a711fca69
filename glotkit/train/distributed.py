"""Data-parallel training through accelerate: one recipe, N processes, the same result.

``glotkit run|train|pretrain RECIPE --launcher accelerate --num-processes N`` re-runs the same
command under ``accelerate launch`` (torchrun underneath: gloo on CPU, NCCL on GPUs); running
``accelerate launch [--config_file configs/accelerate/ddp.yaml] -m glotkit train RECIPE`` by hand
does the same.  Inside a launch:

* every process runs the training stage together; each micro-batch of ``train.batch_size``
  examples is split between the processes, so the recipe's batch is the *global* batch and the
  run computes the same steps as one process would (the loss is normalised by the supervised
  tokens of the whole step, summed over the processes);
* the model is wrapped by ``Accelerator.prepare`` (DistributedDataParallel for a DDP launch), the
  gradients are synchronised once per optimizer step;
* only process 0 writes: checkpoints, logs, the adapter, results; after training the other
  processes stop and process 0 runs the remaining stages (evaluation, report) alone.

A checkpoint written by N processes resumes with N processes (each has its own random state).
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


def check_recipe(recipe, world: int) -> None:
    """What a recipe needs to train in ``world`` processes (checked before launching, and in
    each process of a launch started by hand)."""
    if recipe.task not in ("qa", "pretrain"):
        raise GlotkitError(f"task: '{recipe.task}' trains in one process; multi-process training (accelerate) "
                           "runs recipes with task qa or pretrain")
    check_split(recipe.train.batch_size, world)


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

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0
        self.kind = str(accelerator.distributed_type).split(".")[-1] if accelerator else "single"
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

        # without GPUs accelerate only forms a CPU process group (gloo) when told it is on the CPU
        acc = Accelerator(cpu=not torch.cuda.is_available())
        kind = str(acc.distributed_type).split(".")[-1]
        if kind not in ("MULTI_CPU", "MULTI_GPU"):
            raise GlotkitError(f"accelerate config: distributed_type {kind} is not supported by glotkit's training "
                               "engine yet (sharded adapters and optimizer state are not gathered for checkpoints); "
                               "use data-parallel training: configs/accelerate/ddp.yaml")
        if acc.num_processes != launched_world():
            raise GlotkitError(f"accelerate formed a group of {acc.num_processes} process(es) in a launch of "
                               f"{launched_world()}; check the accelerate config")
        return cls(acc)

    @property
    def device(self):
        return self.accelerator.device if self.accelerator else None

    def prepare(self, module, optimizer):
        if not self.accelerator:
            return module, optimizer
        return self.accelerator.prepare(module, optimizer)

    def backward(self, loss) -> None:
        if self.accelerator:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def no_sync(self, module, skip: bool):
        """Accumulate gradients locally (no all-reduce) for this backward pass when ``skip``."""
        if self.accelerator and skip:
            return self.accelerator.no_sync(module)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm: float) -> None:
        if self.accelerator:
            self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            import torch

            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the processes."""
        if not self.accelerator:
            return list(values)
        import torch

        t = torch.tensor(list(values), dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

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
