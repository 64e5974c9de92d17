"""One generation from prompt ids, as chat, the web UI and the API server need it: streaming,
stop strings, and a flag that stops it between two tokens (Ctrl-C, a closed connection).

* :func:`run`: the blocking generation (batch of one) with its finish reason;
* :class:`Stream`: the same on a worker thread, read as text deltas while it runs (chat and the web
  UI iterate it; the API server awaits it, on its own single worker), stop strings never shown;
* :func:`check_fits`: the one context-window rule (prompt + max_new_tokens).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from kaika.config import GenerateArgs
from kaika.errors import KaikaError
from kaika.inference.generate import generation_config


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string), "length" (token limit) or "cancelled"


class CancelFlag:
    """A transformers StoppingCriteria that ends generation at the next token once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (excluded), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StopFilter:
    """Streams text deltas without ever showing a stop string, even one split across deltas:
    text that could still become the start of a stop string is held back until it cannot."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.text += delta
        cut, hit = cut_at_stop(self.text, self.stop)
        # Where a stop string could still begin: the text from there on is a proper prefix of one.
        # A stop already found only counts once no longer stop can still start before it.
        n = len(self.text)
        pending = min(
            (j for s in self.stop for j in range(max(0, n - len(s) + 1), n) if s.startswith(self.text[j:])),
            default=n,
        )
        end = len(cut)
        self.stopped = hit and pending >= end
        safe = end if self.stopped else min(end, pending)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        cut, self.stopped = cut_at_stop(self.text, self.stop)
        out, self.sent = self.text[self.sent : len(cut)], len(self.text)
        return out


class ContextTooLong(KaikaError):
    """The prompt plus the tokens asked for do not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int):
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context
        super().__init__(
            f"the prompt is too long: {prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} "
            f"exceed the context window of {context}"
        )


def fits(prompt_tokens: int, max_new_tokens: int, context: int | None) -> bool:
    return not context or prompt_tokens + max_new_tokens <= context


def check_fits(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    if not fits(prompt_tokens, max_new_tokens, context):
        raise ContextTooLong(prompt_tokens, max_new_tokens, context)  # type: ignore[arg-type]


def context_length(model, tokenizer) -> int | None:
    """The longest sequence the model takes: from its config, else the tokenizer's limit. BLOOM
    (ALiBi) has no position table; its tokenizer's model_max_length is what it was trained on."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**8 else None


@torch.no_grad()
def run(
    model,
    tokenizer,
    prompt_ids: list[int],
    args: GenerateArgs,
    *,
    streamer: Any = None,
    cancel: threading.Event | None = None,
    stop: Iterable[str] = (),
    stop_ids: Sequence[int] | None = None,
) -> Result:
    """Generate a continuation of ``prompt_ids`` (batch of one). Blocking: call it off the event loop.
    ``stop_ids``: the tokens that end an answer (default: EOS); ``stop``: strings that do too."""
    from transformers import StoppingCriteriaList, set_seed

    stop = [s for s in stop if s]
    stop_ids = list(stop_ids or [tokenizer.eos_token_id])
    config = generation_config(args, tokenizer, stop_ids)
    if stop:
        config.stop_strings = stop
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    cancel = cancel or threading.Event()
    set_seed(args.seed)
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([CancelFlag(cancel)]),
            tokenizer=tokenizer,  # needed by stop_strings
        )
    except BaseException:
        if streamer is not None:
            streamer.end()  # generate() ends the stream only on success; the consumer must not hang
        raise
    new = out[0, len(prompt_ids) :].tolist()
    end = next((i for i, t in enumerate(new) if t in stop_ids), None)
    hit_eos = end is not None
    if hit_eos:
        new = new[:end]
    text, hit_stop = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
    if hit_eos or hit_stop:
        reason = "stop"
    elif cancel.is_set():
        reason = "cancelled"
    else:
        reason = "length"
    return Result(text, len(prompt_ids), len(new), reason)


class Stream:
    """One generation on a worker thread, read as text deltas while it runs.

    ``generate(streamer) -> Result`` is the blocking generation feeding ``streamer`` (usually a
    :func:`run` call). Iterate the stream (``for delta in stream``: on a thread of its own) or
    :meth:`start` it on an executor and await it (``async for delta in stream.deltas()``); deltas
    never show a stop string, even one split across deltas. After the end, ``result`` holds the
    :class:`Result`; an exception of the generation is raised in the reader.
    """

    def __init__(
        self,
        tokenizer,
        generate: Callable[[Any], Result],
        stop: Iterable[str] = (),
        cancel: threading.Event | None = None,
    ):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.cancel = cancel  # set when the reader leaves early (a closed page): the generation stops
        self.result: Result | None = None

        def ended(streamer) -> Result:
            try:
                return generate(streamer)
            except BaseException:
                streamer.end()  # whatever failed (setup included), the reader must not wait forever
                raise

        self.generate = ended

    def __iter__(self) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = self.generate(streamer)
            except BaseException as e:  # re-raised in the reader's thread, not lost in this one
                box["error"] = e

        worker = threading.Thread(target=work, name="kaika-generate", daemon=True)
        worker.start()
        filt = StopFilter(self.stop)
        try:
            for piece in streamer:
                if out := filt.push(piece):  # the streamer sends "" while it holds back a partial character
                    yield out
            if out := filt.flush():
                yield out
        finally:
            if worker.is_alive() and self.cancel is not None:  # left early: stop before the next token
                self.cancel.set()
            worker.join()
        if "error" in box:
            raise box["error"]
        self.result = box["result"]

    def start(self, executor: Executor) -> asyncio.Future:
        """Queue the generation on ``executor`` now (behind its other work); read it with
        :meth:`deltas`. The returned future ends when the generation does."""
        from transformers import AsyncTextIteratorStreamer

        self._streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.future = asyncio.get_running_loop().run_in_executor(executor, self.generate, self._streamer)
        # Cancelled before it ran (the server shutting down): the reader must not wait for it.
        self.future.add_done_callback(lambda f: self._streamer.end() if f.cancelled() else None)
        return self.future

    async def deltas(self) -> AsyncIterator[str]:
        """The text of a :meth:`start`-ed generation, awaited delta by delta."""
        filt = StopFilter(self.stop)
        async for piece in self._streamer:
            if out := filt.push(piece):
                yield out
        if out := filt.flush():
            yield out
        self.result = await asyncio.shield(self.future)
