"""Training on conversations, end to end, then talking to the run as a user would.

* tiny-bloom-ja (kaika's template, multi-turn form): the shipped ``seed-chats-ja`` mixed with Alpaca
  records, plain and packed; the data report counts what was done; ``kaika serve`` answers the
  official openai client's multi-turn chat exactly as kaika's own generation does.
* gemma-3-270m in the dtype users train in (bf16 where the CPU computes it; slow): ``--template auto`` picks its chat template for conversations;
  the answer taught in the second turn of conversations comes back, ending at ``<end_of_turn>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_kaika, seed_records, train_dtype, write_jsonl

HISTORY = [
    {"role": "system", "content": "丁寧に答えてください。"},
    {"role": "user", "content": "日本の首都はどこですか？"},
    {"role": "assistant", "content": "東京です。"},
    {"role": "user", "content": "直前の回答の最初の一文だけを書いてください。"},
]


@pytest.fixture(scope="module")
def conversation_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conversations")
    alpaca = write_jsonl(root / "alpaca.jsonl", seed_records(8, max_chars=120))
    common = ["--base-model", "tiny-bloom-ja", "--data", "seed-chats-ja", str(alpaca), "--cutoff-len", "256",
              "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "3", "--lr", "1e-3"]  # fmt: skip
    log = run_kaika("train", *common, "--output-dir", "run", cwd=root)
    assert "template: alpaca_ja (kaika's template) for 87 conversation(s) and 8 Alpaca record(s)" in log
    assert "verified: the saved adapter is the trained one" in log
    packed = run_kaika("train", *common, "--packing", "--output-dir", "packed", cwd=root)
    assert "verified: the saved adapter is the trained one" in packed
    return root


def test_the_data_report_counts_conversations_and_what_was_left_out(conversation_run):
    report = json.loads((conversation_run / "run" / "data_report.json").read_text())
    assert report["records"] == 95 and report["conversations"] == 87
    assert report["train_on"] == "assistant" and report["truncation"] == "turns"
    # At cutoff_len 256 the long conversations lose their oldest exchanges (the system prompt stays).
    assert (
        report["conversations_shortened"] > 0 and report["turns_dropped"] >= report["conversations_shortened"]
    )
    assert report["kept"] + report["dropped_prompt_too_long"] == 95
    packed = json.loads((conversation_run / "packed" / "data_report.json").read_text())
    assert packed["supervised_tokens"] == report["supervised_tokens"]  # packing trains the same tokens
    template = json.loads((conversation_run / "run" / "template.json").read_text())
    assert template["name"] == "alpaca_ja" and template["prompt_turn"].startswith("### 指示:")


def test_serve_answers_the_openai_client_as_kaika_generates(conversation_run, tmp_path):
    from openai import OpenAI

    from kaika.config import GenerateArgs
    from kaika.data.segments import prompt_ids
    from kaika.inference.engine import run
    from kaika.inference.generate import load_for_inference
    from servers import free_port, start_server, stop_server

    loaded = load_for_inference(conversation_run / "run")
    ids = prompt_ids(loaded.template, loaded.tokenizer, HISTORY)
    # The history is in the prompt as training saw it: the earlier answer ends with EOS.
    assert loaded.tokenizer.eos_token_id in ids
    expected = run(
        loaded.model, loaded.tokenizer, ids, GenerateArgs(max_new_tokens=16), stop_ids=loaded.stop_ids
    )
    port = free_port()
    proc = start_server([f"chat={conversation_run / 'run'}"], port, tmp_path / "log")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="chat", messages=HISTORY, max_tokens=16)
        assert r.choices[0].message.content == expected.text
        assert r.usage.prompt_tokens == len(ids)
    finally:
        stop_server(proc)


ANSWER = "はい、わかりました。"
PROMPTS = ["窓を開けてください。", "明日の予定を教えて。", "水を一杯ください。", "電気を消して。",
           "駅はどちらですか？", "少し待ってください。", "静かにしてください。", "手伝ってくれますか？"]  # fmt: skip


@pytest.mark.slow
def test_gemma_learns_a_second_turn_with_its_own_chat_template(tmp_path):
    from kaika.config import GenerateArgs
    from kaika.data.segments import prompt_ids
    from kaika.inference.engine import run
    from kaika.inference.generate import load_for_inference

    # Each conversation: an exchange about something else, then a request answered with ANSWER.
    chats = [{"messages": [{"role": "user", "content": f"{i}たす{i}は？"}, {"role": "assistant", "content": f"{2 * i}です。"},
                           {"role": "user", "content": p}, {"role": "assistant", "content": ANSWER}]}
             for i, p in enumerate(PROMPTS)]  # fmt: skip
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    log = run_kaika(
        "train", "--base-model", "gemma-3-270m", "--dtype", train_dtype(), "--data", str(data), "--cutoff-len", "128",
        "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "10", "--scheduler", "constant",
        "--lr", "3e-3", "--lora-r", "8", "--lora-alpha", "16", "--output-dir", "run", cwd=tmp_path,
    )  # fmt: skip
    assert "template: chat (the base model's chat template) for 8 conversation(s)" in log
    saved = json.loads((tmp_path / "run" / "template.json").read_text())
    assert saved["kind"] == "chat" and "<start_of_turn>" in saved["chat_template"]
    loaded = load_for_inference(tmp_path / "run")
    assert loaded.template.kind == "chat"
    end = loaded.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end in loaded.stop_ids
    history = [{"role": "user", "content": "3たす3は？"}, {"role": "assistant", "content": "6です。"},
               {"role": "user", "content": PROMPTS[0]}]  # fmt: skip
    ids = prompt_ids(loaded.template, loaded.tokenizer, history)
    result = run(
        loaded.model, loaded.tokenizer, ids, GenerateArgs(max_new_tokens=16), stop_ids=loaded.stop_ids
    )
    assert result.text == ANSWER and result.finish_reason == "stop"
    # It stopped at <end_of_turn>, the token it was trained to end its turn with, not at max tokens.
    assert result.completion_tokens < 16
    # Merged, the model carries its chat template and both stop tokens for other tools.
    from transformers import AutoTokenizer

    from kaika.inference.merge import merge

    merged = merge(tmp_path / "run", tmp_path / "merged").out_dir
    tok = AutoTokenizer.from_pretrained(merged)
    text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert text == loaded.tokenizer.decode(ids) and text.endswith("<start_of_turn>model\n")
    gen = json.loads((merged / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted(loaded.stop_ids)
