"""Scale-out on torch.distributed, the engine PyTorch users already run: `torchrun ... -m zeroquant quantize` (env://
rendezvous, gloo on CPU, NCCL on CUDA) or `zeroquant quantize --workers N` (that many local processes over gloo,
started by cli/workers.py).

Work is split by index, so results do not depend on the number of processes: distillation batches (each seeded by
its own index), sensitivity rows (one per layer), and the images of every reconstruction step (gradients summed
over processes). Everything cheap (capture, calibration, GPTQ, bias correction) runs the same on every process, and
process 0 alone exports, verifies and writes. A failure in split work reaches every process as the same error.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zeroquant import errors


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes of one job (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """The indices of `count` work items this process does: every world-th, from its rank."""
        return list(range(self.rank, count, self.world))

    def gather(self, local: dict) -> dict:
        """Every process's {index: result} merged, on every process (a no-op when alone)."""
        if self.world == 1:
            return local
        parts: list = [None] * self.world
        dist.all_gather_object(parts, local)
        return {key: value for part in parts for key, value in part.items()}

    def all_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum the tensors (gradients) over processes, in place."""
        if self.world > 1:
            for tensor in tensors:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def agree(self, ok: bool) -> bool:
        """Whether every process says ok (e.g. found the same cached set)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def run(self, work):
        """work(), returning its result. Alone, its exceptions pass untouched. In a job of several processes, every
        process then raises the first failing process's error (its class and message, and for an unexpected
        exception an InternalError with that process's traceback), so that all of them end with the same exit
        code and the job shows why it failed."""
        if self.world == 1:
            return work()
        try:
            result, failure = work(), None
        except errors.ZeroQuantError as exc:
            result, failure = None, (type(exc).__name__, exc.message, exc.hint, traceback.format_exc())
        except Exception as exc:  # noqa: BLE001  (an internal error: still every process must stop)
            result, failure = None, ("InternalError", f"{type(exc).__name__}: {errors.first_line(exc)}", None,
                                     traceback.format_exc())
        failures: list = [None] * self.world
        dist.all_gather_object(failures, failure)
        rank, failure = next(((r, f) for r, f in enumerate(failures) if f is not None), (None, None))
        if failure is not None:
            kind, message, hint, text = failure
            error = getattr(errors, kind, errors.ZeroQuantError)(message, hint)
            error.traceback_text = f"process {rank}: {text}"
            error.shared = True  # every process raises it: the first one alone needs to say so
            raise error
        return result

    def broadcast(self, value):
        """Process 0's value, on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current(device: str = "auto") -> Workers:
    """The job this process belongs to: torchrun's (or --workers') environment, joined on first use: NCCL with this
    process's local GPU when the job runs on CUDA (`device` auto or cuda), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Workers()
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_leave)
    return Workers(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    """Wait for the others, then close the group: a process that exits with it open aborts in C++ ("terminate
    called without an active exception") and turns a finished job into a failed one."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End this process with `code`. In a job of several processes, close the group, then skip the interpreter's
    teardown: gloo's threads can still abort it in C++ after a clean destroy (seen in CI: exit 250 after the job had
    printed its result)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    _leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main_process() -> bool:
    """Whether this process speaks for the job (prints results and errors): the only one, or rank 0."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0
