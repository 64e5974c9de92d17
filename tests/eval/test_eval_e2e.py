"""``kaika eval`` on real trained runs: loss base vs adapter, scored answers with a judge, compare report.

Two short LoRA runs on a tiny BLOOM are trained once for the module; the commands are called
through ``kaika.cli.main`` exactly as the shell would (in process, to save interpreter start-ups).
"""

from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser

import pytest

from helpers import ELYZA_TASKS, build_model, seed_records, write_jsonl
from judge_server import JudgeServer, mt_bench_reply
from kaika.cli import main
from kaika.config import TrainConfig
from kaika.eval import metrics

pytestmark = pytest.mark.slow

ELYZA_CSV = ELYZA_TASKS / "elyza_tasks_100.csv"
N_TASKS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ja_tokenizer):
    """Base model dir, the training data, and two runs: A (25 steps) and B (8 steps)."""
    from kaika.training.sft import train

    tmp = tmp_path_factory.mktemp("eval-e2e")
    base = build_model("bloom", ja_tokenizer, tmp / "base")
    data = write_jsonl(tmp / "train.jsonl", seed_records(max_chars=60)[:4])
    out = {}
    for name, steps in (("run_a", 25), ("run_b", 8)):
        cfg = TrainConfig()
        cfg.model.base_model = str(base)
        cfg.data.data = [str(data)]
        cfg.data.cutoff_len = 80  # some examples are truncated: eval must truncate them the same way
        cfg.data.val_set_size = 1
        cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.0
        cfg.train.output_dir = str(tmp / name)
        cfg.train.batch_size = cfg.train.micro_batch_size = 3
        cfg.train.lr, cfg.train.max_steps, cfg.train.logging_steps = 3e-2, steps, 4
        cfg.train.eval_steps, cfg.train.save_steps = 4, 1000
        train(cfg)
        out[name] = tmp / name
    return {"base": base, "data": data, "tmp": tmp, **out}


def elyza_tasks(n: int) -> list[dict[str, str]]:
    with ELYZA_CSV.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))[:n]


