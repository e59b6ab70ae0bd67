"""Models: the CAV-MAE audio encoder, the LLaVA captioner wrapper, the prefix and projector files."""
