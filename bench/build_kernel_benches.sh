#!/bin/sh
# bench/matmul.c and bench/matvec.c (this checkout's) built against the CPU kernels of a source tree, with
# CMakeLists.txt's flags, for old-against-new runs (bench/RESULTS.md, 2026-12-05 batch invariance):
#   git worktree add /tmp/old <commit>; bench/build_kernel_benches.sh /tmp/old /tmp/ab/old
#   bench/build_kernel_benches.sh . /tmp/ab/new; then take turns: /tmp/ab/old-matvec 2 32768, /tmp/ab/new-matvec ...
# $1: source tree, $2: output prefix (absolute)
set -e
B="$(cd "$(dirname "$0")" && pwd)"
cd "$1"
CF="-O3 -std=gnu11 -fno-math-errno -fno-trapping-math -Icsrc/include"
for b in matmul matvec; do
  cc $CF -c "$B/$b.c" -o $2-$b.o
done
cc $CF -c csrc/backend/cpu/ops.c -o $2-ops.o
cc $CF -c csrc/backend/cpu/threads.c -o $2-threads.o
cc $CF -c csrc/core/util.c -o $2-util.o
cc $CF -mavx2 -mfma -mf16c -c csrc/backend/cpu/matmul_avx2.c -o $2-avx2.o
cc $CF -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni -mavx2 -mfma -mf16c -c csrc/backend/cpu/matmul_avx512.c -o $2-avx512.o
for b in matmul matvec; do
  cc -o $2-$b $2-$b.o $2-ops.o $2-threads.o $2-util.o $2-avx2.o $2-avx512.o -lm -lpthread
done
