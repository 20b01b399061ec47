#!/usr/bin/env bash
# On a lent NVIDIA machine (the device tool; /work/.library/device): build flashmoe with the CUDA backend
# for this GPU, then run what the arguments name, logs under $OUT (or /tmp/cuda-out):
#   tests   tests/test_ops.py + tests/test_batch_invariance.py on "cuda", tests/test_cuda_backend.py
#   backend tests/test_cuda_backend.py alone
#   bench   bench/cuda.py's settings (hbm with the CPU and transformers beside it, pinned, disk)
#   prepare in the background (setsid: it outlives the call while the machine stays warm): llama.cpp's
#           llama-bench built with CUDA from $LCP (the llama.cpp llama-cpp-python's sdist vendors: `pip download
#           llama-cpp-python --no-binary :all:`, unpacked, its vendor/llama.cpp copied to an ignored, carried
#           folder), and the benchmark models with their GGUFs (bench/cuda_llamacpp.py --prepare)
#   wait    until that has finished
#   profile2 the replayed decode step's kernels and a 512-token prompt's
#   bench3  the settings again, medians of 3 (grouped and not), the CPU backend beside them
#   profile bench/cuda_profile.py: a decode step's kernels, their GPU time, and its wall time
#   pdl     hbm decode, FLASHMOE_CUDA_PDL=1 against 0, alternating, 3 each
#   imma    bench/imma.py, then hbm prompts with FLASHMOE_CUDA_IMMA=0 / auto / 1, alternating, 2 each
#   fold    hbm decode, the shared expert folded (FLASHMOE_CUDA_SHARED_FOLD=1) and not, alternating, 3 each
#   prefill each kernel's own time in hbm prompts of 512 and 2048 tokens (PREFILL_TOKENS), FLASHMOE_CUDA_IMMA=0 /
#           unset / 1 (PREFILL_MODES)
#   minexp  hbm prompts with the experts of at least N tokens on tensor cores, N from MINEXP_TS ("16 8 4 1")
#   envab   hbm prompts under each of ENVAB's environment settings (e.g. "- FLASHMOE_CUDA_IMMA_NARROW=1")
#   pinprof where a decode token's time goes, the 122B's experts from pinned host memory
#   hostab  pinned 122B decode with the host's share of the misses (FLASHMOE_CUDA_HOST_EXPERTS auto, 1, 0)
#   ncu     Nsight Compute on the tensor-core prefill kernel (where ncu is installed; NCU_PKG: another build's)
#   imma1   a short imma (q4 kernels at 512 and 2048 tokens; prompts on dp4a and the default, once)
#   immaab  bench/imma.py's matmuls, .devsrc/old's build then this tree's
#   vab     each carried tree .devsrc/v* (bench/cuda_variants.sh writes them: HEAD and HEAD + bench/variants/*.patch)
#           built once, then bench/imma.py's q4 matmuls on each in turn (VAB_PROMPTS=1: hbm prompts too),
#           VAB_RUNS (2) rounds
#   ab      hbm decode and prompts, .devsrc/old's build (a carried `git archive` of another commit) against
#           this tree's, alternating, AB_RUNS (2) processes each
#   quick   hbm decode, FLASHMOE_CUDA_GROUPED=0 against the default (after prepare and wait: the model)
#   llama   bench/cuda_llamacpp.py: llama.cpp on the GPU and with the experts on the CPU, on the same models
#           (LLAMA_PRESETS, for prepare too: "qwen3.5-35b-a3b qwen3.5-122b-a10b", 8 layers each; LLAMA_SETTINGS)
#   deltanet the gated delta rule's kernels, chunked against recurrent (bench/gated_delta.py --backend cuda, the
#           35B's and the 397B's heads), and hbm prompts with each form (FLASHMOE_CUDA_GD_CHUNKED=0 / 1)
# The machine's python3 has torch, numpy, pybind11 and scikit-build-core; nothing is downloaded.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/cuda-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
pkg=/tmp/flashmoe-cuda
# build_tree SRC DEST LOG: flashmoe with the CUDA backend for this GPU from the tree SRC into DEST (build directory
# DEST-build, output in $out/LOG.log, DEST/.built once done); on a failure the log's tail, and 1
build_tree() {
  python3 -m pip install -q --no-deps --no-build-isolation --target "$2" "$1" -C cmake.define.FLASHMOE_CUDA=ON \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir="$2-build" >"$out/$3.log" 2>&1 \
    && touch "$2/.built" && return 0
  tail -60 "$out/$3.log"; return 1
}
# env_ab LOG SETTINGS PROMPTS RUNS: hbm prompts (and a 16-token decode) under each of SETTINGS (space-separated; each
# a comma list of VAR=value, "-" for none) in turn, RUNS rounds, one process each, output in $out/LOG.log; 1 when
# a run failed (ENVAB_ARGS: more of bench/cuda.py's arguments, after the hbm ones)
env_ab() {
  local fail=0 i e vars
  for i in $(seq "$4"); do
    for e in $2; do
      echo "$e" | tee -a "$out/$1.log"
      vars=(); [ "$e" = - ] || IFS=, read -ra vars <<<"$e"
      # shellcheck disable=SC2086  # ENVAB_ARGS: more arguments, split (e.g. "--setting pinned --gpu-budget 2GB")
      env "${vars[@]}" python3 bench/cuda.py --setting hbm --layers 8 --runs 1 --tokens 16 --prompts "$3" ${ENVAB_ARGS:-} 2>&1 \
        | tee -a "$out/$1.log" | grep "tok/s" || fail=1
    done
  done
  return "$fail"
}
# a warm machine keeps the last build: built again when the sources differ from the ones it was built from
src=$(find csrc python CMakeLists.txt pyproject.toml -type f -print0 | sort -z | xargs -0 md5sum | md5sum | cut -c1-32)
# (not built for a call of vab alone: it runs each carried tree's own build)
main_needed=0
for what in "$@"; do [ "$what" = vab ] || main_needed=1; done
if [ "$main_needed" = 1 ] && [ "$(cat "$pkg/.sources" 2>/dev/null)" != "$src" ]; then
  rm -rf "$pkg" "$pkg-build"
  t0=$(date +%s)
  build_tree . "$pkg" build || exit 1
  echo "built in $(( $(date +%s) - t0 )) s"
  echo "$src" >"$pkg/.sources"
