"""Every command's flags: small config dataclasses that double as the command-line schema (``dali.flags``).

They live apart from the stages, with nothing heavier than ``dali.constants`` imported, so that ``dali <command>
--help`` parses and answers before torch or transformers load.
"""

from __future__ import annotations

from dataclasses import dataclass

from dali.constants import (
    AUDIO_ENCODERS,
    CAPTION_FORMATS,
    CAPTIONING_DTYPE_NAMES,
    CONV_MODES,
    DECODING_ENGINES,
    DEFAULT_FRAME_INDEX,
    DEFAULT_SHARD_MB,
    DTYPE_NAMES,
    MODALITIES,
    NUM_FRAMES,
    ON_ERROR_CHOICES,
    PROJECTORS,
    RENAMED_PROJECTORS,
    TARGET_FRAMES,
)
from dali.flags import ConfigError, field, require_at_least
from dali.limits import DEFAULT_FILE_SECONDS
from dali.logs import log


@dataclass(kw_only=True)
class RunFolder:
    """The flags of every stage that writes a run folder, declared once (their help: ``flags.COMMON_HELP``)."""

    run: str = field("default")
    expe_dir: str = field("expe")
    out: str | None = field(None)
    overwrite: bool = field(False)
    resume: bool = field(False)
    device: str = field("auto")


@dataclass(kw_only=True)
class ReadsStages:
    """The flag of every command that loads a run's trained files (checked against their manifests' hashes)."""

    allow_modified: bool = field(False)


@dataclass(kw_only=True)
class ClipLoading:
    """The flags of every stage that reads clips from a list, declared once."""

    num_workers: int | None = field(None)
    on_error: str = field("skip", choices=ON_ERROR_CHOICES)


@dataclass(kw_only=True)
class Precision:
    """The precision of LLaVA and of every captioning part, for every command that loads LLaVA, declared once."""

    dtype: str = field("float32", choices=DTYPE_NAMES)


@dataclass(kw_only=True)
class CaptioningPrecision:
    """The precision of every command that captions: also float8 (GPUs with FP8 tensor cores), declared once."""

    dtype: str = field(
        "float32",
        choices=CAPTIONING_DTYPE_NAMES,
        help="precision of LLaVA and of every captioning part; float8: LLaVA's language model's linear layers in "
        "float8 (e4m3, per-row scales; Ada, Hopper or newer GPUs, with torchao), the rest in bfloat16",
    )


METRIC_MODELS_HELP = (
    "folder holding FENSE's models (paraphrase-TinyBERT-L6-v2/, echecker_clotho_audiocaps_base.ckpt, "
    "bert-base-uncased/; docs/evaluation.md); without it FENSE and the fluency-error rate are listed as unavailable"
)


@dataclass(kw_only=True)
class DecodingFlags:
    """The decoding flags shared by the stages that caption (a stage may redeclare a field's default)."""

    strategy: str = field("sample", choices=("greedy", "beam", "sample"), group="decoding")
    temperature: float = field(0.2, group="decoding")
    num_beams: int = field(4, group="decoding")
    max_new_tokens: int = field(64, group="decoding")
    seed: int = field(0)  # listed with the run folder and system flags (flags.SYSTEM_FLAGS)
    engine: str = field(
        "dali",
        choices=DECODING_ENGINES,
        help="dali: our engine (shared prompt prefilled once, static KV cache, compiled on GPU); "
        "generate: transformers' generate (beam search always uses it)",
        group="decoding",
    )

    conv_mode: str | None = field(
        None,
        choices=tuple(CONV_MODES),
        help="LLaVA's conversation template: v1 ('...a curious user...', the original's training prompt) or "
        "llava_v1 ('...a curious human...', its inference prompt); default: the run's (llava_v1 for weights made "
        "by import-original, v1 for runs trained here)",
        group="decoding",
    )

    def decoding(self):
        from dali.models.decoding import DecodingOptions  # torch: loaded once the flags are parsed

        return DecodingOptions(
            strategy=self.strategy,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            temperature=self.temperature,
            seed=self.seed,
            engine=self.engine,
        )


