"""``kaika chat``: talk to base model + adapter in the terminal, answers streamed as they come.

The whole conversation so far (``--system`` text first) is rendered with the run's saved template
exactly as training encoded conversations (:mod:`kaika.data.segments`): kaika's multi-turn form or
the model's chat template. When it outgrows the context window, the oldest exchanges are left out.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from kaika.config import GenerateArgs, from_dict
from kaika.data.segments import prompt_ids
from kaika.errors import KaikaError
from kaika.inference.engine import ContextTooLong, Result, Stream, check_fits, context_length, fits, run
from kaika.inference.generate import Loaded, load_for_inference

HELP = """\
Type a message and press Enter. Commands:
  /reset               forget the conversation so far
  /params              show the generation settings
  /params k=v [k=v…]   change them, e.g. /params temperature=0.7 max_new_tokens=128
  /help                this text
  /exit                quit (Ctrl-D too)
Several lines: end a line with \\ to continue on the next, or put the lines between two
lines holding only \"\"\".
Ctrl-C stops the answer being written; the conversation goes on."""

BLOCK = '"""'


class Chat:
    """A conversation with one model: history, settings, and one streamed answer at a time."""

    def __init__(self, loaded: Loaded, args: GenerateArgs, system: str = ""):
        self.loaded, self.args, self.system = loaded, args, system
        self.history: list[dict[str, str]] = []
        self.cancel = threading.Event()
        self.context = context_length(loaded.model, loaded.tokenizer)

    def reset(self) -> None:
        self.history = []

    def set_params(self, text: str) -> None:
        """``k=v`` pairs validated as GenerateArgs fields (same names as the command-line options)."""
        pairs = {}
        for item in text.split():
            key, sep, value = item.partition("=")
            if not sep:
                raise KaikaError(f"/params: expected key=value, got {item!r}")
            pairs[key.replace("-", "_")] = value
        args = from_dict(GenerateArgs, {**dataclasses.asdict(self.args), **pairs}, "/params")
        if args.num_beams != 1:
            raise KaikaError("/params: chat streams its answers, which beam search cannot do (num_beams=1)")
        self.args = args

    def params_text(self) -> str:
        skip = {"batch_size", "num_beams"}  # meaningless here
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.args).items() if k not in skip)

    def prompt_ids(self, message: str) -> list[int]:
        """The prompt for ``message`` after the history, oldest turns dropped until it fits."""
        tok, template = self.loaded.tokenizer, self.loaded.template
        system = [{"role": "system", "content": self.system}] if self.system else []
        turns = list(self.history)
        while True:
            ids = prompt_ids(template, tok, system + turns + [{"role": "user", "content": message}])
            if fits(len(ids), self.args.max_new_tokens, self.context) or not turns:
                break
            turns = turns[2:]  # drop the oldest question and its answer
        try:
            check_fits(len(ids), self.args.max_new_tokens, self.context)
        except ContextTooLong as e:
            raise KaikaError(
                f"the message is too long: {str(e).removeprefix('the prompt is too long: ')}"
            ) from None
        return ids

    def answer(self, message: str, write: Callable[[str], None]) -> Result:
        """Stream the answer to ``message`` through ``write``; ``self.cancel`` stops it."""
        ids = self.prompt_ids(message)
        self.cancel.clear()
        model, tokenizer, args, cancel = self.loaded.model, self.loaded.tokenizer, self.args, self.cancel
        stream = Stream(
            tokenizer,
            lambda streamer: run(
                model, tokenizer, ids, args, streamer=streamer, cancel=cancel, stop_ids=self.loaded.stop_ids
            ),
        )
        for piece in stream:
            write(piece)
        result: Result = stream.result  # type: ignore[assignment]
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": result.text}]
        return result


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line; lines joined while they end with a backslash; or a \"\"\" block.
    Raises EOFError at the end of input."""
    line = read_line("> ")
    if line.strip() == BLOCK:
        lines = []
        while (line := read_line("… ")).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line("… ")
    return "\n".join([*lines, line])


@contextmanager
def sigint_sets(event: threading.Event):
    """While inside, Ctrl-C sets ``event`` (the generation stops at its next token) instead of
    raising KeyboardInterrupt somewhere in the middle of the model."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def chat(
    adapter_dir: str | Path,
    args: GenerateArgs | None = None,
    system: str = "",
    base_model: str | None = None,
    dtype: str | None = None,
    template: str | None = None,
) -> None:
    """The interactive loop on stdin/stdout (status lines on stderr)."""
    args = args or GenerateArgs()
    if args.num_beams != 1:
        raise KaikaError("chat streams its answers, which beam search cannot do: use --num-beams 1")
    session = Chat(load_for_inference(adapter_dir, base_model, dtype=dtype, template=template), args, system)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    print(
        f"kaika chat — {Path(adapter_dir).name} ({session.loaded.template.name} template). /help for commands.",
        file=sys.stderr,
    )
    while True:
        try:
            message = read_message(input)
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, keep going
            print("\n(Ctrl-D or /exit to quit)", file=sys.stderr)
            continue
        try:
            if not handle(session, message):
                break
        except KaikaError as e:
            print(f"error: {e}", file=sys.stderr)
    if interactive:
        print(file=sys.stderr)


def handle(session: Chat, message: str) -> bool:
    """Run one command or answer one message; False when the user asked to quit."""
    err = sys.stderr
    command, _, rest = message.strip().partition(" ")
    if command in ("/exit", "/quit"):
        return False
    if command == "/help":
        print(HELP, file=err)
    elif command == "/reset":
        session.reset()
        print("(conversation cleared)", file=err)
    elif command == "/params":
        if rest.strip():
            session.set_params(rest)
        print(session.params_text(), file=err)
    elif command.startswith("/") and "\n" not in command:
        print(f"unknown command {command}; /help lists them", file=err)
    elif message.strip():
        start = time.perf_counter()
        with sigint_sets(session.cancel):
            result = session.answer(message, write_out)
        seconds = time.perf_counter() - start
        write_out("\n")
        if result.finish_reason == "cancelled":
            print("[stopped]", file=err)
        print(
            f"[{result.completion_tokens} tokens, {result.completion_tokens / max(seconds, 1e-9):.1f} tokens/s, "
            f"prompt {result.prompt_tokens} tokens]",
            file=err,
        )
    return True


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
