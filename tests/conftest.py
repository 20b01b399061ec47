"""Skips that must not happen where FLASHMOE_CI_REQUIRE says so.

Some tests skip where the machine lacks what they need (root and a writable memory cgroup, an AArch64
cross compiler and qemu-user, clang-19). On the CI machine they must run: .ci/run sets
FLASHMOE_CI_REQUIRE, a comma list of the features marked on tests with @pytest.mark.ci_feature(name), or
"all" for every skip of the suite, and a test that skips while its feature is required fails instead,
with the skip's reason.
"""

import os

import pytest

FEATURES = {"cgroup": "the cgroup memory-limit test (tests/test_streaming.py)",
            "neon": "the NEON kernels under qemu-user (tests/test_cross_isa.py)",
            "clang19": "the Metal kernels in the grid emulator and the address-space pass (tests/test_metal_emu.py), "
                        "the CUDA backend on its CPU emulator (tests/test_cuda_emu.py)",
            "nvcc": "the CUDA backend built with nvcc (tests/test_cuda_backend.py)"}
collect_ignore = ["plant_bugs.py"]  # a script, not tests (see its docstring)
# Tests that need torch and transformers: these files import them at module level (hf_fixtures.py), other
# tests carry @pytest.mark.torch. `pytest --no-torch` leaves out both: the tests run against each built
# wheel (pyproject.toml [tool.cibuildwheel], .ci/run), where torch is not installed.
TORCH_FILES = {"test_convert.py", "test_models.py", "test_snapshot.py", "test_mlx_import.py"}


def pytest_addoption(parser):
    parser.addoption("--no-torch", action="store_true",
                     help="leave out the tests that need torch and transformers (conftest.py: TORCH_FILES, "
                          "@pytest.mark.torch)")
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (left out by default: CI's time budget)")


def pytest_ignore_collect(collection_path, config):
    if config.getoption("--no-torch") and collection_path.name in TORCH_FILES:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if item not in slow]
    if not config.getoption("--no-torch"):
        return
    # (a file of TORCH_FILES named on the command line is collected all the same: its items go here)
    torch = [item for item in items if item.get_closest_marker("torch") or item.path.name in TORCH_FILES]
    if torch:
        config.hook.pytest_deselected(items=torch)
        items[:] = [item for item in items if item not in torch]


def _required() -> set:
    names = {n.strip() for n in os.environ.get("FLASHMOE_CI_REQUIRE", "").split(",") if n.strip()}
    unknown = names - set(FEATURES) - {"all"}
    if unknown:
        raise pytest.UsageError(f"FLASHMOE_CI_REQUIRE names unknown features {sorted(unknown)}; "
                                f"known: all, {', '.join(sorted(FEATURES))}")
    return names


def pytest_configure(config):
    config.addinivalue_line("markers", "torch: needs torch and transformers (left out by --no-torch)")
    config.addinivalue_line("markers", "ci_feature(name): a skip of this test fails where FLASHMOE_CI_REQUIRE "
                                       "names the feature (or 'all')")
    config.addinivalue_line("markers", "gpu: needs a GPU; CI has none, so its skip there is never a failure")
    config.addinivalue_line("markers", "slow: left out unless --slow (deselected, not skipped)")
    _required()


def _reason(longrepr) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or hasattr(rep, "wasxfail") or item.get_closest_marker("gpu"):
        return
    required = _required()
    features = {m.args[0] for m in item.iter_markers("ci_feature")}
    hit = "all" if "all" in required else next(iter(features & required), None)
    if hit:
        rep.outcome = "failed"
        rep.longrepr = (f"skipped, but FLASHMOE_CI_REQUIRE={os.environ['FLASHMOE_CI_REQUIRE']} requires it to run "
                        f"here ({hit}): {_reason(rep.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and "all" in _required():  # a whole module skipped (pytest.importorskip)
        rep.outcome = "failed"
        rep.longrepr = (f"skipped, but FLASHMOE_CI_REQUIRE={os.environ['FLASHMOE_CI_REQUIRE']} requires every test "
                        f"to run here: {_reason(rep.longrepr)}")
