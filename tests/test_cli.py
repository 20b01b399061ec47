"""The `flashmoe` command as a user runs it (subprocess): demo, info, and a clear error for a bad path."""

import os
import subprocess
import sys

import flashmoe

ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(flashmoe.__file__))}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flashmoe.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_demo_streams_a_model_larger_than_its_budget_then_info_describes_it(tmp_path):
    out = cli("demo", "--tokens", "4", "--dir", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    assert "smaller than the model" in out.stdout and "decode:" in out.stdout and "experts:" in out.stdout
    info = cli("info", str(tmp_path / "demo"), "--context-length", "1024")
    assert info.returncode == 0, info.stderr
    assert "qwen3_5_moe" in info.stdout and "min budget" in info.stdout
    minimum = flashmoe.memory_plan(tmp_path / "demo", context_length=1024)["minimum"]
    assert f"{minimum / 1e9:.3f} GB" in info.stdout


def test_bad_path_is_a_clear_error_not_a_traceback(tmp_path):
    out = cli("info", str(tmp_path / "missing"))
    assert out.returncode == 1
    assert "flashmoe info: error:" in out.stderr and "not a directory" in out.stderr
    assert "Traceback" not in out.stderr
