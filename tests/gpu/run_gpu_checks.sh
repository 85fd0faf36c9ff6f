#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and nvcc): HF parity of cuda artifacts (pytest), then decode
# and prefill of the Qwen3-0.6B and MoE-small shapes (random weights) against HF transformers
# eager on the same GPU. Usage: tests/gpu/run_gpu_checks.sh [OUT] (results: OUT/*.json)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$(realpath -m "${1:-artifacts/gpu-checks}")"
python="${PYTHON:-python3}"
mkdir -p "$out"

"$python" -m pytest -q tests/test_gpu.py tests/test_targets.py -k "cuda or gpu"

arch=$("$python" -c 'import tvm; print("sm_90" if int(tvm.cuda(0).compute_version.split(".")[0]) >= 9 else "sm_80")')
for shape in QWEN3_0_6B QWEN3_MOE_SMALL; do
    "$python" -c "import sys
from qwen3c.compile import random_checkpoint as rc
rc.write_random_checkpoint(sys.argv[1], getattr(rc, sys.argv[2]), dtype='bfloat16')" \
        "$out/$shape" "$shape"
    "$python" -m qwen3c.cli compile "$out/$shape" --target cuda --arch "$arch" \
        --dtype bfloat16 -o "$out/$shape-cuda"
    "$python" -m qwen3c.cli bench "$out/$shape-cuda" --prompt-lengths 128,1024 \
        --vs-hf "$out/$shape" --json "$out/bench-$shape.json"
done
