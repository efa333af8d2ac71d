#!/usr/bin/env bash
# The measurements of reports/perf on an H200 (device tool), in one call of ten minutes: the generation
# lever table, random full-size weights, a full-size `run` timed per stage, scoring speed; with four
# GPUs also the scaling of the fast path under torchrun.
# Results go to $OUT. On the lent machine the project's wheels come from .whl (first lines).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/src
cd .gpu/src || exit 1
S=/tmp/bench; mkdir -p $S
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B=benchmarks/bench_run.py
nvidia-smi --query-gpu=index,name,clocks.sm,temperature.gpu --format=csv,noheader
cp -r benchmark_data/humaniphc $S/spec && cat >> $S/spec/splits.yaml <<'YAML'
  speed:
    description: one public-domain identity x 35 prompts x 10 head conditions (speed runs)
    identities: [nasa-astronaut]
    prompts: all
    conditions: all
    samples: 1
  speed2:
    description: both public-domain identities x 35 prompts x 10 head conditions (scoring speed)
    identities: [nasa-astronaut, grace-hopper]
    prompts: all
    conditions: all
    samples: 1
YAML
quiet() { grep -v -e "should be kept in float32" -e "UserWarning" -e "warn_once" -e "^$" -e "This call originates" -e "File \"/tmp/site" -e "is_torch_version"; }
GPUS=$(nvidia-smi -L | wc -l)
export TORCHINDUCTOR_CACHE_DIR=$S/inductor  # the run below reuses the graphs the lever table compiled
python3 benchmarks/make_random_weights.py --out $S/w --dtype float16 > $OUT/e2e.log 2>&1 &  # CPU, beside the GPU rows
python3 $B generation --batch 32 --fast-batch 32 --repeats 2 --only stock eager compile tolerance compile-nchw cudagraphs \
  --tolerance-fp32 --budget-s 200 --out $OUT/generation.json 2>&1 | quiet > $OUT/gen.log
wait
(python3 $B e2e --weights $S/w --runs-dir $S/runs --out $OUT/e2e.json -- --method caphuman --spec $S/spec --split speed \
   --param batch_size=32 --param dtype=bfloat16 --score-batch-size 64 --device cuda
 python3 -m caphuman_bench.cli run --method reference --spec $S/spec --split speed --runs-dir $S/ref --no-score --device cuda
 python3 $B scoring $S/ref/reference-* --perturb --weights $S/w --score-batch 64 --out $OUT/scoring.json) 2>&1 | quiet >> $OUT/e2e.log
if [ "$GPUS" -ge 4 ]; then  # scaling: the fast path alone on one GPU, then on four under torchrun
  CUDA_VISIBLE_DEVICES=0 python3 $B throughput --batch 32 --batches 4 --out $OUT/throughput_1gpu.json 2>&1 | quiet > $OUT/thr.log
  timeout 170 torchrun --standalone --nproc_per_node 4 $B throughput --batch 32 --batches 4 \
    --out $OUT/throughput_4gpu.json 2>&1 | quiet >> $OUT/thr.log
fi
tail -n 25 $OUT/gen.log; tail -n 40 $OUT/e2e.log; tail -n 6 $OUT/thr.log 2>/dev/null