@dataclass
class PrefixTuneConfig(RunFolder, Precision):
    """Stage 1a (prefix tuning). Defaults are the paper's (LLaVA-1.5-7B, 16 pairs, 500 epochs; precision aside:
    float32, where the paper preset runs LLaVA in bfloat16 on a GPU)."""

    llava: str = field(help="LLaVA-1.5 in Hugging Face format: hub id or local folder")
    pairs: str = field(help="(frame, audio caption) pairs: the original prefixDS.json layout or a CSV")
    data_root: str | None = field(None, help="folder the pairs' relative paths start from (default: the file's)")
    num_prefix_tokens: int = field(16, help="prefix length")
    init_std: float = field(1e-4, help="prefix init N(0, std^2)")
    epochs: int = field(500, help="passes over the pairs")
    batch_size: int = field(16, help="per-process batch")
    lr: float = field(1e-3, help="AdamW learning rate")
    weight_decay: float = field(0.0)
    warmup_ratio: float = field(0.03, help="linear warm-up share of the steps, then cosine to 0")
    max_grad_norm: float = field(1.0, help="gradient clipping (HF Trainer's default, as LLaVA trained)")
    seed: int = field(0)
    gradient_checkpointing: bool = field(
        False, help="recompute the frozen LLM's activations in backward (saves memory)"
    )
    checkpoint_every: int = field(50, help="steps between resumable checkpoints")
    max_non_finite_steps: int = field(10, help="skipped non-finite steps before the run stops")

    def validate(self) -> None:
        require_at_least(self, 1, "num_prefix_tokens", "epochs", "batch_size", "checkpoint_every")
        if self.lr <= 0:
            raise ConfigError("--lr must be > 0")


METHODS = ("mmd", "ot", "ot_att")
SOLVERS = ("emd", "sinkhorn")


