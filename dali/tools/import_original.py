"""``dali import-original SOURCE_DIR RUN_DIR``: the released DALI files -> a run folder that ``inference.sh`` uses
(the mapping and the flags: ``command_configs.ImportOriginalConfig``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dali import model_folder
from dali.artifacts import ENCODER_FILE, PREFIX_FILE, PROJECTOR_FILE, TOKEN_WEIGHTS_FILE
from dali.command_configs import ImportOriginalConfig
from dali.files import atomic_write
from dali.flags import ConfigError, parse_config
from dali.logs import log, setup_logging
from dali.models.cav_mae import load_audio_encoder, save_audio_encoder
from dali.models.checkpoints import CheckpointError, read_state_dict, strip_prefix
from dali.models.prefix import ORIGINAL_PREFIX_KEY, load_prefix, save_prefix
from dali.models.projector import ORIGINAL_PROJECTOR_KEYS
from dali.run import IMPORTED_CONV_MODE, Run
from dali.runs import Stage, stage_main
from dali.stage_table import ALIGN, DISTILL, PREFIX

SCORER_PREFIXES = ("audio_scorer.", "image_scorer.", "a_q.", "a_k.", "a_v.", "i_q.", "i_k.", "i_v.")


def llava_shapes(llava: str | None) -> tuple[int | None, int | None]:
    """(LLM hidden size, vision hidden size) from a LLaVA config, to check the imported shapes against."""
    if not llava:
        return None, None
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(llava)
    return config.text_config.hidden_size, config.vision_config.hidden_size


def import_backbone(path: Path, stage: Stage, vision_dim: int | None) -> dict:
    encoder = load_audio_encoder(path)
    if encoder.proj is None:
        raise CheckpointError(
            f"'{path}' has no 'proj' layer: it is a bare CAV-MAE checkpoint, not a DALI backbone "
            f"(use it as `dali align --init-encoder {path}`)"
        )
    if vision_dim is not None and encoder.output_dim != vision_dim:
        raise CheckpointError(
            f"'{path}': proj gives {encoder.output_dim}-d tokens, the LLaVA vision tower {vision_dim}"
        )
    out = stage.path
    stage.save_config({"source": str(path)})  # the first write: an --overwrite moves the old files aside here
    stage.add_input("audio_backbone", path)
    atomic_write(out / ENCODER_FILE, lambda tmp: save_audio_encoder(encoder, tmp))
    outputs = [ENCODER_FILE]
    state = strip_prefix(read_state_dict(path)[0])
    scorers = {k: v.contiguous() for k, v in state.items() if k.startswith(SCORER_PREFIXES)}
    if scorers:
        atomic_write(out / TOKEN_WEIGHTS_FILE, lambda tmp: save_file(scorers, str(tmp)))
        outputs.append(TOKEN_WEIGHTS_FILE)
    stage.finish({"imported_from": str(path), "encoder_config": encoder.config.__dict__}, outputs=outputs)
    return {ALIGN.folder: str(out)}


def import_projector(
    path: Path, state: dict[str, torch.Tensor], stage: Stage, hidden: int | None, vision_dim: int | None
) -> dict:
    missing = sorted(key for key in ORIGINAL_PROJECTOR_KEYS if key not in state)
    if missing:
        raise CheckpointError(f"'{path}' lacks projector keys {missing}")
    weights = {ORIGINAL_PROJECTOR_KEYS[key]: state[key].float().contiguous() for key in ORIGINAL_PROJECTOR_KEYS}
    h, v = weights["linear_1.weight"].shape
    expected = {
        "linear_1.weight": (hidden or h, vision_dim or v),
        "linear_1.bias": (hidden or h,),
        "linear_2.weight": (hidden or h, hidden or h),
        "linear_2.bias": (hidden or h,),
    }
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise CheckpointError(f"'{path}': '{key}' has shape {list(weights[key].shape)}, expected {list(shape)}")
    out = stage.path
    stage.save_config({"source": str(path)})  # the first write: an --overwrite moves the old files aside here
    stage.add_input("projector", path)
    atomic_write(out / PROJECTOR_FILE, lambda tmp: save_file(weights, str(tmp)))
    stage.finish({"imported_from": str(path)}, outputs=[PROJECTOR_FILE])
    return {DISTILL.folder: str(out)}


def import_prefix(path: Path, stage: Stage, hidden: int | None) -> dict:
    prefix = load_prefix(path, hidden_size=hidden)
    out = stage.path
    stage.save_config({"source": str(path)})  # the first write: an --overwrite moves the old files aside here
    stage.add_input("prefix", path)
    atomic_write(out / PREFIX_FILE, lambda tmp: save_prefix(prefix, tmp))
    stage.finish({"imported_from": str(path), "tokens": prefix.embeddings.shape[0]}, outputs=[PREFIX_FILE])
    return {PREFIX.folder: str(out)}


@stage_main
def main(argv: list[str] | None = None) -> int:
    args = parse_config(ImportOriginalConfig, argv)
    setup_logging()
    source, run = Path(args.source), Path(args.run)
    backbone = source / "audio_backbone.pth"
    if not backbone.is_file():
        raise ConfigError(f"SOURCE_DIR: '{backbone}' does not exist")
    if args.export:  # before anything is written: a destination that cannot be written stops the import too
        model_folder.check_destination(Path(args.export), run, args.overwrite)
    hidden, vision_dim = llava_shapes(args.llava)
    projector = source / "prefixMLP.bin"
    # each file is read once: the keys decide what it is, then the same tensors are imported
    keys = {path: read_state_dict(path)[0] for path in (projector, source / "prefix.bin") if path.is_file()}
    prefix_file = next((p for p in (source / "prefix.bin", projector) if ORIGINAL_PREFIX_KEY in keys.get(p, {})), None)
    targets = [ALIGN] + ([DISTILL] if projector in keys and ORIGINAL_PREFIX_KEY not in keys[projector] else [])
    targets += [PREFIX] if prefix_file else []
    # every target folder is checked (finished ones need --overwrite) before anything is written; each is recorded as
    # the import of its stage, which that stage may later replace (and the other way round)
    stages = {row: Stage(run / row.folder, f"import_original/{row.name}", overwrite=args.overwrite) for row in targets}
    for stage in stages.values():
        # the original captioned with LLaVA's llava_v1 template (it trained with v1): imported runs caption the same
        stage.add_setting("conv_mode", IMPORTED_CONV_MODE)
        if args.llava:  # later stages and `dali caption` find the LLaVA here, with no --llava
            stage.add_input("llava", args.llava)
    done = import_backbone(backbone, stages[ALIGN], vision_dim)
    if projector in keys:
        if ORIGINAL_PREFIX_KEY in keys[projector]:
            # stage 1a writes the same name with the prefix and LLaVA's unchanged projector: not a distilled one
            log.warning(
                "'%s' is a stage-1a file (it holds the prefix): its projector is LLaVA's own, not imported", projector
            )
        else:
            done |= import_projector(projector, keys[projector], stages[DISTILL], hidden, vision_dim)
    if prefix_file:  # prefix.bin, else a stage-1a prefixMLP.bin with the prefix
        done |= import_prefix(prefix_file, stages[PREFIX], hidden)
    for stage, folder in done.items():
        log.info("imported %s -> %s", stage, folder)
    if args.export:  # the released weights as a model folder like any other
        model_folder.export(Run.find(run), Path(args.export), overwrite=args.overwrite)
        log.info("exported %s -> %s", run, args.export)
    return 0