fi
# llama.cpp's sources: a copy in /tmp, since every device call replaces the carried folders (.lcp) under a
# build still running in the background
LCP="${LCP:-.lcp/llama.cpp}"
if [ -d "$LCP" ] && [ ! -d /tmp/lcp/llama.cpp ]; then mkdir -p /tmp/lcp && cp -r "$LCP" /tmp/lcp/; fi
LCP=/tmp/lcp/llama.cpp
export PYTHONPATH="$pkg:$LCP/gguf-py"  # gguf-py: bench/gguf_export.py's writer
llama=/tmp/llama-build/bin/llama-bench
rc=0
# build_old: .devsrc/old (a carried `git archive` of the commit to compare) built into /tmp/flashmoe-old, once
build_old() {
  [ -f /tmp/flashmoe-old/.built ] && return 0
  build_tree .devsrc/old /tmp/flashmoe-old build_old || { rc=1; return 1; }
}
# alternate VAR "VALUES" RUNS LOG ARGS...: bench/cuda.py's hbm setting (8 layers) with VAR at each value in turn, RUNS
# rounds, into $out/LOG.log, ARGS added (--prompts ...)
alternate() {
  local var=$1 values=$2 runs=$3 log=$4 i v
  shift 4
  for i in $(seq "$runs"); do
    for v in $values; do
      echo "$var=$v" | tee -a "$out/$log.log"
      env "$var=$v" python3 bench/cuda.py --setting hbm --layers 8 --runs 1 "$@" 2>&1 | tee -a "$out/$log.log" \
        | grep "tok/s" || rc=1
    done
  done
}
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
    deltanet)  # the chunked gated delta rule against the recurrent one: kernels alone, then whole prompts
      python3 bench/gated_delta.py --backend cuda 2>&1 | tee -a "$out/deltanet.log" || rc=1
      python3 bench/gated_delta.py --backend cuda --Hv 64 2>&1 | tee -a "$out/deltanet.log" || rc=1
      for c in 0 1; do
        FLASHMOE_CUDA_GD_CHUNKED=$c python3 bench/cuda.py --setting hbm --layers 8 --prompts 512,2048 --warm 0 \
          --runs 1 2>&1 | tee -a "$out/deltanet.log" || rc=1
      done ;;
    quick)  # hbm decode and a 512 prompt, each expert in its own launches against one launch for all of them
      for g in 0 1; do
        FLASHMOE_CUDA_GROUPED=$g python3 bench/cuda.py --setting hbm --layers 8 --prompts 512 --warm 0 --runs 1 \
          2>&1 | tee -a "$out/quick.log" || rc=1
      done ;;
    profile)  # where a decode step's time goes (hbm; grouped, then each expert in its own launches)
      python3 bench/cuda_profile.py 2>&1 | tee -a "$out/profile.log" || rc=1
      FLASHMOE_CUDA_GROUPED=0 python3 bench/cuda_profile.py 2>&1 | tee -a "$out/profile.log" || rc=1
      python3 bench/cuda_profile.py --preset qwen3.5-122b-a10b --gpu-budget 3GB 2>&1 \
        | tee -a "$out/profile.log" || rc=1 ;;
    profile2)  # the replayed decode step's kernels (with PDL, then each kernel's own time without), then a
               # 512-token prompt's (hbm, 35B 8 layers)
      python3 bench/cuda_profile.py 2>&1 | tee -a "$out/profile2.log" || rc=1
      FLASHMOE_CUDA_PDL=0 python3 bench/cuda_profile.py 2>&1 | tee -a "$out/profile2.log" || rc=1
      python3 bench/cuda_profile.py --prompt 512 2>&1 | tee -a "$out/profile2.log" || rc=1 ;;
    bench3)  # the issue's settings, medians of 3, grouped experts against one expert a call where it matters
      for g in 1 0; do
        FLASHMOE_CUDA_GROUPED=$g python3 bench/cuda.py --setting hbm --layers 8 --runs 3 2>&1 \
          | tee -a "$out/bench3_hbm8_g$g.log" || rc=1
        FLASHMOE_CUDA_GROUPED=$g python3 bench/cuda.py --setting pinned --preset qwen3.5-122b-a10b --layers 8 \
          --gpu-budget 3GB --runs 3 2>&1 | tee -a "$out/bench3_pinned_g$g.log" || rc=1
      done
      python3 bench/cuda.py --setting pinned --preset qwen3.5-122b-a10b --layers 8 --gpu-budget 3GB --runs 1 \
        --prompts "" --cpu --cpu-prompts "" 2>&1 | tee -a "$out/bench3_cpu122.log" || rc=1
      python3 bench/cuda.py --setting hbm --layers 8 --runs 1 --prompts "" --cpu 2>&1 \
        | tee -a "$out/bench3_cpu35.log" || rc=1
      python3 bench/cuda.py --setting disk --preset qwen3.5-122b-a10b --layers 8 --gpu-budget 3GB --budget 4GB \
        --prompts "" --tokens 32 --runs 3 2>&1 | tee -a "$out/bench3_disk.log" || rc=1 ;;
    fold)  # hbm decode, the shared expert folded into the routed experts' call or not, alternating, 3 each
      alternate FLASHMOE_CUDA_SHARED_FOLD "1 0" 3 fold --prompts "" ;;
    pdl)  # hbm decode, kernels launched with programmatic dependent launch and not, alternating, 3 each
      alternate FLASHMOE_CUDA_PDL "1 0" 3 pdl --prompts "" ;;
    imma)  # the int8 prefill kernels alone (bench/imma.py), then hbm prompts on dp4a (0), tensor cores where they
           # fill half the GPU (auto) and wherever they take the call (1), alternating, 2 each
      python3 bench/imma.py 2>&1 | tee -a "$out/imma.log" || rc=1
      alternate FLASHMOE_CUDA_IMMA "0 auto 1" 2 imma --prompts 512,2048 ;;
    ab)  # hbm decode and prompts, the build of .devsrc/old (a `git archive` of the commit to compare, carried)
         # against this tree's, alternating, 2 processes each (run after `tests` or another case that built)
      build_old || continue
      for i in $(seq "${AB_RUNS:-2}"); do
        for b in old new; do
          p=$pkg; [ "$b" = old ] && p=/tmp/flashmoe-old
          echo "$b" | tee -a "$out/ab.log"
          PYTHONPATH="$p:$LCP/gguf-py" python3 bench/cuda.py --setting hbm --layers 8 --prompts 512,2048 --runs 1 \
            2>&1 | tee -a "$out/ab.log" | grep "tok/s" || rc=1
        done
      done ;;
    imma1)  # a short imma: q4's kernels alone at 512 and 2048 tokens, then hbm prompts on dp4a and the default, once
      FLASHMOE_CUDA_PDL=0 python3 bench/imma.py --experts 0 --q 4 --rows 2048,8192 --T 512,2048 --reps 10 2>&1 \
        | tee -a "$out/imma1.log" || rc=1
      alternate FLASHMOE_CUDA_IMMA "0 auto" 1 imma1 --prompts 512,2048 ;;
    immaab)  # bench/imma.py's matmuls (no experts' case), .devsrc/old's build then this tree's
      build_old || continue
      for b in old new; do
        p=$pkg; [ "$b" = old ] && p=/tmp/flashmoe-old
        echo "$b" | tee -a "$out/immaab.log"
        FLASHMOE_CUDA_PDL=0 PYTHONPATH="$p" python3 bench/imma.py --experts 0 --reps 10 2>&1 | tee -a "$out/immaab.log" \
          || rc=1
      done ;;
    vab)  # kernel variants side by side: .devsrc/v* each built into /tmp/fm-<name>, bench/imma.py's q4 matmuls
      for v in .devsrc/v*/; do
        n=$(basename "$v")
        [ -f "/tmp/fm-$n/.built" ] && continue
        build_tree "$v" "/tmp/fm-$n" "build_$n" &  # the builds side by side (a failed one is skipped below)
      done
      wait
      for i in $(seq "${VAB_RUNS:-2}"); do
        for v in .devsrc/v*/; do
          n=$(basename "$v")
          [ -f "/tmp/fm-$n/.built" ] || continue
          echo "$n" | tee -a "$out/vab.log"
          FLASHMOE_CUDA_PDL=0 PYTHONPATH="/tmp/fm-$n" python3 bench/imma.py --experts 0 --q 4 --rows 2048,8192 \
            --T 512,2048 --reps 10 2>&1 | grep "^q" | tee -a "$out/vab.log" || rc=1
          [ -n "${VAB_PROMPTS:-}" ] && PYTHONPATH="/tmp/fm-$n" python3 bench/cuda.py --setting hbm --layers 8 --runs 1 \
            --prompts 512,2048 2>&1 | grep "tok/s" | tee -a "$out/vab.log"
        done
      done ;;
    minexp)  # hbm prompts with the experts of at least N tokens on tensor cores (FLASHMOE_CUDA_IMMA_MIN_EXPERT_T: N
             # from MINEXP_TS, default "16 8 4 1"), alternating, MINEXP_RUNS (2) processes each
      env_ab minexp "$(for n in ${MINEXP_TS:-16 8 4 1}; do printf 'FLASHMOE_CUDA_IMMA_MIN_EXPERT_T=%s ' "$n"; done)" \
        "${MINEXP_PROMPTS:-512,2048}" "${MINEXP_RUNS:-2}" || rc=1 ;;
    envab)  # hbm prompts under each of ENVAB's settings, alternating, ENVAB_RUNS (2) processes each, prompts
            # ENVAB_PROMPTS (128,256,512,2048); ENVAB_ARGS: bench/cuda.py's arguments added (another setting: e.g.
            # ENVAB_ARGS="--setting pinned --gpu-budget 2GB" for the prompts whose experts are not all in VRAM)
      env_ab envab "${ENVAB:--}" "${ENVAB_PROMPTS:-128,256,512,2048}" "${ENVAB_RUNS:-2}" || rc=1 ;;
    hostab)  # pinned 122B decode: the host computing its share of the VRAM misses (auto, the default), all of them
             # (1) and none (0), alternating, HOSTAB_RUNS (2) processes each
      for i in $(seq "${HOSTAB_RUNS:-2}"); do
        for h in auto 1 0; do
          echo "FLASHMOE_CUDA_HOST_EXPERTS=$h" | tee -a "$out/hostab.log"
          FLASHMOE_CUDA_HOST_EXPERTS=$h python3 bench/cuda.py --setting pinned --preset qwen3.5-122b-a10b --layers 8 \
            --gpu-budget 3GB --prompts "" --runs 1 2>&1 | tee -a "$out/hostab.log" | grep "tok/s\|roofline" || rc=1
        done
      done ;;
    ncu)  # Nsight Compute's view of the tensor-core prefill kernel (every section, and each SASS instruction's stall
          # samples), where the machine has ncu, and its SASS (cuobjdump): why it runs at ~2 % of the int8 peak
          # (bench/RESULTS.md, session 18)
      np="${NCU_PKG:-$pkg}"  # NCU_PKG: another build, e.g. a vab variant's /tmp/fm-v-NAME
      so=$(find "$np" -name "_core*.so" | head -1)
      if command -v cuobjdump >/dev/null; then
        cuobjdump -sass "$so" >"$out/sass.txt" 2>&1 || rc=1
        echo "sass: $(grep -c . "$out/sass.txt") lines in $out/sass.txt"
      fi
      if command -v ncu >/dev/null; then
        PYTHONPATH="$np:$LCP/gguf-py" FLASHMOE_CUDA_PDL=0 ncu --set full --import-source yes -f -o "$out/imma" --kernel-name regex:fm_mm_imma \
          --launch-count 1 python3 bench/imma.py --experts 0 --q 4 --rows 2048 --T 512 --reps 1 2>&1 \
          | grep -v "^==PROF==" | tail -20 || rc=1
        ncu --import "$out/imma.ncu-rep" --print-details all >"$out/ncu.log" 2>&1 || rc=1
        ncu --import "$out/imma.ncu-rep" --page source --csv --print-source sass >"$out/ncu_sass.csv" 2>&1 || rc=1
        grep -iE "stall|warp cycles|issued|throughput|occupancy|registers" "$out/ncu.log" | head -60
      else
        echo "ncu: not on this machine" | tee -a "$out/ncu.log"
      fi ;;
    pinprof)  # where a decode token's time goes with the 122B's experts from pinned host memory (3 GB of VRAM)
      python3 bench/cuda_profile.py --preset qwen3.5-122b-a10b --gpu-budget 3GB 2>&1 | grep -v -i warn \
        | tee -a "$out/pinprof.log" || rc=1 ;;
    prefill)  # each kernel's own time in hbm prompts of 512 and 2048 tokens, FLASHMOE_CUDA_IMMA 0, unset, 1
      for n in ${PREFILL_TOKENS:-512 2048}; do
        for m in ${PREFILL_MODES:-0 auto 1}; do
          echo "prompt $n FLASHMOE_CUDA_IMMA=$m" | tee -a "$out/prefill.log"
          env FLASHMOE_CUDA_PDL=0 FLASHMOE_CUDA_IMMA=$m python3 bench/cuda_profile.py --prompt $n 2>&1 \
            | grep -v -i warn | sed -n 1,24p | tee -a "$out/prefill.log" || rc=1  # sed: reads on, no SIGPIPE
        done
      done ;;
    backend)  # tests/test_cuda_backend.py alone (the whole-model tests: tiers, device routing, budgets)
      python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend.py 2>&1 | tee "$out/cuda_backend.log" \
        | tail -40 || rc=1 ;;
    retest)
      python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend.py -k "int8 or budget or tiers" 2>&1 \
        | tee "$out/retest.log" | tail -15 || rc=1 ;;
    prepare)
      [ -f /tmp/llama-build.rc ] || setsid bash -c "bash bench/llamacpp_build.sh $LCP /tmp/llama-build >/tmp/llama-build.log 2>&1; \
        echo \$? >/tmp/llama-build.rc" </dev/null >/dev/null 2>&1 &
      [ -f /tmp/prepare.rc ] || setsid bash -c "
        ( for m in ${LLAMA_PRESETS:-qwen3.5-35b-a3b qwen3.5-122b-a10b}; do set -- \$m 8
            nice python3 bench/cuda_llamacpp.py --prepare --preset \$1 --layers \$2 || exit 1; done
        ) >/tmp/prepare.log 2>&1; echo \$? >/tmp/prepare.rc" </dev/null >/dev/null 2>&1 &
      echo "prepare: started in the background" ;;
    wait)
      for f in /tmp/llama-build.rc /tmp/prepare.rc; do
        for _ in $(seq 80); do [ -f "$f" ] && break; sleep 5; done  # 400 s at most
        log="${f%.rc}.log"; echo "$f: $(cat "$f" 2>/dev/null || echo 'still running')"; tail -5 "$log"
        cp "$log" "$out/"
      done ;;
    llama)
      for m in ${LLAMA_PRESETS:-qwen3.5-35b-a3b qwen3.5-122b-a10b}; do set -- "$m" 8
        python3 bench/cuda_llamacpp.py --llama-bench "$llama" --preset "$1" --layers "$2" \
          --settings "${LLAMA_SETTINGS:-gpu,exps=CPU}" 2>&1 \
          | tee -a "$out/llama.log" || rc=1
      done ;;
    *) python3 "$what" 2>&1 | tee -a "$out/extra.log" || rc=1 ;;
  esac
done
exit "$rc"
