#!/usr/bin/env bash
# The GPU tier (docs/gpu.md): the learners' tensor code in bf16 on a bare CUDA machine with torch,
# transformers, accelerate and peft (no vLLM, Ray or TRL; nothing is downloaded). One command:
#   bash tests/gpu/run.sh            # on the GPU
#   CAI_GPU_TIER_DEVICE=cpu bash tests/gpu/run.sh   # the same checks on the CPU, but the CUDA-only one
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider -rs "$@"
