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


# ---------------------------------------------------------------- generate and chat

def tiny_model_with_tokenizer(path):
    from test_generate import TINY
    from text_fixtures import write_tokenizer

    from flashmoe.synth import write_random_model

    write_random_model(path, TINY, bits=4, progress=False)
    write_tokenizer(path, template="qwen3.5", vocab_size=TINY["vocab_size"])
    return str(path)


def test_generate_streams_text_and_a_stats_line(tmp_path):
    model = tiny_model_with_tokenizer(tmp_path / "m")
    out = cli("generate", model, "-p", "Hello there", "--max-tokens", "6", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    import flashmoe as fm

    want = fm.load(model).generate("Hello there", max_tokens=6, temperature=0).text
    assert out.stdout == want + "\n"
    assert "tok/s" in out.stderr and "experts hit" in out.stderr and "finish:" in out.stderr
    chat = cli("generate", model, "-p", "Hi", "--chat", "--no-think", "--max-tokens", "4", "--seed", "1")
    assert chat.returncode == 0, chat.stderr
    bad = cli("generate", model, "-p", "Hi", "--top-p", "2")
    assert bad.returncode == 1 and "top_p must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_in_a_terminal(tmp_path):
    """The interactive chat driven through a pseudo-terminal, as a person would."""
    import pty
    import select
    import time

    model = tiny_model_with_tokenizer(tmp_path / "m")
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on the pty
        os.execve(sys.executable, [sys.executable, "-m", "flashmoe.cli", "chat", model, "--max-tokens", "5",
                                   "--temperature", "0"], ENV)
    seen = b""

    def expect(pattern: bytes, timeout=120):
        nonlocal seen
        end = time.time() + timeout
        while pattern not in seen:
            assert time.time() < end, f"timed out waiting for {pattern!r}; got {seen[-500:]!r}"
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert pattern in seen, seen[-500:]
        start = seen.index(pattern) + len(pattern)
        rest, seen = seen[start:], seen[start:]
        return rest

    try:
        expect(b"> ")
        os.write(fd, b"Hello\n")
        expect(b"experts hit")
        expect(b"> ")
        os.write(fd, b"/stats\n")
        expect(b"expert_hits")
        expect(b"> ")
        os.write(fd, b"/system Be brief.\n")
        expect(b"system prompt set")
        expect(b"> ")
        os.write(fd, b"Again\n")
        expect(b"tok/s")
        expect(b"> ")
        os.write(fd, b"/reset\n")
        expect(b"conversation reset")
        expect(b"> ")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)
