"""``kaika eval mt-bench``: Japanese MT-Bench, answered in two turns and graded by a judge (1–10).

80 questions in 8 categories (Stability AI's Japanese localisation of MT-Bench, shipped with its
GPT-4 reference answers and judge prompts; see ``kaika/assets/japanese_mt_bench/PROVENANCE.md``).
Each question is asked as a conversation in the run's own template: the first turn alone, then the
second after the model's own first answer. The grading follows MT-Bench's single-answer grading:

* turn 1: the Japanese prompts ``single-v1`` (general) and ``single-math-v1`` (math, reasoning,
  coding, with the reference answer), the judge ending with ``[[N]]``;
* turn 2: the multi-turn prompts ``single-v1-multi-turn`` / ``single-math-v1-multi-turn``, which exist
  only in English (what the Japanese leaderboards grade the second turn with).

Scores: the mean per turn, per category and overall, 1–10, per model variant. A judgment without a
score in 1–10 is counted as unparseable, a failed request as an error; neither stops the run.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from kaika.config import GenerateArgs
from kaika.errors import KaikaError

log = logging.getLogger(__name__)

ASSETS = "japanese_mt_bench"
NEEDS_REFERENCE = ("math", "reasoning", "coding")  # graded against the reference answer (MT-Bench's rule)
CATEGORIES = ("coding", "extraction", "humanities", "math", "reasoning", "roleplay", "stem", "writing")
OUTPUT_NAME = "ja-mt-bench"


def _asset_lines(name: str) -> list[dict]:
    text = resources.files("kaika.assets").joinpath(f"{ASSETS}/{name}").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@cache
def judge_prompts() -> dict[str, dict]:
    """The four single-answer prompts by name: Japanese for turn 1, English multi-turn for turn 2."""
    ja = {p["name"]: p for p in _asset_lines("judge_ja_prompts.jsonl")}
    en = {p["name"]: p for p in _asset_lines("judge_prompts.jsonl") if p["name"].endswith("multi-turn")}
    return {**ja, **en}


def load_questions(
    categories: list[str] | None = None, limit: int | None = None, per_category: int | None = None
) -> list[dict[str, Any]]:
    """The questions (with the reference answers of the categories graded against them): those of
    ``categories``, the first ``per_category`` of each, the first ``limit`` in all."""
    unknown = sorted(set(categories or ()) - set(CATEGORIES))
    if unknown:
        raise KaikaError(f"--categories: unknown {', '.join(unknown)}; choose from {', '.join(CATEGORIES)}")
    refs = {r["question_id"]: r["choices"][0]["turns"] for r in _asset_lines("reference_answer_gpt-4.jsonl")}
    questions = [
        {**q, "reference": refs.get(q["question_id"]) if q["category"] in NEEDS_REFERENCE else None}
        for q in _asset_lines("question.jsonl")
        if not categories or q["category"] in categories
    ]
    if per_category:
        taken: Counter[str] = Counter()
        kept = []
        for q in questions:
            taken[q["category"]] += 1
            if taken[q["category"]] <= per_category:
                kept.append(q)
        questions = kept
    return questions[:limit] if limit else questions


# --------------------------------------------------------------------------- answering


def answer_questions(subject, questions: list[dict], args: GenerateArgs, desc: str) -> list[dict[str, Any]]:
    """Both turns of every question: turn 2 sees the model's own answer to turn 1."""
    from tqdm.auto import tqdm

    from kaika.data.segments import prompt_ids
    from kaika.inference.generate import generate_ids

    tok, template = subject.tokenizer, subject.template
    rows = [{**q, "answers": [], "new_tokens": [], "stopped": []} for q in questions]
    with tqdm(total=2 * len(rows), desc=desc, unit="turn") as bar:
        for turn in range(2):
            for start in range(0, len(rows), args.batch_size):
                chunk = rows[start : start + args.batch_size]
                prompts = [prompt_ids(template, tok, conversation(r, turn)) for r in chunk]
                for r, gen in zip(chunk, generate_ids(subject, prompts, args), strict=True):
                    r["answers"].append(gen.text)
                    r["new_tokens"].append(gen.new_tokens)
                    r["stopped"].append(gen.stopped)
                bar.update(len(chunk))
    return rows


