#!/usr/bin/env bash
# torchrun on 2 GPUs vs one GPU: the smoke run sharded by RANK/WORLD_SIZE must equal the unsharded run byte for byte.
# On the lent GPU machine the project wheels are carried in .whl/ (first line); elsewhere drop that line.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import pandas, pyarrow; print('pandas', pandas.__version__, 'pyarrow', pyarrow.__version__)" || echo "no pandas/pyarrow"
export PYTHONUNBUFFERED=1
A="run --method caphuman --preset smoke --metrics face_detection --device auto"
CUDA_VISIBLE_DEVICES=0 python3 -m caphuman_bench.cli $A --runs-dir /tmp/single 2>&1 | grep -vE "skipped|^\s*$" | tail -6
torchrun --standalone --nproc_per_node 2 -m caphuman_bench.cli $A --runs-dir /tmp/multi 2>&1 | grep -E "shard|generated|error|Error" | head -12
python3 -m caphuman_bench.cli report /tmp/multi --out $OUT 2>&1 | tail -4
python3 - <<'PY'
import hashlib, pathlib
def d(root):
    (run,) = [p for p in pathlib.Path(root).iterdir() if p.is_dir()]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "images").glob("*.png"))}
a, b = d("/tmp/single"), d("/tmp/multi")
print("images single", len(a), "torchrun x2", len(b), "identical bytes:", a == b)
PY
