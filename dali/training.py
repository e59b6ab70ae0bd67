"""What the three training stages share: the seeds, checkpoints that resume a run exactly and never run code, a
guarded optimiser step, the learning-rate schedule, each process's share of an epoch."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from dali import distributed
from dali.errors import TrainingDiverged
from dali.files import atomic_write
from dali.logs import log
from dali.models.checkpoints import CheckpointError, check_torch_archive
from dali.progress import progress
from dali.stage_folder import CHECKPOINT

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


class Training:
    """A training stage in progress, as the three training stages keep it: what it trains (each object's state saved
    in the checkpoint, with the stage's own position), its step, its metrics, its non-finite guard and its progress.

    The loop skeleton is :meth:`epochs` (each epoch's remaining batches of this process's share), then, per batch,
    :meth:`advance` and :meth:`log`; :meth:`checkpoint` saves every ``--checkpoint-every`` steps.
    """

    def __init__(self, stage, context: distributed.Context, config, trained: dict[str, Any], total_steps: int):
        self.stage, self.context, self.config, self.trained = stage, context, config, trained
        self.total_steps, self.step, self.last_loss, self.stopped = total_steps, 0, float("nan"), False
        self.metrics = self.guard = self.bar = None

    def resume(self, keep: Callable[[dict, dict], bool] | None = None) -> dict[str, Any]:
        """With ``--resume``, the checkpoint's states loaded into the trained objects; the position saved with them
        ({} without one: its ``step`` becomes :attr:`step`). Then the metrics, rewound to the records that
        ``keep(record, position)`` selects (by default those up to the step), and the guard that logs into them."""
        position = (resume_training(self.stage.path / CHECKPOINT, self.trained) if self.config.resume else None) or {}
        self.step = position.get("step", 0)
        if position:
            log.info("resuming %s at step %d of %d", self.stage.name, self.step, self.total_steps)
        keep = keep or (lambda record, position: record.get("step", 0) <= position.get("step", 0))
        self.metrics = self.stage.metrics()
        self.metrics.rewind(lambda record: keep(record, position))
        self.guard = NonFiniteGuard(self.config.max_non_finite_steps, self.metrics)
        return position

    def epochs(self, items: Sequence[T], steps_per_epoch: int, desc: str) -> Iterator[tuple[int, list[list[T]]]]:
        """From the current step to the last (or a stop): (epoch from 0, its remaining batches of this process's
        share of the epoch's seeded shuffle of ``items``)."""
        size = self.config.batch_size
        self.bar = progress(total=self.total_steps, initial=self.step, desc=desc, disable=not self.context.is_main)
        while self.step < self.total_steps and not self.stopped:
            epoch, batch_index = divmod(self.step, steps_per_epoch)
            order = epoch_share(items, self.config.seed, epoch, self.context)
            remaining = order[batch_index * size : steps_per_epoch * size]
            yield epoch, [remaining[i : i + size] for i in range(0, len(remaining), size)]
        self.bar.close()

    def optimise(self, loss: torch.Tensor, optimizer, params: list) -> float | None:
        """:func:`guarded_step` at this step, with ``--max-grad-norm``."""
        return guarded_step(
            loss, optimizer, params, self.guard, self.step, self.config.max_grad_norm, self.context.device
        )

    def advance(self, loss: float | None, epoch: int, lr: float) -> dict[str, Any]:
        """The step done (``loss`` None: skipped as non-finite; the last loss stands); its record, to complete."""
        self.last_loss = self.last_loss if loss is None else loss
        self.step += 1
        return {"step": self.step, "epoch": epoch + 1, "loss": self.last_loss, "lr": lr}

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(**record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)

    def checkpoint(self, force: bool = False, **position: Any) -> None:
        """Save (main process) every ``--checkpoint-every`` steps, at the last step, at a stop or when ``force``d."""
        due = self.step % self.config.checkpoint_every == 0 or self.step == self.total_steps or self.stopped
        if self.context.is_main and (due or force):
            save_training(self.stage.path / CHECKPOINT, self.trained, step=self.step, **position)
