#!/usr/bin/env bash
# Inference (--modality audio|audio_vis|image), predictions and scores. Usage: ./inference.sh [--config PRESET] [--run NAME] [flags...]
# Preset: configs/paper/inference.yaml by default; the synthetic world's is configs/synthetic/inference.yaml.
exec "$(dirname "$0")/scripts/run_stage.sh" infer inference "$@"