def test_loss_base_and_adapter(runs, capsys):
    run, data, out = runs["run_a"], runs["data"], runs["run_a"] / "eval" / "loss_train.json"
    assert main(["eval", "loss", str(run), "--data", str(data), "--batch-size", "3", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got) == {"base", "adapter"} and set(got["adapter"]) == {"loss", "perplexity", "tokens"}
    table = capsys.readouterr().out
    assert "| base |" in table and "| adapter |" in table
    # The run's own cutoff_len (80) and masking: the train and validation records together hold
    # exactly the supervised tokens of all four records.
    from kaika.eval.loss import eval_loss

    assert got["base"]["tokens"] == got["adapter"]["tokens"]
    plain = eval_loss(runs["base"], str(data), cutoff_len=80)["model"]
    assert got["base"]["tokens"] == plain.tokens
    # With the adapter switched off, the model is the plain base; training lowered the loss.
    assert got["base"]["loss"] == pytest.approx(plain.loss, rel=1e-6)
    assert got["adapter"]["loss"] < 0.85 * got["base"]["loss"]
    assert got["adapter"]["perplexity"] == pytest.approx(2.718281828 ** got["adapter"]["loss"], rel=1e-6)


def judge_reply(prompt: str) -> tuple[int, str]:
    """Score 4, except 'unparseable' for the first task; refuse prompts without their grading notes."""
    tasks = elyza_tasks(N_TASKS)
    task = next((t for t in tasks if t["input"] in prompt), None)
    if task is None or task["eval_aspect"].strip() not in prompt or task["output"] not in prompt:
        return 400, "task, reference or grading notes missing from the prompt"
    if task is tasks[0]:
        return 200, "判定不能"
    return 200, "基準をおおむね満たす。\n点数: 4"


def test_generate_scores_and_judges(runs, capsys):
    out = runs["run_a"] / "eval" / "elyza"
    with JudgeServer(judge_reply) as server:
        code = main(
            [
                "eval",
                "generate",
                str(runs["run_a"]),
                "--tasks",
                str(ELYZA_CSV),
                "--limit",
                str(N_TASKS),
                "--output-dir",
                str(out),
                "--max-new-tokens",
                "12",
                "--generate.batch_size",
                "3",
                "--judge",
                server.url,
                "--judge-model",
                "local-judge",
                "--show",
                "2",
            ]
        )
    assert code == 0
    assert server.rejected == [] and len(server.requests) == 2 * N_TASKS
    printed = capsys.readouterr().out
    assert "| chrF (characters, 0–100) ↑ |" in printed and "judgments unparseable" in printed

    tasks = elyza_tasks(N_TASKS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == N_TASKS and list(summary["models"]) == ["base", "adapter"]
    answers = {}
    for name in ("base", "adapter"):
        rows = [json.loads(line) for line in (out / f"answers_{name}.jsonl").read_text().splitlines()]
        answers[name] = rows
        assert [r["instruction"] for r in rows] == [t["input"] for t in tasks]  # task order kept
        assert [r["eval_aspect"] for r in rows] == [t["eval_aspect"] for t in tasks]
        for r in rows:
            assert r["stopped"] or r["new_tokens"] == 12  # not stopped: ran into max_new_tokens
            expected = metrics.score(r["response"], r["reference"], r["stopped"])
            assert {k: r[k] for k in expected} == pytest.approx(expected)
        assert [r["judge_score"] for r in rows] == [None, 4.0, 4.0, 4.0]
        s = summary["models"][name]
        again = metrics.summarize(rows)
        for key in ("chrf", "rouge_l", "stop_rate", "repetition", "japanese_ratio", "length_ratio"):
            want = getattr(again, key)
            assert s[key] == (None if want is None else pytest.approx(want)), key
        assert (s["judge_parsed"], s["judge_unparseable"], s["judge_errors"]) == (3, 1, 0)
        assert s["judge_mean"] == 4.0
    # --show 2: the first two tasks, each model's answer under it, and how each answer ended.
    shown = printed[printed.index("[1] ") :]
    assert "[2] " in shown and "[3] " not in shown
    for name in ("base", "adapter"):
        first = answers[name][0]
        end = "EOS" if first["stopped"] else "cut at 12 tokens"
        assert f"{name:>7} ({end}): {first['response'][:20].replace(chr(10), ' ⏎ ')}" in shown
    # Training changed the model: base and adapter do not answer alike.
    assert [r["response"] for r in answers["base"]] != [r["response"] for r in answers["adapter"]]
    md = (out / "summary.md").read_text()
    assert "Δ (adapter − base)" in md and "| judge score (1–5) ↑ | 4.00 | 4.00 | +0.00 |" in md
    assert (out / "judge_prompt.txt").is_file() and (out / "judgments_adapter.jsonl").is_file()

    # A report on this run alone compares its tuned model with its base, task by task.
    report = runs["tmp"] / "report_one"
    assert main(["eval", "compare", str(runs["run_a"]), "--output-dir", str(report)]) == 0
    one = (report / "report.md").read_text(encoding="utf-8")
    assert "base (run_a)" in one and "Per-task Δ judge_score on elyza" in one and "run_a − base" in one
    assert one.count("| +0.00 |") == N_TASKS - 1  # both judged 4 on tasks 1..3; task 0 unparseable


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href", "action", "data", "poster", "srcset"):
                self.refs.append(value or "")
                if tag == "img":
                    self.images.append(value or "")


def test_compare_report_is_self_contained(runs, capsys):
    # Run B evaluated too (tuned model only), so both runs have per-task answers.
    out_b = runs["run_b"] / "eval" / "elyza"
    args = ["--tasks", str(ELYZA_CSV), "--limit", str(N_TASKS), "--max-new-tokens", "12", "--no-base-also"]
    assert main(["eval", "generate", str(runs["run_b"]), *args, "--output-dir", str(out_b)]) == 0
    if not (runs["run_a"] / "eval" / "elyza" / "summary.json").is_file():  # test run alone
        assert (
            main(
                [
                    "eval",
                    "generate",
                    str(runs["run_a"]),
                    *args,
                    "--output-dir",
                    str(runs["run_a"] / "eval" / "elyza"),
                ]
            )
            == 0
        )
    loss_json = runs["run_a"] / "eval" / "loss_train.json"
    if not loss_json.is_file():  # test run alone
        assert (
            main(["eval", "loss", str(runs["run_a"]), "--data", str(runs["data"]), "--json", str(loss_json)])
            == 0
        )
    report = runs["tmp"] / "report"
    assert main(["eval", "compare", str(runs["run_a"]), str(runs["run_b"]), "--output-dir", str(report)]) == 0
    page = (report / "report.html").read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(page)
    # Self-contained: every reference is inline data, nothing points to the network or to files.
    assert parser.refs and all(r.startswith("data:") for r in parser.refs), parser.refs
    # (the judge's address is shown as text in the Judges table: what graded what, not a reference)
    judged = json.loads((runs["run_a"] / "eval" / "elyza" / "summary.json").read_text(encoding="utf-8"))
    text = page.replace(judged["judge"]["url"], "") if "judge" in judged else page
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text
    assert len(parser.images) == 3  # loss curves, metric bars, per-task deltas
    for src in parser.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("run_a", "run_b"):
        assert label in page
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "run_a" in md and "run_b" in md and "run_b − run_a" in md
    loss = json.loads(loss_json.read_text())
    assert f"| run_a | loss_train | adapter | {loss['adapter']['loss']:.4f} |" in md
    # Per-task deltas are B's chrF minus A's, task by task.
    a = [
        json.loads(line)
        for line in (runs["run_a"] / "eval" / "elyza" / "answers_adapter.jsonl").read_text().splitlines()
    ]
    b = [json.loads(line) for line in (out_b / "answers_adapter.jsonl").read_text().splitlines()]
    # (run B has no judge scores, so chrF is the per-task metric)
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        assert f"| {i} | " in md and f"{rb['chrf'] - ra['chrf']:+.2f}" in md


def test_eval_errors_exit_2(runs, tmp_path, capsys):
    assert main(["eval", "generate", str(runs["run_a"]), "--tasks", str(tmp_path / "none.jsonl")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n', encoding="utf-8")
    assert main(["eval", "generate", str(runs["run_a"]), "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "none.jsonl" in err and "not found" in err
    assert "bad.jsonl, line 1: neither Alpaca form" in err
    assert main(["eval", "compare", str(tmp_path)]) == 2
    assert "has neither trainer_log.jsonl" in capsys.readouterr().err


def test_suite_report_a_failing_judge_and_compare_of_suites(runs, capsys):
    """ja-quick on both runs: A with a judge that answers, B with one that is down (its judged parts
    fail and are named; everything else is kept); then the two suites compared item by item."""

    def reply(prompt: str) -> tuple[int, str]:
        return (200, "点数: 4") if "点数: N" in prompt else mt_bench_reply(prompt)

    a, b = runs["run_a"] / "eval" / "suite-ja-quick", runs["run_b"] / "eval" / "suite-ja-quick"
    args = ["eval", "suite", "--suite", "ja-quick", "--limit", "4", "--max-new-tokens", "8"]
    with JudgeServer(reply) as server:
        assert main([*args[:2], str(runs["run_a"]), *args[2:], "--judge", server.url]) == 0
    with JudgeServer(lambda p: (500, "judge is down")) as down:
        assert (
            main([*args[:2], str(runs["run_b"]), *args[2:], "--judge", down.url, "--judge-timeout", "5"]) == 2
        )
    assert "2 part(s) of the suite failed: elyza-tasks-100, ja-mt-bench" in capsys.readouterr().err

    parts = json.loads((a / "suite.json").read_text(encoding="utf-8"))["parts"]
    assert [(p["name"], "error" in p) for p in parts] == [
        ("jcommonsenseqa", False), ("jnli", False), ("elyza-tasks-100-loss", False),
        ("elyza-tasks-100", False), ("ja-mt-bench", False)]  # fmt: skip
    jcqa = json.loads((a / "jcommonsenseqa" / "summary.json").read_text(encoding="utf-8"))
    assert jcqa["items"] == 4 and list(jcqa["models"]) == ["base", "adapter"]
    report = (a / "report.md").read_text(encoding="utf-8")
    for heading in ("## Suite", "## Multiple choice by log-likelihood", "### JCommonsenseQA", "### JNLI",
                    "## Evaluation: ja-mt-bench", "## Judges", "## Evaluation: elyza-tasks-100"):  # fmt: skip
        assert heading in report, heading
    assert "BLEU (MeCab/IPAdic morphemes" in report and "elyza-tasks-100-loss" in report

    errors = {
        p["name"]: p.get("error", "")
        for p in json.loads((b / "suite.json").read_text(encoding="utf-8"))["parts"]
    }
    assert "every judge request" in errors["elyza-tasks-100"] and "judge is down" in errors["ja-mt-bench"]
    assert not errors["jcommonsenseqa"] and (b / "jcommonsenseqa" / "summary.json").is_file()
    assert (b / "elyza-tasks-100" / "answers_adapter.jsonl").is_file()  # the answers were kept
    assert "failed: every judge request" in (b / "report.md").read_text(encoding="utf-8")

    # kaika eval compare takes suites (and runs, whose eval/ holds them): B against A, item by item
    out = runs["tmp"] / "suites_ab"
    assert main(["eval", "compare", str(a), str(b), "--output-dir", str(out)]) == 0
    both = (out / "report.md").read_text(encoding="utf-8")
    assert "Δ acc vs base (" in both and any(v in both for v in ("within noise", "better", "worse"))
    assert "<img" in (out / "report.html").read_text(encoding="utf-8")
