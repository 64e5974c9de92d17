"""Generation speed: kaika's decoding against alpaca-lora's ``generate.py`` defaults, in one run.

    .venv/bin/python benchmarks/generate_throughput.py [--sizes tiny 560m] [--new-tokens 64] [--json PATH]

Both sides run the same base + LoRA adapter (unmerged, as ``kaika generate`` and ``kaika serve`` run
it) on the same Japanese prompts in the ``alpaca_ja`` template:

* ``alpaca-lora``: the recipe's defaults — beam search with 4 beams (temperature 0.1, top-p 0.75,
  top-k 40 are set but unused without sampling), one prompt at a time, no streaming, so the first
  token reaches the user when the whole answer does;
* ``kaika``: kaika's defaults — greedy, streamed, one prompt at a time (``kaika generate``/``chat``/
  ``serve``); time to first token is when the streamer receives it;
* ``kaika-batch``: ``kaika generate --file`` — all prompts in one left-padded batch;
* ``kaika-serve``: ``kaika serve`` in its own process (uvicorn), the same adapter saved to disk and
  loaded as ``serve`` loads it, asked through the official ``openai`` client with
  ``/v1/completions``, ``stream: true``, one request at a time; time to first token is when the
  first text chunk reaches the client, tokens are the server's ``usage.completion_tokens``.

Every in-process answer is forced to the same length (``min_new_tokens = max_new_tokens``) so that
tokens/s compares equal work; the OpenAI API has no such knob, so ``kaika-serve`` counts the tokens
the server reports (an answer that ends at EOS is shorter, and its tokens/s is still per token). Models: ``tiny`` is the shipped ``bloom-ja-tiny``; ``560m`` has bloom-560m's
exact dimensions with random weights (nothing downloaded) and the same tokenizer.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM
from transformers.generation.streamers import BaseStreamer

from kaika.data.prompts import load_template
from kaika.modeling.builtin import builtin_model_path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "prompts_ja.jsonl"


class FirstTokenClock(BaseStreamer):
    """Records when the first generated token arrives (the first ``put`` carries the prompt)."""

    def __init__(self):
        self.calls = 0
        self.first: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def build(size: str):
    path = builtin_model_path("bloom-ja-tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if size == "tiny":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:  # bloom-560m's dimensions, random weights
        torch.manual_seed(0)
        model = BloomForCausalLM(BloomConfig(vocab_size=250_880, hidden_size=1024, n_layer=24, n_head=16))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value"]))
    with torch.no_grad():  # a trained-looking adapter: B non-zero, so the LoRA path does real work
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval(), tokenizer


def prompts(n: int) -> list[str]:
    template = load_template("alpaca_ja")
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = (rows * n)[:n]
    return [template.format(r["instruction"], r.get("input", "")) for r in rows]


def run_variant(name: str, model, tokenizer, texts: list[str], new_tokens: int) -> dict:
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    if name == "alpaca-lora":
        settings = dict(num_beams=4, temperature=0.1, top_p=0.75, top_k=40, do_sample=False)
    else:
        settings = dict(num_beams=1, do_sample=False)
    ttfts, start = [], time.perf_counter()
    with torch.no_grad():
        if name == "kaika-batch":
            tokenizer.padding_side = "left"
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            t0 = time.perf_counter()
            model.generate(**enc, **common, **settings)
            ttfts.append(time.perf_counter() - t0)  # batch mode writes answers when the batch is done
        else:
            for text in texts:
                enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
                t0 = time.perf_counter()
                clock = FirstTokenClock() if name == "kaika" else None
                model.generate(**enc, **common, **settings, streamer=clock)
                done = time.perf_counter()
                ttfts.append((clock.first if clock else done) - t0)
    seconds = time.perf_counter() - start
    tokens = new_tokens * len(texts)
    return {
        "variant": name,
        "answers": len(texts),
        "new_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "time_to_first_token_s": round(sum(ttfts) / len(ttfts), 4),
    }


def run_serve(size: str, model, tokenizer, texts: list[str], new_tokens: int, work: Path) -> dict:
    """``kaika serve`` on the same base + adapter, asked over HTTP with the official client."""
    import os
    import socket
    import subprocess
    import sys

    from openai import OpenAI

    if size == "tiny":
        base = builtin_model_path("bloom-ja-tiny")
    else:  # the same random weights as build(): same seed, same construction
        base = work / "base-560m"
        torch.manual_seed(0)
        BloomForCausalLM(
            BloomConfig(vocab_size=250_880, hidden_size=1024, n_layer=24, n_head=16)
        ).save_pretrained(base)
        tokenizer.save_pretrained(base)
    adapter = work / f"adapter-{size}"
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "kaika",
        "serve",
        str(adapter),
        "--port",
        str(port),
        "--template",
        "alpaca_ja",
    ]
    server = subprocess.Popen(
        cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True
    )
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                client.models.list()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"kaika serve did not start:\n{server.stderr.read()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        name = adapter.name  # serve names a bare adapter directory after itself
        client.completions.create(model=name, prompt=texts[0], max_tokens=4, temperature=0)  # warm-up
        ttfts, tokens, start = [], 0, time.perf_counter()
        for text in texts:
            t0, first = time.perf_counter(), None
            stream = client.completions.create(
                model=name,
                prompt=text,
                max_tokens=new_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            ttfts.append((first or time.perf_counter()) - t0)
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        "variant": "kaika-serve",
        "answers": len(texts),
        "new_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "time_to_first_token_s": round(sum(ttfts) / len(ttfts), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "560m"], choices=["tiny", "560m"])
    ap.add_argument("--prompts", type=int, default=4, help="Prompts per variant")
    ap.add_argument("--new-tokens", type=int, default=64, help="Tokens generated per answer")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "generate-cpu.json"))
    ap.add_argument("--no-serve", action="store_true", help="Skip the kaika serve (HTTP) variant")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}
    for size in args.sizes:
        model, tokenizer = build(size)
        texts = prompts(args.prompts)
        run_variant("kaika", model, tokenizer, texts[:1], 4)  # warm-up
        rows = [
            run_variant(v, model, tokenizer, texts, args.new_tokens)
            for v in ("alpaca-lora", "kaika", "kaika-batch")
        ]
        if not args.no_serve:
            with tempfile.TemporaryDirectory(prefix="kaika-gen-bench-") as work:
                rows.append(run_serve(size, model, tokenizer, texts, args.new_tokens, Path(work)))
        base = rows[0]
        print(f"\n{size}: {args.prompts} prompts × {args.new_tokens} new tokens")
        print(f"{'variant':<12} {'tokens/s':>9} {'× base':>7} {'TTFT s':>8} {'× base':>7}")
        for r in rows:
            r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
            r["ttft_ratio"] = round(r["time_to_first_token_s"] / base["time_to_first_token_s"], 4)
            print(
                f"{r['variant']:<12} {r['tokens_per_s']:>9.1f} {r['speedup']:>7.2f} "
                f"{r['time_to_first_token_s']:>8.3f} {r['ttft_ratio']:>7.3f}"
            )
        results[size] = rows
        del model
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
