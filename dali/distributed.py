"""Plain torch.distributed helpers: one process per GPU under ``torchrun``; a single process otherwise.

Gradients are averaged by hand (``average_gradients``) instead of wrapping modules in DDP: our trainable
parts are spread over several modules around a frozen LLM (a prefix tensor, a projector copy, the encoder
and the scorers with two backward passes restricted by ``inputs=``), which DDP's reducer hooks do not fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """'auto': this rank's GPU, else the CPU; 'cuda' without an index: this rank's GPU; anything else as given."""
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
    return chosen


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun; pick the device (:func:`pick_device`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank, chosen)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_parameters(*modules: torch.nn.Module) -> None:
    """Give every rank rank 0's initial weights (and buffers): the start of training must not depend on rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients over ranks with one all-reduce per dtype (not one per tensor: hundreds of launches).

    A parameter without a gradient on this rank counts as a zero gradient, so every rank reduces the same
    buffer layout.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for parameter in parameters:
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        by_dtype.setdefault(parameter.grad.dtype, []).append(parameter.grad)
    for grads in by_dtype.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(averaged.view_as(grad))


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item() / dist.get_world_size())


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def global_token_mean(total: torch.Tensor, count: torch.Tensor, context: "Context") -> torch.Tensor:
    """A per-process loss whose gradient, averaged over processes, is that of the global per-token mean."""
    return total / sum_across_ranks(count).clamp_min(1) * context.world_size


def gather_records(records: list[dict]) -> list[dict]:
    """Every process's records, in rank order, on every process (the records of this one alone without torchrun)."""
    if not dist.is_initialized():
        return list(records)
    gathered: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(records))
    return [record for part in gathered for record in part]


def loader_workers(limit: int = 16) -> int:
    """Loader processes for each process of a stage: the cores this process may use, shared among the stage's
    processes on this node, less one for the process itself (at most ``limit``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(min(per_process - 1, limit), 0)


def shard(items: Sequence[T], context: Context) -> Sequence[T]:
    """This rank's share, interleaved so that merged outputs can be put back in the input order (a slice: a
    list's share is a list, a ClipList's a view of it)."""
    return items[context.rank :: context.world_size]
