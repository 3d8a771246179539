#!/usr/bin/env bash
# Everything the GPU has to prove, in one device call: the environment, the bf16 equivalence suite
# compiled on the GPU, and the benchmark sweeps. Tables go to stdout, logs and JSON under $OUT.
#
#   bash bench/gpu_suite.sh                 # all stages
#   bash bench/gpu_suite.sh equiv attention # some stages: env equiv attention ln_ffn tune train_step
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env equiv attention ln_ffn)
echo "results in $OUT"

for stage in "${stages[@]}"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv 2>&1 | tee "$OUT/env.txt"
      $PY -c "import jax, optax; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__)" \
        2>&1 | tee -a "$OUT/env.txt" ;;
    equiv)
      $PY -m pytest tests/test_kernels_equiv.py -q --maxfail=10 --durations=12 -p no:cacheprovider ${EQUIV_ARGS:-} 2>&1 \
        | tee "$OUT/equiv.log" | tail -n 15 ;;
    attention)
      $PY bench/attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.txt" ;;
    ln_ffn)
      $PY bench/ln_ffn.py --json "$OUT/ln_ffn.json" 2>&1 | tee "$OUT/ln_ffn.txt" ;;
    tune)
      $PY bench/tune.py 2>&1 | tee "$OUT/tune.txt"
      cp kernels/tuning.json "$OUT/tuning.json" ;;
    train_step)
      $PY bench/train_step.py --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.txt" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
