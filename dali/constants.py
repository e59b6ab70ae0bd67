"""The facts that commands and the library share, in a module that imports nothing: the commands' flags read
them before any model library loads (``dali <command> --help`` stays fast)."""

SAMPLE_RATE = 16_000
TARGET_FRAMES = 1024  # CAV-MAE pads or crops every clip to 1024 frames (10.24 s)
NUM_FRAMES = 10  # frames kept per clip (frame_0 .. frame_9), as CAV-MAE's preprocessing extracts them
DEFAULT_FRAME_INDEX = 5  # the middle of those 10 frames; one index for every stage
ON_ERROR_CHOICES = ("skip", "stop")
MODALITIES = ("image", "audio", "audio_vis")
# the projector captions go through: the distilled copy (stage 2b), or LLaVA's own ("original" before 2026-12: the
# word means the paper's code everywhere else)
PROJECTORS = ("distilled", "llava")
RENAMED_PROJECTORS = {"original": "llava"}
AUDIO_ENCODERS = ("cav-mae", "ast", "whisper", "clap", "hubert", "wav2vec2")  # dali.models.audio_encoders
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Captioning also takes float8: the LLM's linear layers in float8 on FP8 tensor cores, the rest in bfloat16
# (dali.models.float8); training stages keep DTYPE_NAMES.
CAPTIONING_DTYPE_NAMES = (*DTYPE_NAMES, "float8")
DECODING_ENGINES = ("dali", "generate", "generate-static")
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA's conversation templates: the original trained with v1 (conv_vicuna_v1) and captioned with llava_v1.
CONV_MODES = {
    "v1": SYSTEM_PROMPT,
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}
DEFAULT_SHARD_MB = 1024  # dali prepare --shards: a shard closes once it holds this much
CAPTION_FORMATS = ("txt", "json", "srt", "vtt", "tsv")  # dali caption --output-format (dali.caption_formats)
