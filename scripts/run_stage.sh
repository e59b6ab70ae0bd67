#!/usr/bin/env bash
# Shared launcher of the top-level stage scripts: run_stage.sh MODULE PRESET [flags...]
# Runs `python -m dali.stages.MODULE --config configs/paper/PRESET.yaml flags...` from the repository root;
# a later --config in the flags replaces the preset, and flags win over it. NPROC=N runs it under torchrun.
set -euo pipefail
module="$1" preset="$2"
shift 2
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ -n "${NPROC:-}" ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m "dali.stages.$module" \
    --config "configs/paper/$preset.yaml" "$@"
fi
exec "$PYTHON" -m "dali.stages.$module" --config "configs/paper/$preset.yaml" "$@"
