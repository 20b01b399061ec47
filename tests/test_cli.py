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


class Terminal:
    """The CLI run on a pseudo-terminal, as a person would: send lines, wait for output."""

    def __init__(self, *args):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the CLI on the pty
            os.execve(sys.executable, [sys.executable, "-m", "flashmoe.cli", *args], ENV)
        self.seen = b""

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def expect(self, pattern: bytes, timeout=120) -> None:
        """Wait for pattern; what came after it stays for the next expect."""
        import select
        import time

        end = time.time() + timeout
        while pattern not in self.seen:
            assert time.time() < end, f"timed out waiting for {pattern!r}; got {self.seen[-500:]!r}"
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    break
        assert pattern in self.seen, self.seen[-500:]
        self.all = getattr(self, "all", b"") + self.seen[:self.seen.index(pattern) + len(pattern)]
        self.seen = self.seen[self.seen.index(pattern) + len(pattern):]

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        os.close(self.fd)


def test_chat_in_a_terminal(tmp_path):
    """The interactive chat driven through a pseudo-terminal, as a person would."""
    model = tiny_model_with_tokenizer(tmp_path / "m")
    t = Terminal("chat", model, "--max-tokens", "5", "--temperature", "0")
    try:
        t.expect(b"> ")
        t.send("Hello")
        t.expect(b"experts hit")
        t.expect(b"> ")
        t.send("/stats")
        t.expect(b"expert_hits")
        t.expect(b"> ")
        t.send("/system Be brief.")
        t.expect(b"system prompt set")
        t.expect(b"> ")
        t.send("Again")
        t.expect(b"tok/s")
        t.expect(b"> ")
        t.send("/reset")
        t.expect(b"conversation reset")
        t.expect(b"> ")
        t.send("/exit")
        assert t.exit_code() == 0
    finally:
        t.close()


def test_chat_goes_on_after_a_failed_turn(tmp_path):
    """A read error in one turn (the experts files cut short under the running chat) drops that turn
    with a message, not a traceback, and the chat goes on."""
    model = tiny_model_with_tokenizer(tmp_path / "m")
    experts = sorted((tmp_path / "m" / "experts").iterdir())
    budget = flashmoe.memory_plan(model)["minimum"]  # room for one layer's experts: every turn reads
    t = Terminal("chat", model, "--max-tokens", "5", "--temperature", "0", "--memory-budget", str(budget))
    try:
        t.expect(b"> ")
        t.send("Hello")
        t.expect(b"experts hit")
        t.expect(b"> ")
        for f in experts:
            os.truncate(f, 16384)
        t.send("Something else entirely, to read other experts for")
        t.expect(b"this turn is dropped, try again]")
        t.expect(b"> ")
        t.send("/exit")
        assert t.exit_code() == 0
        assert b"Traceback" not in t.all
    finally:
        t.close()
