#!/usr/bin/env bash
# Stock diffusers vs our fast path for as many method cards as fit, on one GPU, in two device calls of
# at most nine minutes each (issue 24). JSON and logs go to $OUT; wheels come from .whl (carry it).
#   PART=1: caphuman (stock vs default fast, batch 64); controlnet_head (SD-1.5 + ControlNet, batch 16)
#           cold then warm in two processes sharing one fresh compile cache (the cold one also times
#           stock); ip_adapter_faceid_controlnet_head (the same family at 30 steps: a warm-cache start)
#   PART=2: instantid (SDXL + ControlNet, 1024², batch 4), arc2face (SD-1.5, batch 16), photomaker
#           (SDXL, batch 4) while time is left
#   PART=3: sd15, the plain SD-1.5 family that stands for sd15, textual_inversion, dreambooth, lora,
#           fastcomposer, ip_adapter_faceid(_plusv2) and arc2face, at batch 16 and 64
# Every command has its own time limit and the whole part stops starting new ones after DEADLINE_S,
# so what finished is in $OUT. Then: python benchmarks/leaderboard_cost.py $OUT/*.json
# TINY=1: the same steps on the CPU with tiny models, 2 steps, batch 1, no compilation (a dry run).
set -u
PART=${PART:-1}
START=$(date +%s); DEADLINE_S=${DEADLINE_S:-500}
if [ -n "${TINY:-}" ]; then
  X="--tiny --device cpu --dtype float32 --steps 2 --repeats 1"; CAP="--size 64 --only stock eager"; BIG=1; MID=1; SMALL=1
  export CAPHUMAN_BENCH_LEVERS=compile=off,fuse_qkv=1,channels_last=1
else
  X="--repeats 2"; CAP="--only stock compile"; BIG=64; MID=16; SMALL=4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export CAPHUMAN_BENCH_COMPILE_CACHE=/tmp/caphuman-compile; unset TORCHINDUCTOR_CACHE_DIR
B=benchmarks/bench_run.py
quiet() { grep -v -e "should be kept in float32" -e "UserWarning" -e "warn_once" -e "^$" -e "This call originates" -e "File \"/tmp/site" -e "is_torch_version"; }
left() { echo $(( DEADLINE_S - $(date +%s) + START )); }
step() {  # step NAME SECONDS COMMAND...: run it if at least SECONDS are left before the deadline
  local name=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "skipped $name: $(left) s left, needs $need" | tee -a $OUT/skipped.txt; return; fi
  echo "== $name ($(left) s left)"; timeout "$(left)" "$@" 2>&1 | quiet > $OUT/$name.log; tail -n 3 $OUT/$name.log
}
nvidia-smi --query-gpu=index,name,clocks.sm,temperature.gpu --format=csv,noheader
if [ "$PART" = 1 ]; then
  step caphuman 200 python3 $B generation --batch $BIG --fast-batch $BIG $X $CAP --budget-s 400 --out $OUT/caphuman.json
  rm -rf /tmp/caphuman-compile-fresh
  step controlnet_head 200 python3 $B compile-cache --method controlnet_head --batch $MID $X --with-stock \
    --cache-dir /tmp/caphuman-compile-fresh --out $OUT/controlnet_head_cache.json
  CAPHUMAN_BENCH_COMPILE_CACHE=/tmp/caphuman-compile-fresh \
    step ip_adapter_faceid_controlnet_head 90 python3 $B generation --method ip_adapter_faceid_controlnet_head --batch $MID $X \
    --out $OUT/ip_adapter_faceid_controlnet_head.json
elif [ "$PART" = 3 ]; then
  step sd15 150 python3 $B generation --method sd15 --batch $MID $X --out $OUT/sd15.json
  step sd15_b64 150 python3 $B generation --method sd15 --batch $BIG $X --out $OUT/sd15_b64.json
else
  step instantid 300 python3 $B generation --method instantid --batch $SMALL $X --out $OUT/instantid.json
  step arc2face 120 python3 $B generation --method arc2face --batch $MID $X --out $OUT/arc2face.json
  step photomaker 200 python3 $B generation --method photomaker --batch $SMALL $X --out $OUT/photomaker.json
fi
python3 benchmarks/leaderboard_cost.py $OUT/*.json 2>/dev/null | tee $OUT/leaderboard_cost.md
echo "done in $(( $(date +%s) - START )) s"
