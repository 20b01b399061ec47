#!/usr/bin/env bash
# Build llama.cpp's llama-bench with CUDA (the peer of issue 20), on the lent machine:
#   bash bench/llamacpp_build.sh SRC BUILD_DIR
# SRC: the llama.cpp that llama-cpp-python's sdist vendors (`pip download llama-cpp-python --no-binary :all:
# --no-deps`, unpacked: its vendor/llama.cpp), copied to an ignored folder that the device call carries.
# Where CMake's CUDA toolkit has no cuBLAS, the one of the nvidia-cublas wheel (PyTorch's) is pointed at.
set -uo pipefail
src="$1" build="$2"
cmake=$(command -v cmake || python3 -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))")
args=(-S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
command -v ninja >/dev/null && args+=(-G Ninja)
if ! "$cmake" "${args[@]}"; then
  cub=$(python3 -c "import nvidia.cublas, os; print(list(nvidia.cublas.__path__)[0])") || exit 1
  mkdir -p /tmp/cublas-lib
  for f in "$cub"/lib/libcublas*.so.*; do
    b=$(basename "$f"); ln -sf "$f" "/tmp/cublas-lib/${b%%.so.*}.so"
  done
  rm -rf "$build"
  "$cmake" "${args[@]}" -DCMAKE_LIBRARY_PATH=/tmp/cublas-lib -DCMAKE_CUDA_FLAGS="-I$cub/include" \
    -DCMAKE_CXX_FLAGS="-I$cub/include" -DCMAKE_BUILD_RPATH="$cub/lib" || exit 1
fi
nice "$cmake" --build "$build" -j "$(nproc)" --target llama-bench
