"""What the three training stages share: the seeds, checkpoints that resume a run exactly and never run code, a
guarded optimiser step, the learning-rate schedule, each process's share of an epoch."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np
import torch

from dali import distributed
from dali.errors import TrainingDiverged
from dali.files import atomic_write
from dali.logs import log
from dali.models.checkpoints import CheckpointError, check_torch_archive

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Resumable training state, written atomically (a kill mid-write leaves the previous checkpoint).

    Only tensors, numbers, strings and plain containers go in, so that :func:`load_checkpoint` can read it
    with ``weights_only=True``: a checkpoint from elsewhere cannot run code.
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    atomic_write(path, lambda tmp: torch.save(dict(state, rng=rng), tmp))


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, loaded safely; restores the random generators."""
    if not path.exists():
        return None
    try:
        check_torch_archive(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError for a bad file
        raise CheckpointError(
            f"--resume: '{path}' is not a training checkpoint that loads safely (tensors, numbers and plain "
            f"containers only): {str(error).splitlines()[0]}. Delete it to start over, or use --overwrite"
        ) from None
    rng = state.pop("rng", None)
    if rng:
        random.setstate(rng["python"])
        kind, keys, position, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(rng["torch"])
    return state


def save_training(path: Path, objects: dict[str, Any], **position: Any) -> None:
    """A resumable checkpoint: each object's ``state_dict`` (None stays None) and the run's position."""
    save_checkpoint(path, {name: None if obj is None else obj.state_dict() for name, obj in objects.items()} | position)


def resume_training(path: Path, objects: dict[str, Any]) -> dict[str, Any] | None:
    """Load a :func:`save_training` checkpoint into ``objects``; returns the saved position (None without one)."""
    state = load_checkpoint(path)
    if state is None:
        return None
    for name, obj in objects.items():
        saved = state.pop(name, None)
        if obj is not None:
            obj.load_state_dict(saved)
    return state


def guarded_step(loss, optimizer, params: list, guard: NonFiniteGuard, step: int, max_grad_norm: float, device):
    """One optimiser step, unless the loss is NaN/inf (skipped and counted by ``guard``): backward, gradients
    averaged across processes, clipped to ``max_grad_norm``. Returns the loss averaged across processes, or None."""
    optimizer.zero_grad(set_to_none=True)
    if not guard.check(loss, step):
        return None
    loss.backward()
    distributed.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return distributed.mean_across_ranks(float(loss.detach()), device)


class NonFiniteGuard:
    """Counts steps whose loss is NaN/inf; they are skipped, and the run stops after ``limit`` of them."""

    def __init__(self, limit: int, metrics=None):
        self.limit, self.count, self.metrics = limit, 0, metrics

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """True when the step may proceed; False to skip it. Raises once the limit is passed."""
        value = float(loss.detach())
        if math.isfinite(value):
            return True
        self.count += 1
        log.warning("step %d: non-finite loss (%s), step skipped (%d so far)", step, value, self.count)
        if self.metrics is not None:
            self.metrics.log(step=step, skipped_non_finite=value, skipped_total=self.count)
        if self.count > self.limit:
            raise TrainingDiverged(
                f"{self.count} steps had a non-finite loss (limit --max-non-finite-steps {self.limit}); "
                "the training diverged: try a lower --lr"
            )
        return False


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up for ceil(ratio * total) steps, then cosine decay to 0 (HF's 'cosine', as LLaVA trains)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), max(total_steps, 1))


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """A seeded shuffle per epoch, reproducible after a resume."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def epoch_share(items: Sequence[T], seed: int, epoch: int, context: distributed.Context) -> list[T]:
    """This process's share of the epoch's seeded shuffle of ``items``: every process shuffles the same way, then
    takes its interleaved share, so that together they cover each item once (and one process takes them all)."""
    return distributed.shard([items[i] for i in epoch_order(len(items), seed, epoch)], context)
