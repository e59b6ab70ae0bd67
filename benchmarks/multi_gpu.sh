#!/usr/bin/env bash
# Stages 1a, 1b, 2b on 1 GPU and under torchrun on N GPUs (same global batch), plus sharded pseudo-captions.
# Usage: benchmarks/multi_gpu.sh [N=2] [WORK=/tmp/dali_multi]   Prints loss-curve agreement and speed-ups.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-2}"; WORK="${2:-/tmp/dali_multi}"; PY="${PYTHON:-python3}"
export DALI_PROGRESS=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
$PY -m dali.cli world --data "$WORK/world" --captioner-epochs 1  # the full world: 1000 alignment clips
$PY benchmarks/make_llava.py "$WORK/llava" --tokenizer-from "$WORK/world/captioner_model"
W="$WORK/world"; L="$WORK/llava"
launch() {  # launch NPROC COMMAND ARGS...
  local n="$1"; shift
  if [ "$n" = 1 ]; then $PY -m dali.cli "$@"; else $PY -m torch.distributed.run --standalone --nproc_per_node "$n" -m dali.cli "$@"; fi
}
for n in 1 "$N"; do
  R="$WORK/run$n"
  launch "$n" prefix-tune --llava "$L" --pairs "$W/prefix_pairs.json" --epochs 12 \
    --batch-size $((16 / n)) --dtype bfloat16 --out "$R/prefix" --overwrite
  launch "$n" align --llava "$L" --train-list "$W/align.json" --method ot_att --ot-solver sinkhorn \
    --epochs 8 --batch-size $((256 / n)) --cache-vision-tokens --cache-audio-features --num-workers 4 \
    --out "$R/align" --overwrite
  # downstream of 1b, both runs use the 1-GPU run's prefix and encoder: only the sharding differs
  launch "$n" pseudo-label --llava "$L" --clips "$W/pseudo.json" --align-dir "$WORK/run1/align" \
    --prefix-dir "$WORK/run1/prefix" --strategy greedy --max-new-tokens 12 --batch-size 32 --dtype bfloat16 \
    --num-workers 4 --limit 128 --out "$R/pseudo_label" --overwrite
  launch "$n" distill --llava "$L" --align-dir "$WORK/run1/align" --pseudo-dir "$WORK/run1/pseudo_label" \
    --epochs 2 --batch-size $((16 / n)) --dtype bfloat16 --num-workers 4 --out "$R/distill" --overwrite
done
for stage in prefix align distill; do
  $PY benchmarks/compare_runs.py "$WORK/run1/$stage" "$WORK/run$N/$stage" --name "$stage"
done
$PY - "$WORK/run1/pseudo_label/pseudo_captions.jsonl" "$WORK/run$N/pseudo_label/pseudo_captions.jsonl" <<'PYEOF'
import json, sys
a, b = ([json.loads(line) for line in open(path)] for path in sys.argv[1:])
print(json.dumps({"pseudo_captions": len(a), "same_order": [r["id"] for r in a] == [r["id"] for r in b],
                  "identical_captions": sum(x["caption"] == y["caption"] for x, y in zip(a, b))}))
PYEOF
