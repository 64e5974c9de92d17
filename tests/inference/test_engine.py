"""The streaming worker shared by chat, the web page and the server: it never leaves a reader waiting."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kaika.inference.engine import Result, Stream


def failing(streamer) -> Result:
    raise ValueError("Seed must be between 0 and 2**32 - 1")  # fails before generate() starts


def test_a_generation_that_fails_before_it_starts_ends_the_stream(ja_tokenizer):
    done = threading.Event()

    def read():
        with pytest.raises(ValueError, match="Seed must be"):
            list(Stream(ja_tokenizer, failing))
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert done.is_set(), "the reader was left waiting on a stream that never ends"


def test_the_async_reader_too(ja_tokenizer):
    async def read():
        stream = Stream(ja_tokenizer, failing)
        with ThreadPoolExecutor(1) as worker:
            stream.start(worker)
            with pytest.raises(ValueError, match="Seed must be"):
                async for _ in stream.deltas():
                    pass

    asyncio.run(asyncio.wait_for(read(), timeout=30))


def test_a_reader_that_leaves_early_stops_the_generation(ja_tokenizer):
    cancel, started = threading.Event(), threading.Event()

    def slow(streamer) -> Result:  # emits a piece, then waits for the stop a real generation obeys
        started.set()
        streamer.put(torch.tensor([ja_tokenizer.encode("あ", add_special_tokens=False)]))
        streamer.put(torch.tensor([ja_tokenizer.encode("いうえお", add_special_tokens=False)]))
        assert cancel.wait(timeout=30)
        streamer.end()
        return Result("", 0, 0, "cancelled")

    stream = iter(Stream(ja_tokenizer, slow, cancel=cancel))
    assert next(stream)
    stream.close()  # what Gradio does when the page's Stop is pressed
    assert started.is_set() and cancel.is_set()
