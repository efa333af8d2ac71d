#!/usr/bin/env bash
# The headline measurements of reports/perf on one H200 (device tool), each part within one call of
# ten minutes: PARTS="scoring generation" (default), "e2e" (a full-size `run` timed per stage;
# E2E_SPLIT=speed, 350 images, or speed-score, 1,400), and with four GPUs "scaling" (the fast path
# under torchrun). Results go to $OUT; wheels come from .whl (carry it).
#   scoring:    every metric family whose weights exist there, over 1,400 distinct face images; with
#               SCORE_PROCS="4 8" also that many scoring processes sharing the GPU (torchrun)
#   generation: stock diffusers, our eager path, the default fast path and it without the shared
#               guidance prefix, batch 64, one process; each CapHuman row also profiled once
#               (kernel time by kind, GPU idle, host waits)
#   invariance: half the `speed` split's reference images (175, distinct), every family with weights, scored
#               on the GPU with batch 64 and 7, by INV_PROCS (4) processes, with PyTorch's default TF32 and
#               on the CPU: per value the largest difference (issue 25) -> $OUT/scoring_invariance.json
set -u
PARTS=${PARTS:-scoring generation}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
S=/tmp/bench; mkdir -p $S
B=benchmarks/bench_run.py
quiet() { grep -v -e "should be kept in float32" -e "UserWarning" -e "warn_once" -e "^$" -e "This call originates" -e "File \"/tmp/site" -e "is_torch_version"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=index,name,clocks.sm,temperature.gpu --format=csv,noheader
cp -r caphuman_bench/benchmark_data/humaniphc $S/spec && cat >> $S/spec/splits.yaml <<'YAML'
  speed:
    description: one public-domain identity x 35 prompts x the paper's 10 head conditions (speed runs)
    identities: [nasa-astronaut]
    prompts: all
    conditions: *paper_conditions
    samples: 1
  speed-score:
    description: both public-domain identities x 35 prompts x the paper's 10 head conditions x 2 (scoring speed)
    identities: [nasa-astronaut, grace-hopper]
    prompts: all
    conditions: *paper_conditions
    samples: 2
YAML
if has scoring || has e2e; then
  python3 benchmarks/make_random_weights.py --out $S/w --dtype float16 --device cuda > $OUT/weights.log 2>&1
fi
if has scoring; then
  for i in 0 1 2 3 4 5 6 7; do  # the images to score: the reference photos, 8 CPU processes
    python3 -m caphuman_bench.cli run --method reference --spec $S/spec --split speed-score --runs-dir $S/ref --no-score --shard $i/8 > /dev/null 2>&1 &
  done; wait
  timeout ${SCORE_LIMIT_S:-300} python3 $B scoring $S/ref/reference-* --perturb --weights $S/w --score-batch 64 ${SCORE_EXTRA---profile head_control} \
    --out $OUT/scoring.json 2>&1 | quiet > $OUT/score.log
  for n in ${SCORE_PROCS-}; do  # n scoring processes sharing the GPU(s); each takes its share of the host threads (parallel.host_threads)
    OMP_NUM_THREADS=$(( ($(nproc) + n - 1) / n )) timeout ${SCORE_PROCS_LIMIT_S:-150} torchrun --standalone --nproc_per_node $n $B scoring $S/ref/reference-* --weights $S/w --score-batch 64 \
      --warm-repeats 2 --out $OUT/scoring_${n}procs.json 2>&1 | quiet >> $OUT/score.log
  done
fi
if has invariance; then
  [ -d $S/w ] || python3 benchmarks/make_random_weights.py --out $S/w --dtype float16 --device cuda \
    --only facenet_vggface2 clip_vit_l14_openai deca_model fan_2dfan4 > $OUT/weights.log 2>&1
  for i in 0 1 2 3; do  # the even shards of 8: half of the split, all conditions and prompts of its identity
    python3 -m caphuman_bench.cli run --method reference --spec $S/spec --split speed --runs-dir $S/inv --no-score --shard $((2 * i))/8 > /dev/null 2>&1 &
  done; wait
  timeout ${INV_LIMIT_S:-450} python3 $B scoring $S/inv/reference-* --invariance --perturb --weights $S/w --invariance-procs ${INV_PROCS:-4} \
    --out $OUT/scoring_invariance.json 2>&1 | quiet > $OUT/invariance.log
fi
if has generation; then
  timeout 480 python3 $B generation --batch 64 --fast-batch 64 --repeats 3 --only stock eager compile no-prefix --kernel-profile --budget-s 300 \
    --out $OUT/generation.json 2>&1 | quiet > $OUT/gen.log
fi
if has e2e; then
  python3 $B e2e --weights $S/w --runs-dir $S/runs --out $OUT/e2e_run.json -- --method caphuman --spec $S/spec --split ${E2E_SPLIT:-speed} \
    --param batch_size=64 --param dtype=bfloat16 --score-batch-size 64 --device cuda 2>&1 | quiet > $OUT/e2e.log
  cp $S/runs/caphuman-*/status.jsonl $OUT/e2e_status.jsonl
fi
if has scaling && [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then  # the fast path alone on one GPU, then on four under torchrun
  CUDA_VISIBLE_DEVICES=0 python3 $B throughput --batch 64 --batches 4 --out $OUT/throughput_1gpu.json 2>&1 | quiet > $OUT/thr.log
  timeout 200 torchrun --standalone --nproc_per_node 4 $B throughput --batch 64 --batches 4 \
    --out $OUT/throughput_4gpu.json 2>&1 | quiet >> $OUT/thr.log
fi
for f in score invariance gen e2e thr; do [ -f $OUT/$f.log ] && tail -n 14 $OUT/$f.log; done
