"""kaika chat, driven as a user would: the real process, typing into its stdin, Ctrl-C as SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from adapters import tiny_adapters  # noqa: F401  (fixture)
from kaika.inference.chat import read_message


class Terminal:
    """The chat process with a reader thread collecting everything it prints (stdout + stderr)."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kaika", "chat", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.buf, self.pos = "", 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            self.buf += chunk.decode("utf-8", errors="replace")

    def type(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Wait for ``pattern`` (a regex) after what was already matched; return the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern, re.S).search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not printed; output so far:\n{self.buf}")


@pytest.fixture(scope="module")
def reference(tiny_adapters):  # noqa: F811
    """kaika's in-process generation for a given conversation (what the chat must print)."""
    from kaika.config import GenerateArgs
    from kaika.data.segments import prompt_ids
    from kaika.inference.engine import run
    from kaika.inference.generate import load_for_inference

    loaded = load_for_inference(tiny_adapters[0])

    def answer(messages, max_new_tokens=10):
        ids = prompt_ids(loaded.template, loaded.tokenizer, messages)
        return run(loaded.model, loaded.tokenizer, ids, GenerateArgs(max_new_tokens=max_new_tokens))

    return answer


@pytest.mark.slow
def test_chat_session_through_stdin(tiny_adapters, reference):  # noqa: F811
    t = Terminal([str(tiny_adapters[0]), "--max-new-tokens", "10"])
    try:
        t.expect(r"/help for commands")
        u1 = "こんにちは"
        a1 = reference([{"role": "user", "content": u1}])
        t.type(u1 + "\n")
        first = t.expect(r"> (.*?)\n\[(\d+) tokens, [\d.]+ tokens/s, prompt (\d+) tokens\]")
        assert first.group(1) == a1.text and int(first.group(2)) == a1.completion_tokens
        prompt1 = int(first.group(3))
        assert prompt1 == a1.prompt_tokens

        # A message over two lines (trailing backslash), answered after the first turn.
        u2 = "次の二行を読んで\n吾輩は猫である。"
        a2 = reference([{"role": "user", "content": u1}, {"role": "assistant", "content": a1.text},
                        {"role": "user", "content": u2}])  # fmt: skip
        t.type("次の二行を読んで\\\n吾輩は猫である。\n")
        second = t.expect(r"> … (.*?)\n\[(\d+) tokens, [\d.]+ tokens/s, prompt (\d+) tokens\]")
        assert second.group(1) == a2.text and int(second.group(3)) == a2.prompt_tokens > prompt1

        # A \"\"\" block, then /reset: the history is gone, the prompt is back to one turn.
        t.type('"""\n一行目\n二行目\n"""\n')
        t.expect(r"prompt (\d+) tokens\]")
        t.type("/reset\n")
        t.expect(r"\(conversation cleared\)")
        t.type(u1 + "\n")
        again = t.expect(r"> (.*?)\n\[(\d+) tokens, [\d.]+ tokens/s, prompt (\d+) tokens\]")
        assert again.group(1) == a1.text and int(again.group(3)) == prompt1

        # /params shows and changes the settings; bad values are refused and the chat goes on.
        t.type("/params\n")
        t.expect(r"max_new_tokens=10 temperature=0\.0 ")
        t.type("/params max_new_tokens=3 temperature=0.7\n")
        t.expect(r"max_new_tokens=3 temperature=0\.7 ")
        t.type("/params temperature=warm\n")
        t.expect(r"error: /params.temperature: expected float, got 'warm'")
        t.type("/params max_new_tokens=10 temperature=0\n")
        t.expect(r"max_new_tokens=10 temperature=0\.0 ")
        t.type("/reset\n")
        t.expect(r"\(conversation cleared\)")

        # Ctrl-C while an answer is being written stops it; the program carries on.
        t.type("/params max_new_tokens=900\n")
        t.expect(r"max_new_tokens=900 ")
        t.type("長い話をしてください。\n")
        t.expect(r"> .")  # the answer has started streaming
        t.proc.send_signal(signal.SIGINT)
        stopped = t.expect(r"\[stopped\]\n\[(\d+) tokens")
        assert 0 < int(stopped.group(1)) < 900
        t.type("/params max_new_tokens=10\n")
        t.expect(r"max_new_tokens=10 ")
        t.type("/reset\n")
        t.expect(r"\(conversation cleared\)\n")
        t.type(u1 + "\n")
        after = t.expect(r"> (.*?)\n\[(\d+) tokens")
        assert after.group(1) == a1.text

        t.type("/exit\n")
        assert t.proc.wait(timeout=30) == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def test_read_message_forms():
    def feeder(*lines):
        it = iter(lines)

        def read(prompt):
            try:
                return next(it)
            except StopIteration:
                raise EOFError from None

        return read

    assert read_message(feeder("one line")) == "one line"
    assert read_message(feeder("first \\", "second\\", "third")) == "first \nsecond\nthird"
    assert read_message(feeder('"""', "a", "", "  b", '"""')) == "a\n\n  b"
    with pytest.raises(EOFError):
        read_message(feeder())
    with pytest.raises(EOFError):  # an unterminated block at the end of input
        read_message(feeder('"""', "a"))
