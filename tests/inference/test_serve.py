"""kaika serve: the real server (uvicorn, in a subprocess) answering the official openai client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import tiny_adapters  # noqa: F401  (fixture)
from servers import free_port, start_server, stop_server

KEY = "sk-kaika-test"
MAX_TOKENS_LIMIT = 1000


@pytest.fixture(scope="module")
def server(tiny_adapters, tmp_path_factory):  # noqa: F811
    ja, en = tiny_adapters
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc = start_server(
        [
            f"ja={ja}",
            f"en={en}",
            "--api-key",
            KEY,
            "--queue-size",
            "1",
            "--max-tokens-limit",
            str(MAX_TOKENS_LIMIT),
            "--max-new-tokens",
            "12",
        ],
        port,
        log,
    )
    yield f"http://127.0.0.1:{port}", proc
    stop_server(proc)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def references(tiny_adapters):  # noqa: F811
    """What kaika's own in-process generation answers, per served model name (greedy, 12 tokens)."""
    from kaika.config import GenerateArgs
    from kaika.data.segments import prompt_ids
    from kaika.inference.engine import run
    from kaika.inference.generate import load_for_inference

    messages = [{"role": "system", "content": "猫として"}, {"role": "user", "content": "名前は？"}]
    out = {}
    for name, path, base_only in (("ja", tiny_adapters[0], False), ("en", tiny_adapters[1], False)) + (
        ("tiny-bloom-ja", tiny_adapters[0], True),
    ):
        loaded = load_for_inference(path, base_only=base_only)
        ids = prompt_ids(loaded.template, loaded.tokenizer, messages)
        out[name] = run(loaded.model, loaded.tokenizer, ids, GenerateArgs(max_new_tokens=12)).text
    return messages, out


def test_models_and_answers_per_adapter(client, references):
    assert {m.id for m in client.models.list().data} == {"ja", "en", "tiny-bloom-ja"}
    messages, expected = references
    assert len(set(expected.values())) == 3, (
        "the three models must answer differently for this to test routing"
    )
    for name, text in expected.items():
        r = client.chat.completions.create(model=name, messages=messages)
        assert r.model == name and r.object == "chat.completion"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == text, name
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10


def test_streaming_equals_non_streaming(client):
    prompt = "吾輩は猫である。名前は"
    whole = client.completions.create(model="ja", prompt=prompt, max_tokens=20)
    assert whole.choices[0].text and whole.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(
            model="ja", prompt=prompt, max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1, "streamed in pieces"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "自己紹介してください。"}]
    chat = client.chat.completions.create(model="en", messages=messages, max_tokens=16)
    stream = list(client.chat.completions.create(model="en", messages=messages, max_tokens=16, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_sequences(client):
    prompt = "吾輩は猫である。"
    full = client.completions.create(model="en", prompt=prompt, max_tokens=24).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]  # cut inside the answer: everything from its first occurrence on disappears
    expected = full[: full.index(stop)]
    cut = client.completions.create(model="en", prompt=prompt, max_tokens=24, stop=[stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="en", prompt=prompt, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_bad_requests_get_openai_errors(client, server):
    import openai

    url = server[0]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "ja, en" in e.value.body["message"]
    for bad in (0, MAX_TOKENS_LIMIT + 1):
        with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and"):
            client.completions.create(model="ja", prompt="a", max_tokens=bad)
    with pytest.raises(openai.BadRequestError, match="last message must come from the user"):
        client.chat.completions.create(model="ja", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model="ja", prompt="a", n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="ja", prompt="a", temperature=3)
    for seed in (-1, 2**32):  # was a plain-text 500 (and a stream that never ended)
        with pytest.raises(openai.BadRequestError, match="seed"):
            client.completions.create(model="ja", prompt="a", seed=seed, stream=True)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and"):
        client.chat.completions.create(
            model="ja", messages=[{"role": "user", "content": "a"}], max_completion_tokens=0
        )

    from transformers import AutoTokenizer

    from kaika.modeling.builtin import builtin_model_path

    long_prompt = "吾輩は猫である。名前はまだ無い。" * 200
    assert len(AutoTokenizer.from_pretrained(builtin_model_path("tiny-bloom-ja")).encode(long_prompt)) > 1024
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ja", prompt=long_prompt, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": "ja", "prompt": ', headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "ja"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_api_key_is_required(server):
    import openai

    url = server[0]
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{url}/v1/completions", json={"model": "ja", "prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health").status_code == 200  # health checks need no key


def test_burst_is_served_or_refused_and_the_server_stays_up(client, server):
    import openai

    n = 10
    outcomes: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(n)

    def one(i: int) -> None:
        go.wait()
        try:
            r = client.chat.completions.create(
                model=("ja", "en")[i % 2],
                messages=[{"role": "user", "content": f"{i}番目の質問です。"}],
                max_tokens=48,
            )
            result = "ok" if r.usage.completion_tokens >= 1 else "empty"
        except openai.RateLimitError as e:
            result = "429" if e.body["code"] == "rate_limit_exceeded" else f"bad 429 {e.body}"
        except Exception as e:  # anything else is a failure of the server
            result = f"error {type(e).__name__}: {e}"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(outcomes) == n and set(outcomes) <= {"ok", "429"}, outcomes
    # queue-size 1: one generates and one waits; the rest arrive while both are busy.
    assert outcomes.count("ok") >= 2 and outcomes.count("429") >= 1, outcomes
    assert server[1].poll() is None
    after = client.completions.create(model="ja", prompt="もう一度", max_tokens=4)
    assert after.usage.completion_tokens >= 1


def test_generation_runs_off_the_event_loop_and_stops_when_the_client_leaves(server):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "ja", "prompt": "吾輩は", "max_tokens": MAX_TOKENS_LIMIT, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        before = httpx.get(f"{url}/health", timeout=10).json()  # answered while the model generates
        assert before["admitted"] == 1
    # The client left after one chunk of a 1000-token answer: the generation is stopped, its slot freed.
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").json()["admitted"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = httpx.get(f"{url}/health").json()
    assert after["admitted"] == 0
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_bodies_are_capped_and_big_ones_do_not_stall_the_server(server):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"model": "ja", "prompt": "猫" * (5 * 1024 * 1024)}).encode()  # ~15 MB
    r = httpx.post(f"{url}/v1/completions", content=big, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers=headers, timeout=60)
    assert r.status_code == 413, r.text
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A prompt under the cap but far over the context is tokenized off the event loop: /health
    # answers while it is.
    long_body = {"model": "ja", "prompt": "吾輩は猫である。" * 120_000, "max_tokens": 4}
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            r=httpx.post(f"{url}/v1/completions", json=long_body, headers=headers, timeout=120)
        )
    )
    worker.start()
    time.sleep(0.3)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    worker.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{url}/v1/completions", json={"model": "ja", "prompt": ""}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def post_json(url: str, body, headers: dict) -> httpx.Response:
    """JSON as the wire carries it: ASCII, a lone surrogate as its \\u escape (httpx's json= cannot)."""
    headers = {**headers, "Content-Type": "application/json"}
    return httpx.post(url, content=json.dumps(body).encode(), headers=headers, timeout=120)