@dataclass
class AlignConfig(RunFolder, ClipLoading):
    """Stage 1b (distribution alignment). Defaults are the paper's DALI-OT^Att recipe (precision aside: float32,
    where the paper preset runs the CLIP tower in bfloat16 on a GPU)."""

    llava: str = field(help="LLaVA-1.5 (its CLIP tower is the frozen target): hub id or local folder")
    train_list: str = field(help="CAV-MAE format JSON of (audio, frames) pairs")
    val_list: str | None = field(None, help="CAV-MAE JSON for validation (uniform weights); picks the best epoch")
    data_root: str | None = field(None, help="folder relative paths start from (default: each list's folder)")
    audio_encoder: str = field(
        "cav-mae",
        choices=AUDIO_ENCODERS,
        help="the encoder's family: CAV-MAE (the paper's) or a transformers audio model (docs/extending.md)",
    )
    init_encoder: str | None = field(
        None,
        help="CAV-MAE checkpoint (e.g. CAV-MAE-Scale++) or an encoder file; for another --audio-encoder, its "
        "checkpoint folder in Hugging Face format; none = random init with the --encoder-* shape",
    )
    audio_tokens: int | None = field(
        None, help="average-pool another family's tokens to this many (default: all; CAV-MAE is never pooled)"
    )
    encoder_dim: int = field(768, help="width of a new encoder (768: CAV-MAE's; ignored with --init-encoder)")
    encoder_depth: int = field(11, help="audio-specific blocks of a new encoder (11: CAV-MAE's), plus one shared block")
    encoder_heads: int = field(12, help="attention heads of a new encoder")
    encoder_patch_time: int | None = field(None, help="time extent of a patch (default 16, square as CAV-MAE)")
    target_frames: int = field(TARGET_FRAMES, help="audio feature frames per clip")
    method: str = field(
        "ot_att",
        choices=METHODS,
        help="the alignment criterion: MMD, exact or entropic OT, or OT with attentive token weights",
    )
    ot_solver: str = field("emd", choices=SOLVERS, help="emd: exact (the original); sinkhorn: batched, on device")
    emd_workers: int = field(0, help="CPU processes solving the batch's exact EMD problems (0: one by one)")
    sinkhorn_reg: float = field(0.05, help="entropic reg relative to the mean cost")
    sinkhorn_iters: int = field(200, help="iterations of the entropic solver")
    scorer_heads: int = field(8, help="attention heads of OT-Att's token scorers")
    scorer_temperature: float = field(20.0, help="softmax temperature of the token scorers")
    scorer_freeze_epochs: int = field(1, help="epochs during which the scorers do not step")
    entropy_weights: tuple[float, ...] = field(
        (500.0, 400.0, 300.0, 200.0, 100.0), help="lambda per epoch after the frozen ones; the last repeats"
    )
    epochs: int = field(20)
    batch_size: int = field(256, help="per-process batch")
    lr: float = field(1e-4)
    weight_decay: float = field(5e-7)
    beta1: float = field(0.95, help="Adam's beta1")
    beta2: float = field(0.999, help="Adam's beta2")
    lr_decay_start: int = field(10, help="halve the encoder lr after this epoch ...")
    lr_decay_every: int = field(5, help="... and every this many epochs after it")
    lr_decay: float = field(0.5, help="factor of each learning-rate decay step")
    noise: bool = field(True, help="the original's fbank noise + time-roll augmentation")
    frame_index: int = field(DEFAULT_FRAME_INDEX, help="frame used for every clip (the original forced 0 here)")
    cache_vision_tokens: bool = field(False, help="run the vision tower once per clip and keep its tokens in memory")
    cache_audio_features: bool = field(False, help="keep every clip's audio features in memory (augmented per step)")
    autocast: str = field(
        "bfloat16",
        choices=("none", "bfloat16"),
        help="mixed precision on GPU (bf16 needs no loss scaling, unlike the original's fp16)",
    )
    compile: bool = field(True, help="torch.compile the encoder's training forward (GPU only)")
    gradient_checkpointing: bool = field(
        False,
        help="recompute each encoder block in backward instead of keeping its activations: less memory for one "
        "more forward pass of the encoder (for AST-base at the paper's batch of 256)",
    )
    vision_dtype: str = field("float32", choices=DTYPE_NAMES, help="precision of the frozen CLIP tower")
    seed: int = field(0)
    checkpoint_every: int = field(200, help="steps between resumable checkpoints (and each epoch end)")
    max_non_finite_steps: int = field(20)
    max_steps_per_epoch: int | None = field(None, help="cut epochs short (smoke tests)")

    def validate(self) -> None:
        if self.method == "mmd" and self.ot_solver != "emd":
            log.info("--ot-solver is ignored with --method mmd")
        require_at_least(self, 0, "epochs")  # 0 saves the initial encoder: the unaligned baseline
        require_at_least(self, 1, "batch_size", "checkpoint_every")
        if self.method == "ot_att" and not self.entropy_weights:
            raise ConfigError("--entropy-weights needs at least one value with --method ot_att")
        if self.audio_tokens is not None:
            require_at_least(self, 1, "audio_tokens")
        if self.audio_encoder != "cav-mae" and self.encoder_patch_time:
            log.info("--encoder-patch-time is CAV-MAE's: ignored with --audio-encoder %s", self.audio_encoder)
        elif self.target_frames % (self.encoder_patch_time or 16):
            raise ConfigError("--target-frames must be a multiple of the patch's time extent")

    def entropy_weight(self, epoch: int) -> float:
        """lambda for a 1-based epoch (0 while the scorers are frozen)."""
        index = epoch - self.scorer_freeze_epochs - 1
        return 0.0 if index < 0 else self.entropy_weights[min(index, len(self.entropy_weights) - 1)]


@dataclass(kw_only=True)
class PseudoLabelConfig(RunFolder, ReadsStages, ClipLoading, CaptioningPrecision, DecodingFlags):
    """Stage 2a (pseudo-captions). Defaults follow the original (sampling at T=0.2, up to 128 new tokens), seeded."""

    llava: str | None = field(None, help="LLaVA-1.5: hub id or local folder (default: the one the align stage used)")
    clips: str = field(help="CAV-MAE format JSON of the clips to caption (AudioSet balanced-train in the paper)")
    data_root: str | None = field(None)
    align_dir: str | None = field(None, help="stage 1b folder (default <expe-dir>/<run>/align)")
    prefix_dir: str | None = field(None, help="stage 1a folder (default <expe-dir>/<run>/prefix)")
    use_prefix: bool = field(True, help="append the stage-1a prefix (the original does)")
    frame_index: int = field(DEFAULT_FRAME_INDEX)
    batch_size: int = field(32)
    max_new_tokens: int = field(128)
    shuffle: bool = field(False, help="caption in a seeded random order (the original shuffled, unseeded)")
    label_names: str | None = field(
        None,
        help="AudioSet's class_labels_indices.csv (mid, display_name): quality.json also flags captions that name "
        "their clip's labels",
    )
    limit: int | None = field(None, help="caption only the first N clips of the list")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")


