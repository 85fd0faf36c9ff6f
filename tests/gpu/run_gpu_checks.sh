#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and nvcc): HF parity of cuda artifacts, then a decode and
# prefill benchmark of a Qwen3-0.6B-shaped random checkpoint against HF on the same GPU.
# Never run so far: no GPU was available to this project. Usage: tests/gpu/run_gpu_checks.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-artifacts/gpu-checks}"
mkdir -p "$out"

python -m pytest -q tests/test_gpu.py tests/test_targets.py -k "cuda"

arch=$(python -c 'import tvm; m, n = tvm.cuda(0).compute_version.split("."); print("sm_90" if int(m) >= 9 else "sm_80")')
python - "$out/qwen3-0.6b-shape" <<'PY'
import sys
from qwen3c.compile.random_checkpoint import write_random_checkpoint
shape = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             max_position_embeddings=4096, vocab_size=151936, tie_word_embeddings=True)
write_random_checkpoint(sys.argv[1], shape, dtype="bfloat16")
PY
qwen3c compile "$out/qwen3-0.6b-shape" --target cuda --arch "$arch" --dtype bfloat16 \
    -o "$out/qwen3-0.6b-cuda"
qwen3c bench "$out/qwen3-0.6b-cuda" --prompt-lengths 128,1024 --vs-hf "$out/qwen3-0.6b-shape" \
    --json "$out/bench.json"
