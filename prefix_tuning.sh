#!/usr/bin/env bash
# Stage 1a: prefix tuning. Usage: ./prefix_tuning.sh [--config PRESET] [--run NAME] [flags...]
# Preset: configs/paper/prefix_tuning.yaml by default; the synthetic world's is configs/synthetic/prefix_tuning.yaml.
exec "$(dirname "$0")/scripts/run_stage.sh" prefix-tune prefix_tuning "$@"
