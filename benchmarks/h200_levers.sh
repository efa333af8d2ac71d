#!/usr/bin/env bash
# One device call (10 minutes): the generation levers not measured before — cuDNN's autotuner, inductor
# freezing, both, a larger batch, GEMM-only max-autotune — beside stock diffusers and the default fast
# path, in one process on one GPU. Results go to $OUT. Wheels from .whl (carry it).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=index,name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 560 python3 benchmarks/bench_run.py generation --batch 32 --fast-batch 32 --large-batch 64 --repeats 2 \
  --only stock compile benchmark freeze freeze-benchmark large-batch gemm-autotune --budget-s 420 \
  --out $OUT/generation_levers.json 2>&1 | grep -v -e "should be kept in float32" -e "UserWarning" -e "warn_once" -e "^$" \
  -e "This call originates" -e "File \"/tmp/site" -e "is_torch_version" | tee $OUT/levers.log | tail -n 30
