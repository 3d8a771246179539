#!/usr/bin/env bash
# Everything the GPU has to prove, in one device call: the environment, the bf16 equivalence suite
# compiled on the GPU, and the benchmark sweeps. Tables go to stdout, logs and JSON under $OUT.
#
#   bash bench/gpu_suite.sh                 # all stages
#   bash bench/gpu_suite.sh equiv attention # some stages: env peak equiv speed attention head_dims
#                                           #   bounds ln_ffn loss_head tune train_step mosaic curves
#                                           #   profile scaling masks segments gpt2 ncu
#                                           #   gpt2_batch curves_gpt2 ab ptxas
#   EQUIV_K="d256 or d384" bash bench/gpu_suite.sh equiv   # the equivalence cases matching -k
#   TUNE_ARGS="--op attention/mosaic_gpu" bash bench/gpu_suite.sh tune
#   git diff BASE > change.patch; AB_PATCH=change.patch AB_COMMAND="python3 bench/attention.py
#     --impl ours --seq 512" bash bench/gpu_suite.sh ab       # best of alternated runs
# The device has JAX, optax, orbax and tokenizers; `curves` and `profile` also need the wheels that
# bench/fetch_wheels.sh downloads into .whl/ (pass .whl in the device call's carry).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
# JAX takes the GPU's memory as it needs it: the equivalence suite's workers (pytest-xdist) and
# the PyTorch peers share the one GPU.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
stages=("$@")
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
[ ${#stages[@]} -eq 0 ] && stages=(env peak equiv attention ln_ffn)
echo "results in $OUT"

for stage in "${stages[@]}"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv 2>&1 | tee "$OUT/env.txt"
      $PY -c "import jax, optax; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__)" \
        2>&1 | tee -a "$OUT/env.txt"
      $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 \
        | tail -n 1 | tee -a "$OUT/env.txt" ;;
    peak)     # the ceilings: bf16 matmul and copy
      $PY bench/peak.py --json "$OUT/peak.json" 2>&1 | tee "$OUT/peak.txt" ;;
    equiv)    # -v: each case's outcome lands in equiv.log as it finishes, stamped with the seconds
              # since the start, so a run cut short still says which passed and what each worker
              # (gwN) spent between its cases; --durations: where the time went. A worker per
              # two cores.
      # XLA's GEMM autotuning off: it compiled candidate kernels for every dot of the f32
      # references, and the cases took 30-90 s each (bench/RESULTS.md); the Pallas kernels under
      # test are custom calls, which it never touched.
      workers=$(( $(nproc) / 2 ))
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" $PY -m pytest tests/test_kernels_equiv.py -v -n $workers --maxprocesses $workers --maxfail=10 \
        --durations=40 --timeout=300 -p no:cacheprovider ${EQUIV_K:+-k "$EQUIV_K"} 2>&1 \
        | $PY -u -c 'import sys, time; t = time.monotonic(); [print(f"{time.monotonic() - t:6.1f} {l}", end="") for l in sys.stdin]' \
        | tee "$OUT/equiv.log" | grep -E "FAILED|ERROR|passed|failed" | tail -n 15 ;;
    speed)    # pytest-benchmark's speed cases; bench/speed/<device>/ keeps the runs to compare with
      dir="bench/speed/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr ' ' '_')"
      $PY -m pytest tests/test_speed.py -q -n 0 --dist no -p no:cacheprovider --benchmark-storage "file://$dir" \
        --benchmark-autosave --benchmark-columns=median,min,max --benchmark-sort=name \
        ${SPEED_COMPARE:+--benchmark-compare} 2>&1 | tee "$OUT/speed.txt" | tail -n 30
      cp "$(ls -t "$dir"/*/*.json | head -n 1)" "$OUT/speed.json" ;;
    attention)   # the default sweep and micro_gpt_4's training shape (ATTENTION_ARGS: e.g. --impl)
      $PY bench/attention.py ${ATTENTION_ARGS:-} --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.txt"
      $PY bench/attention.py ${ATTENTION_ARGS:-} --batch 128 --seq 1024 --heads 8 --head-dim 64 \
        --json "$OUT/attention_train_shape.json" 2>&1 | tail -n 8 | tee "$OUT/attention_train_shape.txt" ;;
    head_dims)   # every head_dim the kernels serve (32 and 96 padded), beside JAX's and PyTorch's cuDNN
      $PY bench/attention.py --impl cudnn,torch_cudnn,ours,mosaic_gpu,triton --head-dim 32,64,96,128,256 \
        --seq ${HEAD_DIM_SEQ:-2048} --heads 16 --json "$OUT/head_dims.json" 2>&1 | tee "$OUT/head_dims.txt" ;;
    bounds)   # what the Mosaic GPU forward spends on exponentials and on matmuls
      $PY bench/attention_bounds.py --seq 1024,4096 --head-dim 64,128 --json "$OUT/bounds.json" 2>&1 \
        | tee "$OUT/bounds.txt"
      $PY bench/attention_bounds.py --batch 128 --seq 1024 --heads 8 --head-dim 64 \
        --json "$OUT/bounds_train_shape.json" 2>&1 | tail -n 6 | tee "$OUT/bounds_train_shape.txt" ;;
    masks)    # grouped-query heads beside JAX's and PyTorch's cuDNN (and FA2); packed documents and a
              # window beside the dense kernel; "ours" as shipped, "mosaic_gpu" with its own backward
      for dims in "128 32 8" "64 16 4"; do set -- $dims
        $PY bench/attention.py --impl cudnn,torch_cudnn,torch_flash,ours,mosaic_gpu --backward mosaic_gpu \
          --head-dim $1 --heads $2 --kv-heads $3 --seq 1024,2048,4096,8192 --json "$OUT/gqa_d$1.json" \
          2>&1 | tail -n 22 | tee "$OUT/gqa_d$1.txt"
      done
      for case in "dense:--impl cudnn,ours" "segments:--impl xla,cudnn,ours,mosaic_gpu --segments 512" \
                  "window:--impl cudnn,ours,mosaic_gpu --window 1024"; do
        $PY bench/attention.py ${case#*:} --backward mosaic_gpu --seq 8192 --batch 2 --heads 16 \
          --head-dim 128 --json "$OUT/mask_${case%%:*}.json" 2>&1 | tail -n 6 | tee "$OUT/mask_${case%%:*}.txt"
      done ;;
    segments)   # packed documents (mean length 512, B2 S8192 H16 D128): cuDNN with the dense
                # mask and ours as shipped beside the dense causal kernel, then the Mosaic GPU
                # kernels under each of SEGMENT_VARIANTS (flag sets separated by ";")
      shape="--seq 8192 --batch 2 --heads 16 --head-dim 128"
      $PY bench/attention.py --impl cudnn,ours $shape --json "$OUT/segments_dense.json" 2>&1 \
        | tail -n 3 | tee "$OUT/segments.txt"
      $PY bench/attention.py --impl cudnn,ours --segments 512 $shape \
        --json "$OUT/segments_shipped.json" 2>&1 | tail -n 3 | tee -a "$OUT/segments.txt"
      IFS=";" read -r -a variants <<< "${SEGMENT_VARIANTS:-}"
      for flags in "${variants[@]}"; do echo "mosaic_gpu $flags"
        $PY bench/attention.py --impl mosaic_gpu --segments 512 $shape $flags 2>&1 | tail -n 1 \
          | tee -a "$OUT/segments.txt"
      done ;;
    ncu)      # Nsight Compute on one forward and one forward+backward of ours and PyTorch's
              # cuDNN per shape (NCU_SHAPES: bench/attention.py's shape flags, ";" between shapes;
              # NCU_IMPL), the whole report in $OUT, each kernel's headline figures on stdout
      IFS=";" read -r -a shapes <<< "${NCU_SHAPES:---batch 32 --seq 512 --heads 16 --head-dim 128;--batch 16 --seq 1024 --heads 32 --head-dim 64}"
      for shape in "${shapes[@]}"; do
        report="$OUT/ncu_$(echo "$shape" | tr -d ' -').txt"; echo "$shape -> $report"
        ncu --clock-control none --target-processes all -k "regex:flash|fmha|sdpa|attention" \
          --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
          --section LaunchStats --section InstructionStats \
          $PY bench/attention.py --impl ${NCU_IMPL:-ours,torch_cudnn} $shape --warmup 0 \
          --repeats 1 --calls 1 > "$report" 2>&1
        grep -E '^  [^ ].*[(]|Duration|Executed Ipc Active|Issue Slots Busy|Compute [(]SM[)] Thr|Memory Throughput|Registers Per|Grid Size|Warp Cycles Per Issued|Executed Instructions  ' \
          "$report" | grep -v "^  [=]" | head -n 120
      done ;;
    ab)       # a change timed against the tree without it, in alternated runs (bench/ab.py):
              # AB_PATCH its diff, applied in the tree (an untracked file there travels with it),
              # AB_COMMAND the benchmark, AB_RUNS the rounds
      $PY bench/ab.py --patch "${AB_PATCH:?AB_PATCH: the change as a diff, applied in the tree}" \
        --runs "${AB_RUNS:-3}" --json "$OUT/ab.json" -- ${AB_COMMAND:-$PY bench/attention.py --impl ours} \
        2>&1 | tee "$OUT/ab.txt" | grep -E "^===|^best of|^  [a-z_]+=|Error|error:" ;;
    ptxas)    # ptxas's word on every Mosaic GPU kernel the sweep compiles (PTXAS_COMMAND: another
              # benchmark): registers, spills, and its performance-loss notes, such as the wgmmas
              # it serialized, with no spill, in session 33's 30% slower forward
      $PY bench/ptxas.py -- ${PTXAS_COMMAND:-$PY bench/attention.py --impl ours} 2>&1 \
        | tee "$OUT/ptxas.txt" | grep -E "PERFORMANCE LOSS|kernel compiles|Error" ;;
    mosaic)   # the Mosaic GPU attention forward beside cuDNN and the Triton kernel
      $PY bench/attention.py --impl cudnn,triton,mosaic_gpu --json "$OUT/attention_mosaic.json" 2>&1 \
        | tee "$OUT/attention_mosaic.txt" ;;
    ln_ffn)
      $PY bench/ln_ffn.py --json "$OUT/ln_ffn.json" 2>&1 | tee "$OUT/ln_ffn.txt" ;;
    loss_head)   # the loss head beside XLA's fusion of the math and the PyTorch peers: micro_gpt_4's
                 # head (V 9000, d 512) and GPT-2's (V 50257, d 768); LOSS_HEAD_ARGS: e.g. --impl
      $PY bench/loss_head.py ${LOSS_HEAD_ARGS:-} --json "$OUT/loss_head.json" 2>&1 | tee "$OUT/loss_head.txt"
      $PY bench/loss_head.py ${LOSS_HEAD_ARGS:-} --tokens 65536 --vocab 50257 --d 768 \
        --json "$OUT/loss_head_gpt2.json" 2>&1 | tee "$OUT/loss_head_gpt2.txt" ;;
    loss_head_parts)   # the gradient's passes one by one, per chunk size, at both heads
      $PY bench/loss_head_parts.py --vocab 50257 --d 768 --chunks 1024,2048,4096 2>&1 | tail -n 6 | tee "$OUT/loss_head_parts.txt"
      $PY bench/loss_head_parts.py --vocab 9000 --d 512 --chunks 2048,4096,8192,16384 2>&1 | tail -n 7 | tee -a "$OUT/loss_head_parts.txt" ;;
    tune)     # records into $OUT/tuning.json key by key, so a run cut short keeps what it measured
      cp kernels/tuning.json "$OUT/tuning.json"
      $PY bench/tune.py --table "$OUT/tuning.json" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.txt" ;;
    train_step)   # TRAIN_STEP_ARGS: e.g. --kernels xla,pallas --batch 64
      $PY bench/train_step.py ${TRAIN_STEP_ARGS:-} --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.txt" ;;
    curves)   # micro_gpt_4 at seq 1024, reference vs pallas: curves.png and curves.json come back
      $PY bench/train_curves.py --data .whl/shakespeare --out /tmp/curves 2>&1 | tee "$OUT/curves.log" \
        | tail -n 30 | tee "$OUT/curves.txt"
      cp /tmp/curves/curves.png /tmp/curves/curves.json "$OUT/" ;;
    gpt2)     # gpt2_small's train step: xla and pallas at batch 32, the reference at 16 (on the
              # H200 it fits neither 64 nor 32, and each batch that does not fit costs minutes of
              # compilation; GPT2_BATCH, GPT2_REFERENCE_BATCH)
      $PY bench/train_step.py --preset gpt2_small --kernels xla,pallas --batch ${GPT2_BATCH:-32} \
        --json "$OUT/train_step_gpt2.json" 2>&1 | tee "$OUT/train_step_gpt2.txt"
      $PY bench/train_step.py --preset gpt2_small --kernels reference,xla,pallas \
        --batch ${GPT2_REFERENCE_BATCH:-16} --json "$OUT/train_step_gpt2_reference.json" 2>&1 \
        | tee "$OUT/train_step_gpt2_reference.txt" ;;
    gpt2_batch)   # the largest batch each path fits at gpt2_small (one short timing each):
                  # GPT2_PATHS lists path:candidates, largest first. A candidate whose compiled
                  # step needs more than the memory XLA may take (75% of the device's, its
                  # default) costs its compilation only. GEMM autotuning is off: it leaves the
                  # memory as it is, so these timings are no measure of speed (session 21)
      for path in ${GPT2_PATHS:-xla:160,128 pallas:384,320,256,192,160}; do
        XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" $PY bench/train_step.py \
          --preset gpt2_small --kernels ${path%%:*} --warmup 1 --repeats 1 --steps 2 \
          --batches ${path#*:} 2>&1 | grep -E "batch|fits|GiB" | tee -a "$OUT/gpt2_batch.txt"
      done ;;
    curves_gpt2)   # gpt2_small, reference vs xla and pallas, 300 steps (GPT2_CURVE_STEPS):
                   # curves_gpt2.json comes back; the whole log lands in $OUT as it runs, so a run
                   # cut short says where. xla beside pallas: how far two paths of the same math
                   # drift once training turns unstable (session 21: pallas, 0.94% after step 57)
      $PY bench/train_curves.py --preset gpt2_small --model-d 768 --heads 12 --vocab 50257 \
        --kernels ${GPT2_CURVE_PATHS:-reference,xla,pallas} \
        --batch-size ${GPT2_CURVE_BATCH:-16} --max-steps ${GPT2_CURVE_STEPS:-300} \
        --data .whl/shakespeare --out /tmp/curves_gpt2 2>&1 | tee "$OUT/curves_gpt2.log" \
        | tail -n 30 | tee "$OUT/curves_gpt2.txt"
      cp /tmp/curves_gpt2/curves.json "$OUT/curves_gpt2.json" ;;
    profile)  # our Pallas kernels must appear by name among the traced GPU kernels; the capture
              # comes back (gzipped) for TensorBoard, with the step's optimized HLO, where the
              # trace's XLA names (fusion_375, ...) are defined. PROFILE_ARGS: the step traced
              # (default micro_gpt_4 at batch 64), PROFILE_TAG: its files' name
      tag=${PROFILE_TAG:-micro_gpt_4}
      rm -rf "/tmp/prof_$tag" "/tmp/hlo_$tag"
      $PY bench/train_step.py --kernels pallas ${PROFILE_ARGS:---batches 64} --repeats 1 --steps 3 \
        --profile "/tmp/prof_$tag" --dump-hlo "/tmp/hlo_$tag" 2>&1 | tail -n 5
      gzip -c "$(find "/tmp/prof_$tag" -name '*.xplane.pb' | head -n 1)" > "$OUT/pallas_step_$tag.xplane.pb.gz"
      gzip -c /tmp/hlo_$tag/*.hlo.txt > "$OUT/pallas_step_$tag.hlo.txt.gz"
      $PY -X faulthandler bench/trace_kernels.py "/tmp/prof_$tag" --device --top ${PROFILE_TOP:-30} \
        --expect flash_attention_fwd,flash_attention_dkdv,flash_attention_dq,layernorm_ffn,logits_loss \
        > "$OUT/trace_kernels_$tag.txt" 2> "$OUT/trace_kernels_$tag.log"
      echo "trace_kernels exit status $?"; cat "$OUT/trace_kernels_$tag.txt" ;;
    scaling)  # the same global batch on 1, 2, ... GPUs (SCALING_DEVICES: the counts the machine
              # has), the parameters replicated and split (fsdp), at gpt2_small
      $PY bench/train_step.py --preset gpt2_small --kernels pallas --batch ${SCALING_BATCH:-64} \
        --devices ${SCALING_DEVICES:-1,2} --shard replicate,fsdp --json "$OUT/scaling.json" \
        2>&1 | tee "$OUT/scaling.txt" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
