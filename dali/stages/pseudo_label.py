"""Stage 2a: LLaVA captions each clip from [image tokens, aligned audio tokens, prefix] (its own projector).

Captions are appended to a JSONL file batch by batch (flushed and fsynced), so a killed run resumes where it
stopped; under torchrun each rank writes its own part and rank 0 merges them in input order.
"""

from __future__ import annotations

import os
from pathlib import Path

from dali import distributed
from dali.artifacts import PSEUDO_CAPTIONS_FILE, QUALITY_JSON, QUALITY_MD, SKIPPED_FILE
from dali.caption_quality import QualityReport
from dali.clip_captioning import CaptionJob, caption_clips, caption_shards, remove_parts, write_captions
from dali.command_configs import PseudoLabelConfig
from dali.data import ClipDataset, batch_features, loader_audio, read_cavmae_json, read_label_names
from dali.jsonl import atomic_write_jsonl
from dali.logs import log
from dali.run import Run, captioning_stages
from dali.runs import stage_main
from dali.shard_reading import read_stage_shards
from dali.stage_table import PSEUDO_LABEL
from dali.stages.common import open_stage, start_captioning, start_stage


@stage_main
def main(argv: list[str] | None = None) -> int:
    config, context = start_stage(PseudoLabelConfig, argv)
    index = read_stage_shards(config.clips, config.frame_index, config.shuffle)  # None: a clip list
    label_names = read_label_names(config.label_names) if config.label_names else {}  # read before any captioning
    run = Run.of(config)
    stage = open_stage(config, context, PSEUDO_LABEL)
    out = stage.path
    uses = captioning_stages("llava", config.use_prefix)  # LLaVA's projector: the teacher
    named = {"label_names": config.label_names} if config.label_names else {}
    config, models = start_captioning(config, context, stage, run, uses, clips=config.clips, **named)
    captioner, encoder = models.captioner, models.encoder

    if index is None:
        clips = read_cavmae_json(config.clips, config.data_root)
        if config.shuffle:
            clips = clips.shuffled(config.seed)
        if config.limit is not None:
            clips = clips[: config.limit]

    def dataset_for(mine):
        return ClipDataset(
            mine,
            need_audio=True,
            need_image=True,
            image_transform=captioner.preprocess_images,
            frame_index=config.frame_index,
            target_frames=encoder.target_frames,
            on_error=config.on_error,
            audio_as=loader_audio(context.device, encoder),
            front_end=encoder.front_end,
        )

    def make_block(batch):
        return models.block(batch_features(batch, context.device), batch["pixels"])

    def extra(clip):
        labels = {"labels": clip.labels} if clip.labels else {}  # what the quality report checks a caption against
        if clip.shard is not None:  # where distillation reads it
            return {"shard": clip.shard, "key": clip.key, **labels}
        # absolute: the records are read from wherever distillation runs
        return {"audio": _absolute(clip.audio), "image": _absolute(clip.frame_path(config.frame_index)), **labels}

    job = CaptionJob(
        captioner, make_block, config.decoding(), out, context, config.batch_size, config.num_workers, extra
    )
    if index is not None:
        records = caption_shards(job, index, dataset_for(()), limit=config.limit)
    else:
        records = caption_clips(job, clips, dataset_for)

    if context.is_main:
        skipped: list[dict] = []  # unusable clips and empty captions, beside the captions streamed to disk
        report = QualityReport()
        counts = write_captions(report.flagged(records, label_names), out / PSEUDO_CAPTIONS_FILE, skipped)
        atomic_write_jsonl(out / SKIPPED_FILE, skipped)
        summary = report.write(out, PSEUDO_CAPTIONS_FILE)
        final = {"captions": counts, "skipped": len(skipped), "flagged": summary["flagged"]}
        stage.finish(final, outputs=[PSEUDO_CAPTIONS_FILE, SKIPPED_FILE, QUALITY_JSON, QUALITY_MD])
        remove_parts(out, context.world_size)
        log.info("%d pseudo-captions in %s (%d clips skipped)", counts, out / PSEUDO_CAPTIONS_FILE, len(skipped))
    distributed.teardown()
    return 0


def _absolute(path: Path | None) -> str | None:
    """A path as recorded in pseudo_captions.jsonl: absolute, since distillation may run from another folder."""
    return os.path.abspath(path) if path is not None else None