@dataclass
class DistillConfig(RunFolder, ReadsStages, ClipLoading, Precision):
    """Stage 2b (audio-visual distillation). Defaults are the paper's: 1 epoch, batch 40, lr 2e-4, last step kept
    (precision aside: float32, where the paper preset runs LLaVA in bfloat16 on a GPU)."""

    llava: str | None = field(None, help="LLaVA-1.5: hub id or local folder (default: the one the align stage used)")
    align_dir: str | None = field(None, help="stage 1b folder (default <expe-dir>/<run>/align)")
    pseudo_dir: str | None = field(None, help="stage 2a folder (default <expe-dir>/<run>/pseudo_label)")
    epochs: int = field(1)
    batch_size: int = field(40)
    lr: float = field(2e-4)
    weight_decay: float = field(0.0)
    warmup_ratio: float = field(0.03)
    max_grad_norm: float = field(1.0)
    val_fraction: float = field(
        0.0,
        help="share of the pseudo-captions held out (seeded) to keep the step with the lowest held-out loss; "
        "0 trains on all of them and keeps the last step, as the original",
    )
    eval_every: int = field(0, help="steps between held-out evaluations (0: at the end of every epoch)")
    patience: int = field(0, help="stop after this many held-out evaluations without a lower loss (0: never)")
    cache_audio_tokens: bool = field(False, help="encode each clip once and keep its tokens in memory")
    filter: bool = field(
        False,
        help="leave out the pseudo-captions that quality.json flags (repetition, empty, one word, a number, a label); "
        "the manifest says how many and why",
    )
    seed: int = field(0)
    gradient_checkpointing: bool = field(
        False, help="recompute the frozen LLM's activations in backward (saves memory)"
    )
    checkpoint_every: int = field(200)
    max_non_finite_steps: int = field(10)

    def validate(self) -> None:
        require_at_least(self, 1, "epochs", "batch_size", "checkpoint_every")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        require_at_least(self, 0, "eval_every", "patience")


@dataclass(kw_only=True)
class InferConfig(RunFolder, ReadsStages, ClipLoading, CaptioningPrecision, DecodingFlags):
    """Captions for a test list. Defaults follow the original inference.sh (audio, distilled projector, no prefix)."""

    llava: str | None = field(None, help="LLaVA-1.5: hub id or local folder (default: the one the run's stages used)")
    test_list: str = field(
        help="AudioCaps- or Clotho-style CSV (ids and reference captions), or a shard index (dali prepare --shards: "
        "captioned without references; score with dali evaluate)"
    )
    audio_dir: str | None = field(None, help="folder of <id>.wav (default: the list's folder)")
    frames_dir: str | None = field(
        None, help="folder holding frame_<k>/<id>.jpg (needed for image, audio_vis from a CSV)"
    )
    modality: str = field("audio", choices=MODALITIES)
    tag: str | None = field(None, help="suffix of the output folder, to keep several settings apart")
    align_dir: str | None = field(None, help="stage 1b folder (default <expe-dir>/<run>/align)")
    prefix_dir: str | None = field(None, help="stage 1a folder (default <expe-dir>/<run>/prefix)")
    distill_dir: str | None = field(None, help="stage 2b folder (default <expe-dir>/<run>/distill)")
    use_prefix: bool = field(False, help="append the stage-1a prefix")
    projector: str = field(
        "distilled",
        choices=PROJECTORS,
        help="projector for every modality: the distilled copy (the original's --use_mlp true) or LLaVA's own",
        renamed=RENAMED_PROJECTORS,
    )
    frame_index: int = field(DEFAULT_FRAME_INDEX)
    batch_size: int = field(32)
    limit: int | None = field(None, help="caption only the first N clips")
    evaluate: bool = field(True, help="score the predictions against the list's references")
    sbert: bool = field(True)
    metric_models: str | None = field(None, help=METRIC_MODELS_HELP)

    def validate(self) -> None:
        from dali.shards import is_shard_index

        if self.modality != "audio" and not self.frames_dir and not is_shard_index(self.test_list):
            raise ConfigError(f"--modality {self.modality} needs --frames-dir")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")


