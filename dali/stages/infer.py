"""Inference: caption a test list from audio, audio+image or image, save predictions, and score them."""

from __future__ import annotations

from dali import distributed
from dali.artifacts import PREDICTIONS_FILE, SCORES_JSON, SCORES_MD, SKIPPED_FILE
from dali.clip_captioning import CaptionJob, caption_clips, caption_shards, remove_parts, split_skipped
from dali.command_configs import InferConfig
from dali.constants import TARGET_FRAMES
from dali.data import ClipDataset, batch_features, loader_audio, read_caption_csv
from dali.evaluation import prediction_map, score_predictions
from dali.flags import config_to_dict
from dali.jsonl import atomic_write_jsonl
from dali.logs import log
from dali.run import Run, captioning_stages
from dali.runs import Stage, check_run_name, stage_main
from dali.shard_reading import read_stage_shards
from dali.stage_table import INFER, infer_folder
from dali.stages.common import open_stage, start_captioning, start_stage


@stage_main
def main(argv: list[str] | None = None) -> int:
    config, context = start_stage(InferConfig, argv)
    uses_image = config.modality in ("image", "audio_vis")
    # None: a CSV test list; the frame is checked only for a modality that sees it
    index = read_stage_shards(config.test_list, config.frame_index if uses_image else None)
    tag = check_run_name(config.tag, "--tag") if config.tag else None
    stage = open_stage(config, context, INFER, infer_folder(config.modality, tag))
    out = stage.path
    uses_audio = config.modality in ("audio", "audio_vis")

    uses = captioning_stages(config.projector, config.use_prefix, audio=uses_audio)
    config, models = start_captioning(config, context, stage, Run.of(config), uses, test_list=config.test_list)
    captioner, encoder = models.captioner, models.encoder

    clips = []
    if index is None:
        clips = read_caption_csv(config.test_list, config.audio_dir, config.frames_dir if uses_image else None)
        clips = clips[: config.limit] if config.limit is not None else clips
    target_frames = encoder.target_frames if encoder is not None else TARGET_FRAMES

    def dataset_for(mine):
        return ClipDataset(
            mine,
            need_audio=uses_audio,
            need_image=uses_image,
            image_transform=captioner.preprocess_images,
            frame_index=config.frame_index,
            target_frames=target_frames,
            on_error=config.on_error,
            audio_as=loader_audio(context.device, encoder),
            front_end=encoder.front_end if encoder is not None else None,
        )

    options = config.decoding()
    decoding = config_to_dict(options)

    def make_block(batch):
        return models.block(batch_features(batch, context.device), batch.get("pixels"))

    def extra(clip):
        return {"modality": config.modality, "decoding": decoding}

    job = CaptionJob(captioner, make_block, options, out, context, config.batch_size, config.num_workers, extra)
    if index is not None:
        records = caption_shards(job, index, dataset_for(()), limit=config.limit)
    else:
        records = caption_clips(job, clips, dataset_for)
    if context.is_main:
        finish(config, stage, clips, records)
        remove_parts(out, context.world_size)
    distributed.teardown()
    return 0


def finish(config, stage: Stage, clips, records) -> None:
    """The predictions and skipped clips written, scored against the list's references (``--evaluate``), and the
    stage finished."""
    out = stage.path
    captions, skipped = split_skipped(records)  # a test list: small enough to hold for scoring
    atomic_write_jsonl(out / PREDICTIONS_FILE, captions)
    atomic_write_jsonl(out / SKIPPED_FILE, skipped)
    outputs, final = [PREDICTIONS_FILE, SKIPPED_FILE], {"captions": len(captions), "skipped": len(skipped)}
    references = {clip.id: clip.captions for clip in clips if clip.captions}
    if config.evaluate and references and captions:
        # checked as `dali evaluate` checks a file (its line numbers); skipped clips are in skipped.jsonl, and
        # the scores say how many of how many clips they cover
        scored = ((line, record) for line, record in enumerate(captions, 1) if record["id"] in references)
        predictions = prediction_map(scored, references.keys(), f"'{out / PREDICTIONS_FILE}'")
        result = score_predictions(
            predictions, references, out, out.name, sbert=config.sbert, allow_missing=True,
            metric_models=config.metric_models, audio={clip.id: clip.audio for clip in clips if clip.audio},
        )  # fmt: skip
        final |= {"scores": result["scores"], "unavailable": result["unavailable"]}
        outputs += [SCORES_JSON, SCORES_MD]
        log.info("scores: %s", {k: round(v, 4) for k, v in result["scores"].items()})
    final |= {"modality": config.modality}
    stage.finish(final, outputs=outputs)
    log.info("%d captions written to %s", len(captions), out / PREDICTIONS_FILE)
