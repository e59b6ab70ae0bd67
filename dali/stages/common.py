"""Helpers shared by the stage scripts: device/dtype, run folders, resumable checkpoints, the NaN guard."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

import numpy as np
import torch

from dali import distributed
from dali.config import config_to_dict, parse_config
from dali.errors import TrainingDiverged
from dali.files import atomic_write
from dali.models.checkpoints import CheckpointError, check_torch_archive
from dali.run import Run
from dali.runs import Stage
from dali.stage_table import StageRow

T = TypeVar("T")

if TYPE_CHECKING:
    from dali.captioning import CaptioningModels

log = logging.getLogger("dali")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("DALI_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_captioning(
    config: Any, device: torch.device, run: Run, uses: Sequence[StageRow]
) -> tuple[Any, "CaptioningModels"]:
    """The captioning stages' shared start: the models of the ``uses`` stages of the run, in ``--dtype``, and the
    config with the LLaVA and the prompt they resolved to (the flags', else those the run recorded)."""
    from dali.captioning import DTYPES, CaptioningModels

    models = CaptioningModels.load(
        run,
        uses,
        llava=config.llava,
        conv_mode=config.conv_mode,
        dtype=DTYPES[config.dtype],
        device=device,
        allow_modified=config.allow_modified,
    )
    return dataclasses.replace(config, llava=models.captioner.source, conv_mode=models.captioner.conv_mode), models


def start_stage(config_class: type[T], argv: list[str] | None) -> tuple[T, distributed.Context]:
    """A stage's first steps: logging, its config (preset, then flags), the process group and device, the seeds."""
    setup_logging()
    config = parse_config(config_class, argv)
    context = distributed.setup(config.device)
    if getattr(config, "num_workers", 0) is None:
        config = dataclasses.replace(config, num_workers=distributed.loader_workers())
    seed_everything(config.seed)
    return config, context


def open_stage(config: Any, context: distributed.Context, row: StageRow, folder: str | None = None) -> Stage:
    """The stage's folder (``--out``, or ``<expe-dir>/<run>/<its folder>``), opened for this run on every
    process."""
    out = Path(config.out) if config.out else Run.of(config).at(folder or row.folder)
    stage = Stage(out, row.name, overwrite=config.overwrite, resume=config.resume, main=context.is_main)
    distributed.barrier()
    return stage


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def print_config(name: str, config: Any) -> None:
    lines = [f"{name} config:"] + [f"  {key}: {value}" for key, value in config_to_dict(config).items()]
    log.info("\n".join(lines))


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