def conversation(row: dict, turn: int) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": row["turns"][0]}]
    if turn == 1:
        messages += [
            {"role": "assistant", "content": row["answers"][0]},
            {"role": "user", "content": row["turns"][1]},
        ]
    return messages


# --------------------------------------------------------------------------- judging

_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_RATING_LOOSE = re.compile(r"\[(\d+(?:\.\d+)?)\]")


def parse_rating(reply: str | None) -> float | None:
    """MT-Bench's ``[[N]]`` (else ``[N]``, as its own parser falls back), the last one, 1–10; else None."""
    if not reply:
        return None
    text = unicodedata.normalize("NFKC", reply)
    found = _RATING.findall(text) or _RATING_LOOSE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def judge_messages(row: dict, turn: int) -> list[dict[str, str]]:
    """The system and user messages of MT-Bench's single-answer grading of ``turn`` (0 or 1)."""
    math = row["category"] in NEEDS_REFERENCE and row.get("reference")
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 1 else "")
    spec = judge_prompts()[name]
    ref = row.get("reference") or ["", ""]
    fields = {
        "question": row["turns"][0],
        "answer": row["answers"][0],
        "question_1": row["turns"][0],
        "question_2": row["turns"][1],
        "answer_1": row["answers"][0],
        "answer_2": row["answers"][1],
        "ref_answer_1": ref[0],
        "ref_answer_2": ref[1],
    }
    return [
        {"role": "system", "content": spec["system_prompt"]},
        {"role": "user", "content": spec["prompt_template"].format(**fields)},
    ]


