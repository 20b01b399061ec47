#!/usr/bin/env bash
# Kernel experiments for bench/cuda_device.sh vab, as patches on HEAD (bench/variants/NAME.patch: `git diff` of
# a change tested on the emulator but not yet measured on a GPU). Writes the carried trees vab builds:
# .devsrc/v0 (HEAD) and .devsrc/v-NAME (HEAD with the patch) for each NAME given (ignored by git: a run carries
# them). Once measured, a patch leaves bench/variants/ (its result and description go to bench/RESULTS.md; kept
# changes go to the tree itself). For example:
#   bash bench/cuda_variants.sh NAME1 NAME2
# then, on the device with carry [".devsrc"]:
#   VAB_PROMPTS=1 bash bench/cuda_device.sh vab
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .devsrc && mkdir -p .devsrc/v0
git archive HEAD | tar -x -C .devsrc/v0
for n in "$@"; do
  p="bench/variants/$n.patch"
  [ -f "$p" ] || { echo "no $p" >&2; exit 1; }
  mkdir -p ".devsrc/v-$n"
  git archive HEAD | tar -x -C ".devsrc/v-$n"
  patch -s -p1 -d ".devsrc/v-$n" <"$p"
  echo ".devsrc/v-$n: HEAD + $p"
done
