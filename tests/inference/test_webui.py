"""kaika webui, end to end in a real browser: Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adapters import tiny_adapters  # noqa: F401  (fixture)
from kaika.inference.webui import LABELS
from servers import stop_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_both_languages_label_everything():
    assert set(LABELS["ja"]) == set(LABELS["en"])
    assert all(LABELS["ja"][k] != LABELS["en"][k] for k in ("instruction", "input", "generate", "output"))


def test_stream_answer_yields_growing_prefixes_of_the_answer(tiny_adapters):  # noqa: F811
    import threading

    from kaika.config import GenerateArgs
    from kaika.data.tokenize import encode_prompt
    from kaika.inference.engine import run
    from kaika.inference.generate import load_for_inference
    from kaika.inference.webui import stream_answer

    loaded = load_for_inference(tiny_adapters[0])
    args = GenerateArgs(max_new_tokens=24)
    steps = list(stream_answer(loaded, "要約してください。", "吾輩は猫である。", args, threading.Event()))
    ids = encode_prompt(loaded.tokenizer, loaded.template.format("要約してください。", "吾輩は猫である。"))
    assert steps[-1] == run(loaded.model, loaded.tokenizer, ids, args).text
    assert len(steps) > 1 and all(
        b.startswith(a) and len(b) > len(a) for a, b in zip(steps, steps[1:], strict=False)
    )
    stopped = threading.Event()
    stopped.set()  # what the Stop button does: generation ends at the next token
    assert len(list(stream_answer(loaded, "要約してください。", "", args, stopped))) <= 1


@pytest.fixture
def page_url(tiny_adapters, tmp_path):  # noqa: F811
    from test_serve import free_port

    port = free_port()
    log = tmp_path / "webui.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kaika", "webui", str(tiny_adapters[0]), "--port", str(port), "--lang", "ja",
             "--max-new-tokens", "120"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the page did not come up:\n{log.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        stop_server(proc)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.slow
def test_the_page_streams_an_answer(page_url, tiny_adapters, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    from kaika.config import GenerateArgs
    from kaika.data.tokenize import encode_prompt
    from kaika.inference.engine import run
    from kaika.inference.generate import load_for_inference

    assert CHROMIUM.exists(), "Debian's chromium is needed: apt-get install -y chromium (.ci/run does it)"
    instruction = "日本の首都について説明してください。"
    loaded = load_for_inference(tiny_adapters[0])
    ids = encode_prompt(loaded.tokenizer, loaded.template.format(instruction))
    expected = run(loaded.model, loaded.tokenizer, ids, GenerateArgs(max_new_tokens=120)).text

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            page = browser.new_page()
            page.goto(page_url)
            page.wait_for_selector("#instruction textarea", timeout=60_000)
            body = page.inner_text("body")
            for key in ("instruction", "input", "generate", "output", "temperature", "max_new_tokens"):
                assert LABELS["ja"][key] in body, key
            page.fill("#instruction textarea", instruction)
            page.click("#generate")
            seen = [""]
            deadline = time.monotonic() + 120
            while seen[-1] != expected and time.monotonic() < deadline:
                value = page.input_value("#output textarea")
                if value != seen[-1]:
                    seen.append(value)
                time.sleep(0.05)
            page.screenshot(path=str(ARTIFACTS / "webui-ja.png"), full_page=True)
        finally:
            browser.close()
    assert seen[-1] == expected, f"the page shows {seen[-1]!r}, kaika generates {expected!r}"
    partial = [v for v in seen[1:-1] if v and expected.startswith(v)]
    assert partial, "the answer should appear piece by piece (streamed), not all at once"
    assert (ARTIFACTS / "webui-ja.png").stat().st_size > 10_000