@dataclass(kw_only=True)
class ReproduceConfig(ReadsStages, ClipLoading, CaptioningPrecision, DecodingFlags):
    """dali reproduce: the paper's evaluation of a finished run, over sampling seeds, with the clips it scored.

    Rows: AudioCaps from audio, audio + image and image (each --seeds times when decoding samples), and the
    cross-domain row, Clotho from audio. Each row-and-seed is a `dali infer` folder of the run
    (infer_<modality>_<set>_seed<k>), reused when finished with the same settings and inputs. Writes
    <run>/reproduce/: results.md and results.json (mean ± std over seeds; the clips found, missing and scored, with a
    hash of the list scored) and per_clip.jsonl.
    """

    run: str = field(help="a finished run (trained here or made by import-original): its folder or its name")
    expe_dir: str = field("expe", help="where run names are looked up")
    out: str | None = field(None, help="the results folder (default <run>/reproduce)")
    overwrite: bool = field(False, help="redo the results, and every infer folder made with other settings")
    resume: bool = field(False, help="continue an interrupted reproduce (finished infer folders are always reused)")
    device: str = field("auto")
    audiocaps: str = field(
        "data/audiocaps",
        help="AudioCaps' test set: DIR/test.csv (its CSV), DIR/audio/<id>.wav, DIR/frames/frame_<k>/<id>.jpg "
        "(dali prepare writes audio/ and frames/)",
    )
    clotho: str | None = field(
        None, help="Clotho's evaluation set for the cross-domain row: DIR/test.csv (its captions CSV), DIR/audio/"
    )
    seeds: int = field(3, help="sampling seeds --seed .. --seed+N-1 per row (greedy and beam rows run once)")
    modalities: tuple[str, ...] = field(MODALITIES, help="AudioCaps' rows (Clotho has no frames: audio only)")
    projector: str | None = field(
        None,
        choices=PROJECTORS,
        help="the audio rows' projector (default: the distilled one when the run has it, as inference.sh; else "
        "LLaVA's with the run's prefix); the rows that see the frame use LLaVA's projector with the prefix",
    )
    prefix_dir: str | None = field(None, help="stage 1a folder (default <run>/prefix)")
    llava: str | None = field(None, help="LLaVA-1.5 (default: the one the run's stages recorded)")
    frame_index: int = field(DEFAULT_FRAME_INDEX)
    batch_size: int = field(32)
    limit: int | None = field(None, help="caption only the first N clips of each set")
    sbert: bool = field(True)
    metric_models: str | None = field(None, help=METRIC_MODELS_HELP)

    def validate(self) -> None:
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown or not self.modalities:
            raise ConfigError(f"--modalities: choose among {', '.join(MODALITIES)} (got {' '.join(unknown)})")


@dataclass(kw_only=True)
class ExportConfig(ReadsStages):
    """dali export --run RUN OUT: a finished run -> a model folder to share (config.json, model.safetensors with the
    trained parts only, README.md the model card); LLaVA is named, never copied. Load it with
    AudioCaptioner.from_pretrained(OUT) or dali caption --model OUT; --push-to-hub uploads it."""

    out: str = field(help="the model folder to write (outside the run)", positional=True)
    run: str = field(help="a finished run: its folder or its name under --expe-dir")
    expe_dir: str = field("expe", help="where run names are looked up")
    projector: str | None = field(
        None, choices=PROJECTORS, help="the projector to export (default: the distilled one when the run has it)"
    )
    use_prefix: bool | None = field(None, help="export the prefix (default: with LLaVA's projector)")
    llava: str | None = field(None, help="the LLaVA the folder names (default: the one the run recorded)")
    overwrite: bool = field(False, help="replace OUT when it is a model folder dali exported")
    push_to_hub: str | None = field(None, help="then upload the folder to this Hub repository (user/name)")


@dataclass(kw_only=True)
class FinishedRun(ReadsStages, CaptioningPrecision):
    """The flags of the commands that caption with a finished run (caption, app), declared once."""

    run: str | None = field(
        None, help="a finished run: its folder (with align/, and distill/ or prefix/) or its name under --expe-dir"
    )
    model: str | None = field(None, help="in place of --run: a model folder from dali export, or its Hub name")
    expe_dir: str = field("expe", help="where run names are looked up")
    llava: str | None = field(None, help="LLaVA-1.5 (default: the one recorded in the run's align manifest)")
    device: str = field("auto")

    def check_source(self) -> None:
        if (self.run is None) == (self.model is None):
            raise ConfigError("give --run (a run folder) or --model (an exported model), one of them")

    def loading(self) -> dict:
        """How ``AudioCaptioner.from_run`` loads the run: these flags, as its keywords."""
        names = ("llava", "dtype", "device", "expe_dir", "allow_modified")
        return {name: getattr(self, name) for name in names}


