#!/usr/bin/env bash
# Stage 2a: pseudo-captions from [image, audio, prefix]. Usage: ./infere_pseudo_labels.sh [--config PRESET] [--run NAME] [flags...]
# Preset: configs/paper/pseudo_labels.yaml by default; the synthetic world's is configs/synthetic/pseudo_labels.yaml.
exec "$(dirname "$0")/scripts/run_stage.sh" pseudo-label pseudo_labels "$@"
