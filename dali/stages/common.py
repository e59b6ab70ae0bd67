"""What every stage does first: its config, process group and seeds, its folder opened, its captioning models
loaded (the training helpers are in :mod:`dali.training`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

from dali import distributed
from dali.flags import config_to_dict, parse_config
from dali.logs import log, setup_logging
from dali.run import Run
from dali.runs import Stage
from dali.stage_table import StageRow
from dali.training import seed_everything

T = TypeVar("T")

if TYPE_CHECKING:
    from dali.captioning import CaptioningModels


def start_captioning(
    config: Any, context: distributed.Context, stage: Stage, run: Run, uses: Sequence[StageRow], **files: str
) -> tuple[Any, "CaptioningModels"]:
    """The captioning stages' shared start: the models of the ``uses`` stages of the run, in ``--dtype``; the config
    with the LLaVA and the prompt they resolved to (the flags', else those the run recorded), printed and saved; and
    the stage's inputs recorded: that LLaVA and prompt, ``files`` (flag name -> path), the upstream folders."""
    from dali.captioning import CaptioningModels

    models = CaptioningModels.load(
        run,
        uses,
        llava=config.llava,
        conv_mode=config.conv_mode,
        dtype=config.dtype,
        device=context.device,
        allow_modified=config.allow_modified,
    )
    config = dataclasses.replace(config, llava=models.captioner.source, conv_mode=models.captioner.conv_mode)
    if context.is_main:
        print_config(stage.name, config)
        stage.save_config(config_to_dict(config))
        stage.add_input("llava", config.llava)
        stage.add_setting("conv_mode", config.conv_mode)
        stage.add_setting("precision", models.captioner.precision)  # what ran: float8 is bfloat16 around float8
        for name, path in files.items():
            stage.add_input(name, path)
        for row in uses:
            stage.add_input(row.flag, run.stage(row))
    return config, models


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
    stage = Stage(out, row.name, overwrite=config.overwrite, resume=config.resume, writer=context.is_main)
    distributed.barrier()
    return stage


def print_config(name: str, config: Any) -> None:
    lines = [f"{name} config:"] + [f"  {key}: {value}" for key, value in config_to_dict(config).items()]
    log.info("\n".join(lines))
