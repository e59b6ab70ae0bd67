#!/usr/bin/env bash
# Shared launcher of the top-level stage scripts: run_stage.sh COMMAND PRESET [flags...]
# Runs `python -m dali.cli COMMAND --config configs/paper/PRESET.yaml flags...` from the repository root;
# a later --config in the flags replaces the preset, and flags win over it.
#   NPROC=N                  N processes (one per GPU) under torchrun, on this machine (--standalone)
#   NNODES=M NODE_RANK=r     M machines, each running this same command with its own r (0..M-1), meeting at
#   MASTER_ADDR=host           torchrun's c10d rendezvous on host:MASTER_PORT (default 29500), or at
#   [MASTER_PORT=p]            RDZV_ENDPOINT=host:port; RDZV_ID names the job (default: dali). See docs/cluster.md.
set -euo pipefail
command="$1" preset="$2"
shift 2
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
stage=(-m dali.cli "$command" --config "configs/paper/$preset.yaml" "$@")
if [ "${NNODES:-1}" -gt 1 ]; then
  : "${NODE_RANK:?NODE_RANK (0..NNODES-1) must be set on each node}"
  endpoint="${RDZV_ENDPOINT:-${MASTER_ADDR:?MASTER_ADDR (or RDZV_ENDPOINT) must name the first node}:${MASTER_PORT:-29500}}"
  exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc_per_node "${NPROC:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "${RDZV_ID:-dali}" "${stage[@]}"
fi
if [ -n "${NPROC:-}" ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "${stage[@]}"
fi
exec "$PYTHON" "${stage[@]}"
