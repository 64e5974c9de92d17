"""LLM-as-judge: a 1–5 score per answer from any OpenAI-compatible chat endpoint (official ``openai`` client).

The judge sees the task, the reference answer, the grading notes (ELYZA's ``eval_aspect``) and
the answer, and ends its reply with 「点数: N」. Replies are parsed leniently; a reply with no
score in 1–5 is counted as unparseable and a failed request as an error, neither stops the run.
The prompt template and every raw reply are saved next to the answers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaika.config import Checked, option
from kaika.errors import KaikaError, require_extra

log = logging.getLogger(__name__)

PROMPT_FILE = "judge_prompt.txt"
API_KEY_ENV = ("KAIKA_JUDGE_API_KEY", "OPENAI_API_KEY")

JUDGE_PROMPT = """\
あなたは日本語の回答を公平に採点する評価者です。次の「問題」に対する「回答」を、「参考回答」と「採点基準」に照らして1〜5の整数で採点してください。

採点の目安:
- 5点: 指示に完全に従っており、内容が正確で、自然な日本語で書かれている。
- 4点: おおむね良いが、小さな誤り・不足・不自然な表現がある。
- 3点: 部分的には正しいが、重要な誤りや欠落がある。
- 2点: 問題の意図をほとんど満たしていない。
- 1点: 誤り・無関係・意味不明、または日本語で答えていない。
採点基準に加点や減点の指示があれば、それを最優先してください。参考回答と表現が違っても、内容が正しければ減点しないでください。途中で途切れた回答や同じ内容の繰り返しは減点してください。

## 問題
{instruction}

## 参考回答
{reference}

## 採点基準
{eval_aspect}

## 回答
{response}

採点理由を簡潔に述べたあと、最後の行に「点数: N」(Nは1〜5の整数)とだけ書いてください。
"""

# 「点数: 4」「点数：４点」「**点数**: 4」「Score: 4」「評価: 4/5」, the last one in the reply wins.
_LABELLED = re.compile(r"(?:点数|得点|評価|スコア|score|rating)\W{0,4}?(\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE = re.compile(r"^\W*(\d+(?:\.\d+)?)\s*(?:点|/\s*5)?\W*$")  # a reply that is just "4" or "4点"


def parse_score(reply: str | None) -> float | None:
    """The 1–5 score in a judge's reply, or None when there is none (or it is out of range)."""
    if not reply:
        return None
    text = unicodedata.normalize("NFKC", reply).strip()
    found = _LABELLED.findall(text)
    if not found and (bare := _BARE.match(text.splitlines()[-1] if text else "")):
        found = [bare.group(1)]
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 5 else None


def build_prompt(row: dict[str, Any]) -> str:
    instruction = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return JUDGE_PROMPT.format(
        instruction=instruction,
        reference=row.get("reference") or "(なし)",
        eval_aspect=(row.get("eval_aspect") or "").strip() or "(特になし)",
        response=row["response"] or "(空の回答)",
    )


@dataclass
class JudgeSettings(Checked):
    """LLM-as-judge through an OpenAI-compatible chat API."""

    url: str | None = option(
        None, "Base URL of the judge API, e.g. http://127.0.0.1:8000/v1 (unset: no judge)", flag="--judge"
    )
    model: str = option("judge", "Model name sent to the judge API")
    api_key: str | None = option(
        None, "API key (default: $KAIKA_JUDGE_API_KEY, else $OPENAI_API_KEY, else none)"
    )
    max_tokens: int = option(512, "Tokens per judgment", ge=1)
    concurrency: int = option(4, "Parallel judge requests", ge=1)
    timeout: float = option(120.0, "Seconds a judge request may take", gt=0)

    def check(self) -> None:
        if not re.match(r"^https?://", self.url or ""):
            raise KaikaError(
                f"--judge {self.url!r}: give the base URL of an OpenAI-compatible API, "
                "e.g. http://127.0.0.1:8000/v1"
            )
        require_extra("eval", ("openai",), "--judge")

    def client(self):
        from openai import OpenAI

        key = self.api_key or next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        # Local servers need no key, but the client insists on one.
        return OpenAI(base_url=self.url, api_key=key or "no-key", timeout=self.timeout, max_retries=2)


def ask(client, settings: JudgeSettings, messages: list[dict[str, str]]) -> tuple[str | None, str | None]:
    """(the judge's reply, None), or (None, the error) when the request failed: one failure is counted
    by the caller, never fatal."""
    import openai

    try:
        reply = client.chat.completions.create(
            model=settings.model, messages=messages, temperature=0, max_tokens=settings.max_tokens
        )
    except openai.APIError as e:
        return None, f"{type(e).__name__}: {e}"
    return (reply.choices[0].message.content if reply.choices else None), None


def judge_one(client, settings: JudgeSettings, row: dict[str, Any]) -> dict[str, Any]:
    prompt = build_prompt(row)
    judgment, error = ask(client, settings, [{"role": "user", "content": prompt}])
    score = parse_score(judgment) if error is None else None
    return {"id": row["id"], "prompt": prompt, "judgment": judgment, "score": score, "error": error}


def all_failed_error(settings: JudgeSettings, errors: list[str]) -> KaikaError:
    return KaikaError(f"every judge request to {settings.url} failed; the first error: {errors[0]}")


def judge_runs(settings: JudgeSettings, all_rows: dict[str, list[dict]], out: Path) -> dict[str, Any]:
    """Judge every answer of every model variant; adds ``judge_score`` to the rows, writes the files."""
    from tqdm.auto import tqdm

    client = settings.client()
    (out / PROMPT_FILE).write_text(JUDGE_PROMPT, encoding="utf-8")
    result: dict[str, Any] = {"url": settings.url, "judge_model": settings.model, "models": {}}
    errors: list[str] = []
    for name, rows in all_rows.items():
        with ThreadPoolExecutor(max(1, settings.concurrency)) as pool:
            records = list(
                tqdm(
                    pool.map(lambda r: judge_one(client, settings, r), rows),
                    total=len(rows),
                    desc=f"judging ({name})",
                    unit="answer",
                )
            )
        with (out / f"judgments_{name}.jsonl").open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps({"model": name, **rec}, ensure_ascii=False) + "\n")
        for row, rec in zip(rows, records, strict=True):
            row["judge_score"] = rec["score"]
        scores = [r["score"] for r in records if r["score"] is not None]
        failed = [r["error"] for r in records if r["error"]]
        errors += failed
        result["models"][name] = {
            "judge_mean": sum(scores) / len(scores) if scores else None,
            "judge_parsed": len(scores),
            "judge_unparseable": sum(1 for r in records if r["error"] is None and r["score"] is None),
            "judge_errors": len(failed),
        }
        if failed:
            log.warning("judge: %d of %d requests failed (first: %s)", len(failed), len(rows), failed[0])
    if errors and len(errors) == sum(len(r) for r in all_rows.values()):
        raise all_failed_error(settings, errors)
    return result