@dataclass(kw_only=True)
class CaptionConfig(FinishedRun, DecodingFlags):
    """Caption audio/video files with a run's aligned encoder (and distilled projector)."""

    files: tuple[str, ...] = field((), help="audio or video files", positional=True)
    modality: str = field("audio", choices=("audio", "audio_vis"))
    projector: str | None = field(
        None,
        choices=PROJECTORS,
        help="default: distilled when the run has one, else LLaVA's own",
        renamed=RENAMED_PROJECTORS,
    )
    use_prefix: bool | None = field(None, help="default: with LLaVA's own projector only")
    first_window_only: bool = field(False, help="caption only the first 10 s of each file")
    min_window: float = field(1.0, help="shortest trailing window to caption, in seconds")
    max_seconds: float = field(DEFAULT_FILE_SECONDS, help="longer files are captioned up to this many seconds")
    batch_size: int = field(16)
    strategy: str = field("greedy", choices=("greedy", "beam", "sample"))
    json: str | None = field(None, help="also write the captions to this JSON file")
    output_dir: str | None = field(
        None, help="write each file's captions here (<name>.<format>; a folder's files keep their subfolders)"
    )
    output_format: str = field("txt", choices=(*CAPTION_FORMATS, "all"), help="with --output-dir")
    recursive: bool = field(False, help="a FILE that is a folder: its subfolders' files too", short="-r")
    glob: str | None = field(None, help="a FILE that is a folder: only the names matching this pattern (e.g. '*.wav')")
    overwrite: bool = field(False, help="caption again the files whose --output-dir outputs exist (else skipped)")

    def validate(self) -> None:
        if not self.files:
            raise ConfigError("FILE: give at least one audio or video file, or a folder of them")
        self.check_source()
        if self.model is not None and (self.projector is not None or self.use_prefix is not None):
            raise ConfigError("--projector and --use-prefix choose among a run's files: an exported model has its own")


@dataclass
class EvaluateConfig:
    """Score a predictions.jsonl against the references of a caption CSV."""

    predictions: str | None = field(None, help="predictions.jsonl written by `dali infer` (id, caption, ...); required")
    test_list: str | None = field(None, help="AudioCaps- or Clotho-style CSV with the references; required")
    out: str | None = field(
        None,
        help="folder for scores.json / scores.md (default: the predictions' folder, or '<it>_rescored' beside it "
        "when it is a finished stage, whose manifest hashes its own scores)",
    )
    sbert: bool = field(True, help="compute SBERT-sim (all-MiniLM-L6-v2)")
    spice: bool = field(True, help="compute SPICE/SPIDEr when the CoreNLP jars are present")
    metric_models: str | None = field(None, help=METRIC_MODELS_HELP)
    name: str = field("predictions", help="row name in the markdown table")
    allow_missing: bool = field(
        False, help="score the clips that have a prediction when some have none (the table and scores.json say so)"
    )
    audio_dir: str | None = field(
        None, help="the test list's audio folder: CLAP-sim compares each clip with its caption"
    )
    list_metric_models: bool = field(
        False, help="print the files --metric-models must hold (size, published sha256) and exit"
    )

    def validate(self) -> None:
        given = {"--predictions": self.predictions, "--test-list": self.test_list}
        missing = [flag for flag, value in given.items() if value is None]
        if missing and not self.list_metric_models:
            raise ConfigError(f"the following arguments are required: {', '.join(missing)}")


