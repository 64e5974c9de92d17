"""``kaika eval choice``: multiple choice by log-likelihood on tiny models of several architectures.

The scores are checked against a plain computation (each choice its own full forward pass, log-softmax
at every position), the statistics against their definitions, the task files' errors by file, line and
field. Agreement with lm-evaluation-harness itself is in test_choice_agreement.py (slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapters import tiny_adapters  # noqa: F401  (fixture)
from helpers import build_model, run_kaika, write_jsonl
from kaika.data.problems import DataError
from kaika.eval.choice import (
    choice_logliks,
    encode_choices,
    load_task_set,
    paired_difference,
    score_items,
    wilson,
)


@torch.no_grad()
def full_forward_logliks(model, context: list[int], continuations: list[list[int]]) -> list[float]:
    out = []
    for cont in continuations:
        ids = torch.tensor([(context + cont)[:-1]])
        lp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        out.append(sum(lp[len(context) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("kind", ["bloom", "llama", "gemma3_text", "gpt2"])
def test_shared_prompt_cache_equals_full_forward(kind, tmp_path, ja_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_model(kind, ja_tokenizer, tmp_path / kind)).eval()
    items = load_task_set("jcommonsenseqa").items[:2] + load_task_set("jnli").items[:2]
    for item in items:
        ctx, conts = encode_choices(ja_tokenizer, item.context, ["\n" + c for c in item.choices])
        assert len({len(c) for c in conts}) > 1, "choices of different lengths exercise the padding"
        got = choice_logliks(model, ctx, conts)
        assert got == pytest.approx(full_forward_logliks(model, ctx, conts), abs=2e-5)


def test_encode_choices_follows_lm_eval(ja_tokenizer):
    ctx, conts = encode_choices(ja_tokenizer, "質問：空の色は？ ", ["\n青", "\n赤い"])
    assert ctx == ja_tokenizer.encode("質問：空の色は？")  # the trailing space moved to the continuations
    for cont, choice in zip(conts, ["\n青", "\n赤い"], strict=True):
        assert ctx + cont == ja_tokenizer.encode("質問：空の色は？ " + choice)


def test_builtin_task_sets():
    jcqa, jnli = load_task_set("jcommonsenseqa"), load_task_set("jnli")
    assert (len(jcqa.items), len(jnli.items)) == (1119, 2434)
    first = jcqa.items[0]
    assert first.choices[first.answer] == "マザーボード" and first.id == "8939"
    assert "### 指示：\n出力は以下から選択してください：\n- 掲示板\n" in first.context
    assert first.context.endswith(
        "電子機器で使用される最も主要な電子回路基板の事をなんと言う？\n\n### 応答："
    )
    shares = [sum(i.answer == k for i in jnli.items) for k in range(3)]
    assert shares == [349, 735, 1350] and jnli.items[0].choices == ["含意", "矛盾", "中立"]


def test_task_file_problems_name_file_line_field(tmp_path):
    bad = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"question": "一番大きい数は？", "choices": ["1", "2", "3"], "answer": 2},
            {"question": "色は？", "choices": ["赤", "青"]},
            {"question": "季節は？", "choices": ["春", "夏"], "answer": "秋"},
            {"question": "数は？", "choices": ["一", "二"], "answer": 5},
            {"question": "形は？", "choices": "丸"},
            {"query": "味は？", "choices": ["甘い", "辛い"], "answer": 0},
        ],
    )
    with pytest.raises(DataError) as e:
        load_task_set(bad)
    text = str(e.value)
    assert "mine.jsonl, line 2: field 'answer': missing" in text
    assert "line 3: field 'answer': '秋' is outside the choices" in text
    assert "line 4: field 'answer': 5 is outside the choices: give an index 0–1" in text
    assert "line 5: field 'choices': expected a list" in text
    assert "line 6: the multiple-choice prompt cannot be built: 'question' is undefined" in text
    assert "line 1" not in text
    with pytest.raises(Exception, match="neither a task file nor a builtin"):
        load_task_set(tmp_path / "missing.jsonl")


def test_wilson_and_paired_bootstrap():
    lo, hi = wilson(68, 200)  # 34 % of 200; by hand: centre 0.3430, half-width 0.0651
    assert lo == pytest.approx(0.2779, abs=1e-4) and hi == pytest.approx(0.4081, abs=1e-4)
    assert wilson(0, 10)[0] == pytest.approx(0, abs=1e-12) and wilson(10, 10)[1] == pytest.approx(1)
    same = [True, False] * 50
    d = paired_difference(same, same)
    assert d == {"delta": 0.0, "ci": [0.0, 0.0], "within_noise": True}
    better = paired_difference([False] * 100, [True] * 60 + [False] * 40)
    assert better["delta"] == pytest.approx(0.6) and not better["within_noise"] and better["ci"][0] > 0.4
    noisy = paired_difference([True, False] * 20, [False, True] * 20)  # 50 % each, items swapped
    assert noisy["delta"] == 0 and noisy["within_noise"]


def test_scores_rows_and_accuracy(tmp_path, ja_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_model("llama", ja_tokenizer, tmp_path / "m")).eval()
    tasks = load_task_set("jcommonsenseqa")
    tasks.items = tasks.items[:6]
    rows = score_items(model, ja_tokenizer, tasks, "test")
    for item, row in zip(tasks.items, rows, strict=True):
        norm = [v / len(c) for v, c in zip(row["loglik"], item.choices, strict=True)]
        assert row["pred"] == max(range(5), key=lambda i: row["loglik"][i])
        assert row["pred_norm"] == max(range(5), key=lambda i: norm[i])
        assert row["correct"] == (row["pred"] == item.answer)
        assert all(v < 0 and math.isfinite(v) for v in row["loglik"])


def test_cli_base_vs_adapter(tmp_path, tiny_adapters):  # noqa: F811
    mine = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"question": f"{n}の次の数は？", "choices": [str(n + 1), str(n + 5), "猫"], "answer": str(n + 1)}
            for n in range(12)
        ],
    )
    out = run_kaika(
        "eval", "choice", str(tiny_adapters[0]), "--tasks", str(mine), "--output-dir", "o", cwd=tmp_path
    )
    assert "adapter − base, acc, points (95 % paired bootstrap): **" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text(encoding="utf-8"))
    assert (
        summary["kind"] == "choice"
        and summary["items"] == 12
        and list(summary["models"]) == ["base", "adapter"]
    )
    assert summary["baselines"]["chance"] == pytest.approx(1 / 3)
    rows = {
        v: [json.loads(line) for line in (tmp_path / "o" / f"scores_{v}.jsonl").read_text().splitlines()]
        for v in ("base", "adapter")
    }
    assert [r["loglik"] for r in rows["base"]] != [r["loglik"] for r in rows["adapter"]]
    for v, m in summary["models"].items():
        assert m["acc"] == sum(r["correct"] for r in rows[v]) / 12
        assert m["acc_ci"][0] <= m["acc"] <= m["acc_ci"][1]
    d = summary["difference"]["correct"]
    assert d["delta"] == pytest.approx(summary["models"]["adapter"]["acc"] - summary["models"]["base"]["acc"])