def test_text_that_is_not_unicode_is_a_400_naming_where(server):
    """JSON's "\\ud800" (half of a UTF-16 pair) decodes to a lone surrogate: refused, never a 500."""
    url, headers = server[0], {"Authorization": f"Bearer {KEY}"}
    bodies = {
        "/v1/chat/completions": {"model": "ja", "messages": [{"role": "user", "content": "猫\ud800"}]},
        "/v1/completions": {"model": "ja", "prompt": "吾輩は\udfff"},
    }
    for path, body in bodies.items():
        for extra in ({}, {"stop": ["\ud800"]}):
            if extra:
                body = {**body, "messages": [{"role": "user", "content": "猫"}], "prompt": "猫", **extra}
            r = post_json(url + path, body, headers)
            assert r.status_code == 400, (path, extra, r.text)
            assert "lone surrogate" in r.json()["error"]["message"]


def test_openai_fields_kaika_does_not_implement_are_refused_not_ignored(server):
    url, headers = server[0], {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "ja", "messages": [{"role": "user", "content": "猫"}], "max_tokens": 2}
    for extra, param in (
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ):
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, **extra}, headers=headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    for body, says in (
        ({**chat, "messages": [{"role": "assistant", "content": None}]}, "content is null"),
        ({**chat, "messages": [{"role": "system", "content": "あなたは猫です"}]}, "only system messages"),
    ):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(chat).encode(),
                   headers={**headers, "Content-Type": "text/plain"}, timeout=60)  # fmt: skip
    assert r.status_code == 400 and "must be JSON" in r.json()["error"]["message"], r.text
    ok = {"response_format": {"type": "text"}, "n": 1, "logprobs": False, "tool_choice": "none"}
    assert (
        httpx.post(f"{url}/v1/chat/completions", json={**chat, **ok}, headers=headers, timeout=60).status_code
        == 200
    )


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 8), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4), st.sampled_from(["\ud800", "a\udfffb", "\x1b[31m"]),
    st.lists(st.text(max_size=3), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
MESSAGES = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "tool", "", 3]), "content": VALUES}
        ),
        max_size=3,
    ),
    VALUES,
)
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "n", "stop", "seed",
          "stream", "stream_options", "max_completion_tokens"]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chat=st.booleans(),
    model=st.sampled_from(["ja", "en", "nope", 3, None]),
    prompt=st.one_of(st.sampled_from(["吾輩は", "", "猫"]), VALUES),
    messages=MESSAGES,
    extra=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4),
)
def test_any_request_is_answered_or_refused_in_openai_shape(server, chat, model, prompt, messages, extra):
    # Whatever a client sends, the answer is a completion (200) or an OpenAI-shaped error with a
    # message (4xx, never a 500 or a traceback), and the server stays up.
    url = server[0]
    body = {"model": model, **({"messages": messages} if chat else {"prompt": prompt}), **extra}
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 8)  # bounded: each accepted request generates
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    headers["Content-Type"] = "application/json"  # the body as JSON on the wire: surrogates as \\u escapes
    with httpx.stream(
        "POST", url + path, content=json.dumps(body).encode(), headers=headers, timeout=120
    ) as r:
        text = "".join(r.iter_text())
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
        else:
            assert json.loads(text)["choices"]
    else:
        assert r.status_code in (400, 404, 413, 422, 429), (r.status_code, text)
        error = json.loads(text)["error"]
        assert error["message"] and error["type"] and "Traceback" not in error["message"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_busy_port_is_refused_before_the_model_loads(tiny_adapters, tmp_path):  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "kaika", "serve", str(tiny_adapters[0]), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr
    assert "Loading weights" not in proc.stderr and "serving" not in proc.stderr


@pytest.mark.slow
def test_serving_a_merged_model_alone(tmp_path, tiny_adapters, references):  # noqa: F811
    from openai import OpenAI

    from kaika.inference.merge import merge

    merged = merge(tiny_adapters[0], tmp_path / "merged").out_dir
    port = free_port()
    proc = start_server(["--base-model", str(merged), "--base-name", "merged-ja"], port, tmp_path / "log")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["merged-ja"]
        messages, expected = references
        r = client.chat.completions.create(model="merged-ja", messages=messages, max_tokens=12)
        assert r.choices[0].message.content == expected["ja"]  # the merged model answers as base + adapter
    finally:
        stop_server(proc)