@dataclass
class PrepareConfig:
    """dali prepare INPUT OUTPUT: media files -> 16 kHz mono wav + 10 frames per clip + a CAV-MAE JSON.

    Like CAV-MAE's preprocessing: channel 0 of the audio at 16 kHz; 10 frames evenly spaced over the first 10 s,
    short side resized to 224 and centre-cropped, saved as frames/frame_<k>/<id>.jpg. Runs on several
    processes, skips clips already done (resumable), writes every file atomically, and reports failures.
    """

    input: str = field(help="folder of media files, or a .txt list of paths", positional=True)
    output: str = field(help="output folder (audio/, frames/, clips.json, prepare_report.jsonl)", positional=True)
    workers: int = field(4, help="processes")
    max_seconds: float | None = field(
        None, help="decode and keep only this much of each file (default: the 10.255 s that give CAV-MAE's 1024 frames)"
    )
    shards: bool = field(
        False,
        help="write WebDataset shards (shard-NNNNNN.tar) and their index shards.json in place of loose files, for "
        "sets of many clips; INPUT may then also be a CAV-MAE list of clips already prepared (packed as they are)",
    )
    shard_mb: int = field(
        DEFAULT_SHARD_MB, help="shard size in MB (a shard closes once it holds this much)", bounds=(1, 1 << 20)
    )
    shard_samples: int | None = field(
        None,
        help="also close a shard at this many samples (a multiple of the stages' --batch-size keeps their batches, and "
        "so their sampled captions, those of the same clips as a list)",
        bounds=(1, 10_000_000),
    )
    shard_frames: tuple[int, ...] = field(
        tuple(range(NUM_FRAMES)),
        help="the frames each sample keeps (the stages read --frame-index, 5 by default)",
        bounds=(0, NUM_FRAMES - 1),
    )
    shard_base: str | None = field(
        None,
        help="where the stages will read the shards from, written in the index (a folder, or a URL prefix "
        "WebDataset opens: https://host/set, gs://bucket/set, or 'pipe:COMMAND' that writes the shard named last to "
        "stdout); default: beside the index",
    )

    def validate(self) -> None:
        shard_flags = (
            self.shard_base
            or self.shard_mb != DEFAULT_SHARD_MB
            or self.shard_samples
            or len(self.shard_frames) < NUM_FRAMES
        )
        if not self.shards and shard_flags:
            raise ConfigError("--shard-mb, --shard-samples, --shard-frames and --shard-base need --shards")
        if len(set(self.shard_frames)) != len(self.shard_frames) or not self.shard_frames:
            raise ConfigError("--shard-frames: give distinct frame numbers 0-9")


@dataclass
class QualityConfig:
    """dali quality PSEUDO: what is wrong with a pseudo-label folder's captions (the quality.json and quality.md that
    dali pseudo-label writes), for a folder made before it did, or with --label-names. Prints the report."""

    pseudo: str = field(
        help="a finished pseudo-label folder, or a run (its folder or name) holding one", positional=True
    )
    expe_dir: str = field("expe", help="where run names are looked up")
    label_names: str | None = field(None, help="AudioSet's class_labels_indices.csv: flag captions naming their labels")
    json: str | None = field(None, help="also write the report as JSON to this file")


@dataclass
class ImportOriginalConfig:
    """dali import-original SOURCE_DIR RUN_DIR: the released DALI files -> a run folder inference.sh uses.

    SOURCE_DIR holds the original's files (any subset, at least the backbone):
      audio_backbone.pth  -> RUN_DIR/align   (CAV-MAE audio branch + proj; attentive scorers kept apart)
      prefixMLP.bin       -> RUN_DIR/distill (model.mm_projector.{0,2}.*; a stage-1a file carries the prefix too)
      prefix.bin          -> RUN_DIR/prefix  (model.audio_tower.prefix)
    Every mapping is strict: a missing or mis-shaped key stops with its name. Each folder gets a manifest, so the
    stages accept it as if they had produced it.
    """

    source: str = field(help="folder with audio_backbone.pth [prefixMLP.bin] [prefix.bin]", positional=True)
    run: str = field(help="run folder to create (e.g. expe/DALI_OT_ATT)", positional=True)
    llava: str | None = field(None, help="LLaVA-1.5 config to check the shapes against (hub id or folder)")
    overwrite: bool = field(False, help="replace stage folders the run already has (and --export's folder)")
    export: str | None = field(
        None,
        help="also write the run as a model folder here (as dali export; needs --llava), to share and load by name",
    )

    def validate(self) -> None:
        if self.export and not self.llava:
            raise ConfigError("--export needs --llava: the model folder names the LLaVA it captions with")


@dataclass
class WorldCommandConfig:
    """dali world: generate the synthetic world, train (or reuse) its image captioner and pretrain (or reuse) its
    audio encoder (world/encoder_pretrained/audio_encoder.safetensors, for dali align --init-encoder).

    After it, the stage scripts run on the world with the configs/synthetic presets, e.g.
    ./prefix_tuning.sh --config configs/synthetic/prefix_tuning.yaml --run mine
    """

    out: str = field("data/synthetic", help="the world's folder")
    reduced: bool = field(False, help="a small world and a briefly trained captioner")
    captioner_epochs: int | None = field(None, help="epochs of the captioner's training (default: the preset's)")
    captioner_lr: float | None = field(
        None, help="learning rate of the captioner's training (default: the preset's, 2e-3; 1e-3 gives one that loops)"
    )
    seed: int = field(0, help="seed of the world and of its captioner's training")


