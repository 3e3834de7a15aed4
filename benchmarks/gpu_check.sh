#!/usr/bin/env bash
# One-shot check of a fresh CUDA machine (H100/H200; torch 2.11+, triton 3.6+, no network), run from
# the repository root:
#
#     benchmarks/gpu_check.sh OUTDIR            (the whole run stops itself by BUDGET_S, 400 s by default)
#     DRY=1 benchmarks/gpu_check.sh OUTDIR      the same steps on the CPU at tiny sizes (TRITON_INTERPRET=1)
#
# Steps, each capped with `timeout` (and by what is left of the budget), each writing its own file:
#   env.json    versions, device, grouped_mm support, the dense bf16 matmul rate (8192^3, random data)
#   tests.log   the GPU tests: tests/nn/test_gpu.py and the fused-scoring kernel tests on CUDA
#   scores.json the fused AoE scoring kernel against the PyTorch path, E = 64 and 256 (bench_scores.py)
#   train.log   bf16 training steps of AoE and MoE on the `small` recipe (loss, tokens/s, MFU, memory)
#   layers.json the layer benchmark (bench_layers.py) at E = 8, 64 and AoE/MoE at E = 256
#   bench.log   the benchmarks' own output
#   summary.md  always written: every step's exit code and seconds (124 = its cap), then the numbers
# Seven files: the device tool brings back at most eight. Nothing is installed or downloaded.
set -uo pipefail
OUTDIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DRY=${DRY:-0}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 OMP_NUM_THREADS=1
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
SUM="$OUTDIR/summary.md"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-400} ))
printf '# gpu_check (DRY=%s)\n\n| step | exit (124: its cap) | seconds |\n|---|---|---|\n' "$DRY" > "$SUM"

step() {  # step NAME CAP LOG CMD...: runs CMD for at most min(CAP, budget left - 20 s), output appended to LOG
  local name=$1 cap=$2 log=$3; shift 3
  local t0 left rc
  t0=$(date +%s); left=$(( DEADLINE - t0 - 20 ))
  if [ "$left" -lt 10 ]; then printf '| %s | skipped (budget) | 0 |\n' "$name" >> "$SUM"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "### $name: $*" >> "$log"
  timeout --kill-after=5 "$cap" "$@" >> "$log" 2>&1
  rc=$?
  printf '| %s | %s | %s |\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$SUM"
}

# 1. environment and the dense matmul rate
step env 60 "$TMP/env.log" $PY benchmarks/gpu_check_env.py --json "$OUTDIR/env.json"

# 2. the GPU tests (on the CPU: the kernel tests under the interpreter, a few)
if [ "$DRY" = 1 ]; then TESTS=(tests/nn/test_gpu.py tests/nn/test_fused_scores.py -k "kernel_norms and shape1 and l2")
else TESTS=(tests/nn/test_gpu.py tests/nn/test_fused_scores.py); fi
step tests 120 "$OUTDIR/tests.log" $PY -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"

# 3. the fused scoring kernel against the PyTorch path
if [ "$DRY" = 1 ]; then SCORES=(--dry-run); else SCORES=(--reps 10); fi
step scores 90 "$OUTDIR/bench.log" $PY benchmarks/bench_scores.py "${SCORES[@]}" --json "$OUTDIR/scores.json"

# 4. bf16 training steps on the small recipe (DRY: the tiny recipe, a few fp32 steps on the CPU)
if [ "$DRY" = 1 ]; then
  TRAIN=(--config tiny model.d_model=32 model.n_layers=1 model.n_heads=2 model.d_ffn=32 model.d_low=8
         data.max_bytes=100000 data.vocab_size=300 train.seq_len=32 train.batch_size=4 train.micro_batch_size=4
         train.max_steps=3 train.log_every=1 train.eval_every=1000 train.eval_batches=1 train.checkpoint_every=1000
         train.device=cpu train.num_threads=1)
else
  TRAIN=(--config small data.max_bytes=6000000 data.vocab_size=8192 train.batch_size=16 train.micro_batch_size=16
         train.max_steps=40 train.warmup_steps=5 train.log_every=5 train.eval_every=1000 train.eval_batches=4
         train.checkpoint_every=1000 train.device=cuda)
fi
for ffn in aoe moe; do
  step "train-$ffn" 100 "$OUTDIR/train.log" $PY -m aoe.cli train --out "$TMP/run-$ffn" --quiet "${TRAIN[@]}" \
    model.ffn=$ffn data.cache_dir="$TMP/cache"
done

# 5. the layer benchmark at E = 8 and 64, and AoE/MoE at E = 256
if [ "$DRY" = 1 ]; then
  SMALL=(--preset cpu --tokens 128 --d-model 32 --d-ffn 32 --d-low 8 --reps 1 --warmup 1)
  LAYERS=("e8:${SMALL[*]} --n-experts 8 --top-k 2 --no-hf" "e64:${SMALL[*]} --n-experts 64 --top-k 8 --no-hf"
          "e256:${SMALL[*]} --n-experts 256 --top-k 8 --only-ours")
else
  LAYERS=("e8:--preset gpu-e8 --reps 5" "e64:--preset gpu-e64 --reps 5" "e256:--preset gpu-e64 --n-experts 256 --reps 3 --only-ours")
fi
for spec in "${LAYERS[@]}"; do
  # shellcheck disable=SC2086  # the options are words
  step "layers-${spec%%:*}" 75 "$OUTDIR/bench.log" $PY benchmarks/bench_layers.py ${spec#*:} --json "$TMP/layers-${spec%%:*}.json"
done

# 6. the numbers, from whatever the steps left (never fails the summary's step table)
timeout 30 $PY benchmarks/gpu_check_summary.py "$OUTDIR" "$TMP" >> "$SUM" 2>&1 || echo "(summary: exit $?)" >> "$SUM"
cat "$SUM"
