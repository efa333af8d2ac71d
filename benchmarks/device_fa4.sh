#!/usr/bin/env bash
# FlashAttention-4 and float8 on one Hopper GPU (issue 24). Results go to $OUT.
#   CapHuman's attention shapes kernel by kernel (bench_attention.py); the default fast path, the same
#   with `sdpa=fa4` and with float8 linear layers (`fp8`), batch 64, in one process (bench_run.py
#   generation; ROWS to change them); the conformance vectors in float32, bfloat16 and with float8.
#
# flash-attn-4 needs nvidia-cutlass-dsl-libs-cu13, a 92 MB wheel that does not fit one call beside this
# repository: benchmarks/carry_fa4.sh splits it into parts that three calls before this one leave in
# /tmp/fa4parts on the warm machine (its header says how); the last part and the wheels
# (benchmarks/device_wheels_fa4.txt, diffusers) travel in .whl with this call.
set -u
START=$(date +%s)
mkdir -p /tmp/fa4parts && cp .whl/*.part* /tmp/fa4parts/ 2>/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if [ "$(ls /tmp/fa4parts | wc -l)" -ge "${FA4_PARTS:-4}" ]; then  # all parts here: FA4's library
  cat /tmp/fa4parts/cu13.tar.xz.* | xz -d | tar -x -C /tmp/site || exit 1
else
  echo "FA4's library did not travel (parts: $(ls /tmp/fa4parts | tr '\n' ' ')): its rows say it is missing"
fi
# the cutlass DSL's own .pth adds this folder; --target installs are not site folders
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor CAPHUMAN_BENCH_COMPILE_CACHE=/tmp/inductor
quiet() { grep -v -e "should be kept in float32" -e "UserWarning" -e "warn_once" -e "^$" -e "This call originates" -e "is_torch_version"; }
nvidia-smi --query-gpu=index,name,clocks.sm,temperature.gpu --format=csv,noheader
echo "installed in $(( $(date +%s) - START )) s"
timeout 60 python3 benchmarks/bench_run.py conformance-levers --out $OUT/conformance_levers.json 2>&1 | quiet | tail -n 3
ATTN_BACKENDS=${ATTN_BACKENDS-cudnn flash efficient fa4 flex}  # empty: no kernel timings
[ -n "$ATTN_BACKENDS" ] && timeout 150 python3 benchmarks/bench_attention.py --backends $ATTN_BACKENDS --out $OUT/attention.json 2>&1 | quiet | tee $OUT/attention.log
timeout ${GEN_LIMIT_S:-340} python3 benchmarks/bench_run.py generation --batch 64 --fast-batch 64 --repeats 2 \
  --only ${ROWS:-compile sdpa-fa4 fp8} --budget-s ${GEN_BUDGET_S:-300} --out $OUT/generation.json 2>&1 | quiet > $OUT/gen.log
tail -n 8 $OUT/gen.log
echo "done in $(( $(date +%s) - START )) s"
