#!/usr/bin/env bash
# Prepares what benchmarks/device_fa4.sh needs on the lent GPU machine, here, in the repository root.
# One device call carries at most 64 MiB with this repository's ~39 MB, so nvidia-cutlass-dsl-libs-cu13
# (92 MB wheel, 237 MB unpacked) travels as an xz tar in 20 MB parts over four calls, made back to back
# while the machine is warm (30 s):
#   1. carry .fa4a:  mkdir -p /tmp/fa4parts && cp .fa4a/* /tmp/fa4parts/
#   2. carry .fa4b:  the same with .fa4b
#   3. carry .fa4c:  the same with .fa4c
#   4. carry .whl:   bash benchmarks/device_fa4.sh   (the last part and the wheels are in .whl)
# Without steps 1-3 device_fa4.sh still runs; its FA4 rows then say the library is missing.
set -eu
for d in .whl .fa4a .fa4b .fa4c; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
rm -rf .fa4a .fa4b .fa4c && rm -f .whl/cu13.tar.xz.* && mkdir -p .whl .fa4a .fa4b .fa4c
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$@"; }
get .whl diffusers==0.42.1 -r benchmarks/device_wheels_fa4.txt
work=$(mktemp -d) && trap 'rm -rf $work' EXIT
get $work nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir $work/tree && (cd $work/tree && python3 -m zipfile -e $work/nvidia_cutlass_dsl_libs_cu13-*.whl .)
tar -C $work/tree -cf - . | xz -9 -T0 | split -b 20000000 -d - $work/cu13.tar.xz.
mv $work/cu13.tar.xz.00 .fa4a/ && mv $work/cu13.tar.xz.01 .fa4b/ && mv $work/cu13.tar.xz.02 .fa4c/
mv $work/cu13.tar.xz.03 .whl/cu13.tar.xz.03.part
du -sh .whl .fa4a .fa4b .fa4c