def judge_answers(settings, all_rows: dict[str, list[dict]], out: Path) -> dict[str, Any]:
    """Grade both turns of every answer of every variant; adds ``scores`` to the rows, writes
    ``judgments_<variant>.jsonl``. Every request failing is an error named in the result."""
    from tqdm.auto import tqdm

    from kaika.eval.judge import ask

    client = settings.client()
    result: dict[str, Any] = {"url": settings.url, "judge_model": settings.model, "models": {}}
    failures = total = 0
    for name, rows in all_rows.items():
        jobs = [(r, t) for r in rows for t in range(2)]

        def grade(job):
            row, turn = job
            messages = judge_messages(row, turn)
            judgment, error = ask(client, settings, messages)
            rating = parse_rating(judgment) if error is None else None
            return {"question_id": row["question_id"], "turn": turn + 1, "messages": messages,
                    "judgment": judgment, "score": rating, "error": error}  # fmt: skip

        with ThreadPoolExecutor(max(1, settings.concurrency)) as pool:
            records = list(
                tqdm(pool.map(grade, jobs), total=len(jobs), desc=f"judging ({name})", unit="answer")
            )
        with (out / f"judgments_{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"model": name, **rec}, ensure_ascii=False) + "\n" for rec in records)
        for (row, turn), rec in zip(jobs, records, strict=True):
            row.setdefault("scores", [None, None])[turn] = rec["score"]
        errors = [r["error"] for r in records if r["error"]]
        failures, total = failures + len(errors), total + len(records)
        result["models"][name] = {
            "judge_parsed": sum(r["score"] is not None for r in records),
            "judge_unparseable": sum(r["error"] is None and r["score"] is None for r in records),
            "judge_errors": len(errors),
            "first_error": errors[0] if errors else None,
        }
        if errors:
            log.warning("judge: %d of %d requests failed (first: %s)", len(errors), len(records), errors[0])
    if total and failures == total:
        result["error"] = f"every judge request to {settings.url} failed; the first error: " + next(
            m["first_error"] for m in result["models"].values()
        )
    return result


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def scores_summary(rows: list[dict]) -> dict[str, Any]:
    """Mean judge score per turn, per category (both turns) and overall; stop rate per turn."""
    scored = [
        (r["category"], t, s) for r in rows for t, s in enumerate(r.get("scores") or []) if s is not None
    ]
    return {
        "questions": len(rows),
        "score": _mean([s for _, _, s in scored]),
        "turn_1": _mean([s for _, t, s in scored if t == 0]),
        "turn_2": _mean([s for _, t, s in scored if t == 1]),
        "categories": {
            c: _mean([s for cat, _, s in scored if cat == c])
            for c in CATEGORIES
            if any(r["category"] == c for r in rows)
        },  # fmt: skip
        "stop_rate_turn_1": _mean([float(r["stopped"][0]) for r in rows]),
        "stop_rate_turn_2": _mean([float(r["stopped"][1]) for r in rows]),
        "mean_new_tokens": _mean([float(n) for r in rows for n in r["new_tokens"]]),
    }


# --------------------------------------------------------------------------- the command


def eval_mt_bench(
    path: str | Path,
    output_dir: str | Path,
    args: GenerateArgs | None = None,
    judge: Any = None,  # kaika.eval.judge.JudgeSettings
    base_also: bool = True,
    base_model: str | None = None,
    dtype: str | None = None,
    template: str | None = None,
    categories: list[str] | None = None,
    limit: int | None = None,
    subject: Any = None,
    per_category: int | None = None,
) -> dict[str, Any]:
    """Answer (both turns) with each variant, judge when a judge is given, write and return the summary.
    When every judge request fails the answers are still written, and the error is raised after."""
    from kaika.atomic import staged_output
    from kaika.eval.answers import write_jsonl
    from kaika.eval.loss import load_subject, variants
    from kaika.guard import DirLock

    args = args or GenerateArgs(max_new_tokens=512)
    questions = load_questions(categories, limit, per_category)
    if judge is not None:
        judge.check()
    out = Path(output_dir)
    subject = subject or load_subject(path, base_model, dtype, template)
    summary: dict[str, Any] = {
        "kind": "mt-bench",
        "model": str(path),
        "questions": len(questions),
        "template": subject.template.name,
        "generate": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature},
        "scale": "1–10 (MT-Bench single-answer grading)",
        "models": {},
    }
    stale = [f"{k}_{n}.jsonl" for k in ("answers", "judgments") for n in ("base", "adapter", "model")]
    with (
        DirLock(out, "eval mt-bench"),
        staged_output(out, commit="summary.json", stale=[*stale, "summary.md"]) as stage,
    ):
        rows: dict[str, list[dict]] = {}
        for name, context in variants(subject, base_also):
            with context():
                rows[name] = answer_questions(subject, questions, args, f"ja-mt-bench ({name})")
        if judge is not None:
            summary["judge"] = judge_answers(judge, rows, stage)
        for name, r in rows.items():
            write_jsonl(stage / f"answers_{name}.jsonl", r)
            summary["models"][name] = scores_summary(r)
        (stage / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", "utf-8")
        (stage / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    if summary.get("judge", {}).get("error"):
        raise KaikaError(f"{summary['judge']['error']}. The answers were written to {out}.")
    return summary


def _f(v: float | None, spec: str = "{:.2f}") -> str:
    return "–" if v is None else spec.format(v)


def summary_markdown(s: dict[str, Any]) -> str:
    names = list(s["models"])
    judged = "judge" in s
    head = f"| | {' | '.join(names)} |\n|---|" + "---:|" * len(names)
    keys = [("score", "score (1–10) ↑"), ("turn_1", "turn 1"), ("turn_2", "turn 2")] if judged else []
    keys += [("stop_rate_turn_1", "stop rate, turn 1"), ("stop_rate_turn_2", "stop rate, turn 2"),
             ("mean_new_tokens", "mean new tokens")]  # fmt: skip
    lines = [f"### Japanese MT-Bench ({s['questions']} questions, two turns)", "", head]
    lines += [f"| {label} | " + " | ".join(_f(s["models"][n][k]) for n in names) + " |" for k, label in keys]
    if judged:
        cats = list(s["models"][names[0]]["categories"])
        lines += [
            f"| {c} | " + " | ".join(_f(s["models"][n]["categories"].get(c)) for n in names) + " |"
            for c in cats
        ]
        j = s["judge"]
        lines.append(f"\nJudged by `{j['judge_model']}` at {j['url']}: " + "; ".join(
            f"{n}: {m['judge_parsed']} parsed, {m['judge_unparseable']} unparseable, {m['judge_errors']} failed"
            for n, m in j["models"].items()))  # fmt: skip
        if j.get("error"):
            lines.append(f"\n**judge failed**: {j['error']}")
    else:
        lines.append("\nNot judged (no --judge): answers only.")
    return "\n".join(lines) + "\n"
