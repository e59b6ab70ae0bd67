"""dali: zero-shot audio captioning from an image captioner (An Eye for an Ear, NeurIPS 2024).

The library: ``dali.audio`` (front end), ``dali.models`` (CAV-MAE audio encoder, LLaVA captioner, prefix and
projector files), ``dali.losses`` (MMD, OT, attentive token weights), ``dali.data``, ``dali.evaluation``,
``dali.runs`` (experiment folders). The stages live in ``dali.stages``; the built-in world in ``dali.synthetic``.
Submodules are imported on use, so ``import dali`` stays cheap.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from dali import AudioCaptioner`` without importing torch on ``import dali``
    if name == "AudioCaptioner":
        from dali.audio_captioner import AudioCaptioner

        return AudioCaptioner
    raise AttributeError(f"module 'dali' has no attribute '{name}'")