@dataclass
class DemoConfig:
    """make demo: the whole method on the built-in synthetic world, and a results table shaped like Table 1.

    World -> image captioner (cached) -> prefix tuning -> alignment per variant -> pseudo-captions ->
    distillation -> audio-only captions of the test clips -> expe/<run>/results.{json,md,png}.
    Every stage runs through its own main(argv) with the configs/synthetic presets.
    """

    world: str = field("data/synthetic", help="the world's folder (generated there if missing)")
    expe_dir: str = field("expe")
    run: str = field("demo")
    full: bool = field(False, help="every row of the table (MMD, OT, distilled baselines)")
    reduced: bool = field(False, help="a small world and short stages (tests, CI)")
    overwrite: bool = field(False, help="redo every stage of the run")
    audio_encoder: str = field(
        "cav-mae",
        choices=AUDIO_ENCODERS,
        help="another encoder family (random weights at the preset's shape): its unaligned, OT-Att and distilled "
        "rows beside CAV-MAE's",
    )
    captioner_epochs: int | None = field(None, help="epochs of the captioner's training (default: the preset's)")
    captioner_lr: float | None = field(
        None, help="learning rate of the captioner's training (default: the preset's, 2e-3; 1e-3 gives one that loops)"
    )
    encoder_start: str = field(
        "pretrained",
        choices=("pretrained", "random"),
        help="where alignment starts: the world's self-supervised CAV-MAE-style pretraining (as the paper starts "
        "from CAV-MAE), or random weights (earlier demos)",
    )
    seeds: int = field(
        1,
        help="N > 1: world, captioner and stages under seeds 0..N-1 (seed 0 is the plain demo), MMD and OT "
        "rows added; writes <run>/seeds.{json,md} with each metric's mean and standard deviation",
    )

    def validate(self) -> None:
        require_at_least(self, 1, "seeds")


@dataclass(kw_only=True)
class AppConfig(FinishedRun):
    """dali app --run RUN (or --model MODEL): a web page to caption a clip (upload a file or record one) with a finished
    run or an exported model.

    The model loads once; requests wait in a queue. The page is served on 127.0.0.1 unless --host says otherwise,
    never shared publicly, with Gradio's analytics off and nothing fetched from outside. Uploads and results go
    to a private temporary folder, where each file is kept --keep-minutes and the whole under --max-scratch-mb
    (the page says so); the folder goes at exit. Only sounds, videos and pictures are served inline; request
    bodies are bounded; the run and its LLaVA are shown by name and hash, never by path. There is no
    authentication: on a network, put a reverse proxy with it in front (docs/reliability.md).
    """

    host: str = field("127.0.0.1", help="address to serve on (0.0.0.0 opens the page to the network)")
    port: int = field(7860, help="port to serve on")
    max_seconds: float = field(
        DEFAULT_FILE_SECONDS, help="longer files are cut to their first this many seconds (the page says so)"
    )
    min_seconds: float = field(1.0, help="shortest clip (and trailing window) to caption, in seconds")
    max_upload_mb: int = field(200, help="largest upload accepted, in MB")
    keep_minutes: float = field(30.0, help="uploads and results are deleted this long after they arrive")
    max_scratch_mb: int = field(4000, help="the oldest uploads and results go when their folder passes this, in MB")
    max_scratch_files: int = field(10_000, help="... or when it holds more files than this")
    batch_size: int = field(16, help="windows captioned at once")

    def validate(self) -> None:
        self.check_source()
        require_at_least(self, 1, "port", "max_upload_mb", "batch_size")
        if self.max_scratch_mb < 2 * self.max_upload_mb:
            raise ConfigError(
                f"--max-scratch-mb must hold two uploads ({2 * self.max_upload_mb}), got {self.max_scratch_mb}"
            )
        if self.max_seconds < self.min_seconds:
            raise ConfigError(f"--max-seconds must be >= --min-seconds ({self.min_seconds}), got {self.max_seconds}")
