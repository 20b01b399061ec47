#!/usr/bin/env bash
# On a lent NVIDIA machine (the device tool; /work/.library/device): build flashmoe with the CUDA backend
# for this GPU, then run what the arguments name, logs under $OUT (or /tmp/cuda-out):
#   tests   tests/test_ops.py + tests/test_batch_invariance.py on "cuda", tests/test_cuda_backend.py
#   bench   bench/cuda.py's settings (hbm with the CPU and transformers beside it, pinned, disk)
# The machine's python3 has torch, numpy, pybind11 and scikit-build-core; nothing is downloaded.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/cuda-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
pkg=/tmp/flashmoe-cuda
if [ ! -d "$pkg/flashmoe" ]; then
  t0=$(date +%s)
  python3 -m pip install -q --no-deps --no-build-isolation --target "$pkg" . -C cmake.define.FLASHMOE_CUDA=ON \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir=/tmp/flashmoe-cuda-build >"$out/build.log" 2>&1 \
    || { tail -60 "$out/build.log"; exit 1; }
  echo "built in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH="$pkg"
rc=0
for what in "$@"; do
  case "$what" in
    tests)
      python3 -m pytest -q -rs -p no:cacheprovider tests/test_ops.py tests/test_batch_invariance.py -k cuda \
        2>&1 | tee "$out/ops.log" | tail -40 || rc=1
      python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend.py 2>&1 | tee "$out/cuda_backend.log" \
        | tail -40 || rc=1 ;;
    bench)  # most wanted first: a run cut off at its time limit keeps what it wrote under $out
      python3 bench/cuda.py --setting hbm --layers 8 --cpu --torch --runs 1 2>&1 | tee "$out/bench_hbm8.log" || rc=1
      python3 bench/cuda.py --setting pinned --preset qwen3.5-122b-a10b --layers 8 --gpu-budget 3GB --prompts "" \
        --runs 1 2>&1 | tee "$out/bench_pinned.log" || rc=1
      python3 bench/cuda.py --setting disk --preset qwen3.5-122b-a10b --layers 8 --gpu-budget 3GB --budget 4GB \
        --prompts "" --tokens 16 --runs 1 2>&1 | tee "$out/bench_disk.log" || rc=1
      python3 bench/cuda.py --setting hbm --layers 40 --runs 1 2>&1 | tee "$out/bench_hbm40.log" || rc=1 ;;
    retest)
      python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend.py -k "int8 or budget or tiers" 2>&1 \
        | tee "$out/retest.log" | tail -15 || rc=1 ;;
    *) python3 "$what" 2>&1 | tee -a "$out/extra.log" || rc=1 ;;
  esac
done
exit "$rc"
