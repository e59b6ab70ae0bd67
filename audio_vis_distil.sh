#!/usr/bin/env bash
# Stage 2b: audio-only distillation of the projector. Usage: ./audio_vis_distil.sh [--config PRESET] [--run NAME] [flags...]
# Preset: configs/paper/distillation.yaml by default; the synthetic world's is configs/synthetic/distillation.yaml.
exec "$(dirname "$0")/scripts/run_stage.sh" distill distillation "$@"
