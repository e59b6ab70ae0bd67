#!/usr/bin/env bash
# Stage 1b: distribution alignment of the audio encoder. Usage: ./alignment.sh [--config PRESET] [--run NAME] [flags...]
# Preset: configs/paper/alignment.yaml by default; the synthetic world's is configs/synthetic/alignment.yaml.
exec "$(dirname "$0")/scripts/run_stage.sh" align alignment "$@"
