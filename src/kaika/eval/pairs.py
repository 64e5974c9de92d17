"""``kaika dpo pairs``: preference pairs from a run's own answers, for users without a preference set.

For every task (Alpaca or ELYZA form, as ``kaika eval generate`` reads them, a reference answer
required), the run answers ``samples`` times by sampling (a different seed each time); each answer
is scored, and the best becomes ``chosen``, the worst ``rejected`` (``--chosen reference``: the
reference answer is chosen, the worst answer rejected). The scores:

* ``metrics``: an answer that stopped (EOS / end of turn within ``max_new_tokens``) beats one that was
  cut off; among those, the higher chrF against the reference wins, and, at equal chrF, the lower
  repetition rate (repeated 4-grams);
* ``judge``: the 1–5 score of an LLM judge (``kaika eval``'s prompt, an OpenAI-compatible API), ties
  broken as with ``metrics``.

A task whose answers all score the same gives no pair (there is nothing to prefer), nor one whose
best and worst answers are the same text; the report counts both. Pairs are written as JSONL that
``kaika dpo --data`` reads, with each side's score kept beside it.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from kaika.config import GenerateArgs
from kaika.errors import KaikaError
from kaika.eval import metrics

log = logging.getLogger(__name__)

Scorer = Literal["metrics", "judge"]
SCORERS = ("metrics", "judge")
CHOSEN = ("best", "reference")


@dataclass
class PairsReport:
    tasks: int = 0
    samples: int = 0
    pairs: int = 0
    no_preference: int = 0  # every answer scored the same
    same_text: int = 0  # best and worst answers identical
    judge_failures: int = 0  # answers the judge gave no score for (scored below every scored one)
    output: str = ""

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs from {self.tasks} tasks × {self.samples} samples → {self.output} "
            f"({self.no_preference} tasks with equal scores and {self.same_text} with identical answers "
            f"left out; {self.judge_failures} answers the judge did not score)"
        )


def metric_key(answer: dict) -> tuple:
    """Stopped first, then chrF, then less repetition: higher is better."""
    return (answer["stopped"], answer["chrf"] or 0.0, -(answer["repetition"] or 0.0))


def sample_answers(subject, tasks: list[dict], args: GenerateArgs, samples: int) -> list[list[dict]]:
    """``samples`` sampled answers per task, each scored by :func:`kaika.eval.metrics.score`."""
    from tqdm.auto import tqdm

    from kaika.inference.generate import generate_batch

    answers: list[list[dict]] = [[] for _ in tasks]
    with tqdm(total=len(tasks) * samples, desc="sampling answers", unit="answer") as bar:
        for k in range(samples):
            drawn = replace(args, seed=args.seed + k)
            for start in range(0, len(tasks), args.batch_size):
                chunk = tasks[start : start + args.batch_size]
                for i, gen in enumerate(generate_batch(subject, chunk, drawn), start=start):
                    answers[i].append(
                        {"text": gen.text, **metrics.score(gen.text, tasks[i]["reference"], gen.stopped)}
                    )
                bar.update(len(chunk))
    return answers


def judge_answers(judge, tasks: list[dict], answers: list[list[dict]]) -> int:
    """Each answer's ``judge`` score (None where the judge gave none); returns how many failed."""
    from kaika.eval.judge import judge_one

    client = judge.client()
    jobs = [(i, j) for i, task_answers in enumerate(answers) for j in range(len(task_answers))]

    def one(job):
        i, j = job
        row = {**tasks[i], "id": f"{i}-{j}", "response": answers[i][j]["text"]}
        return job, judge_one(client, judge, row)["score"]

    failures = 0
    with ThreadPoolExecutor(judge.concurrency) as pool:
        for (i, j), score in pool.map(one, jobs):
            answers[i][j]["judge"] = score
            failures += score is None
    return failures


def make_pairs(
    run: str | Path,
    tasks_source: str,
    output: str | Path,
    args: GenerateArgs,
    samples: int = 4,
    scorer: Scorer = "metrics",
    chosen: str = "best",
    judge=None,
    limit: int | None = None,
    base_model: str | None = None,
    dtype: str | None = None,
) -> PairsReport:
    from kaika.eval.answers import load_tasks
    from kaika.eval.loss import load_subject

    if scorer not in SCORERS:
        raise KaikaError(f"--score must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if chosen not in CHOSEN:
        raise KaikaError(f"--chosen must be one of {', '.join(CHOSEN)}, got {chosen!r}")
    if scorer == "judge" and judge is None:
        raise KaikaError("--score judge needs --judge URL (an OpenAI-compatible API)")
    if samples < (1 if chosen == "reference" else 2):
        raise KaikaError(
            "--samples: at least 2 answers per task are needed to prefer one (1 with --chosen reference)"
        )
    if args.temperature == 0 and samples > 1:
        raise KaikaError(
            "--temperature 0 is greedy: every sample would be the same answer; sample (e.g. 0.8)"
        )
    out = Path(output)
    if out.exists() and not out.is_file():
        raise KaikaError(f"--output {out} is a directory; give a .jsonl file")
    metrics.check_installed()
    if judge is not None:
        judge.check()
    tasks = load_tasks(tasks_source)[:limit]
    missing = [t["id"] for t in tasks if not metrics.normalize(t["reference"])]
    if missing:
        raise KaikaError(
            f"{tasks_source}: {len(missing)} task(s) without a reference answer (first: {missing[0]}); "
            "the scores compare answers with it"
        )
    subject = load_subject(run, base_model, dtype)
    answers = sample_answers(subject, tasks, args, samples)
    report = PairsReport(tasks=len(tasks), samples=samples, output=str(out))
    if scorer == "judge":
        report.judge_failures = judge_answers(judge, tasks, answers)
    rows = []
    for task, task_answers in zip(tasks, answers, strict=True):
        row = pair_of(task, task_answers, scorer, chosen, report)
        if row is not None:
            rows.append(row)
    report.pairs = len(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)  # a kill leaves the old file or the new one, never half of one
    (out.with_suffix(".report.json")).write_text(
        json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8"
    )
    log.info("pairs: %s", report.summary())
    return report


def pair_of(task: dict, answers: list[dict], scorer: str, chosen: str, report: PairsReport) -> dict | None:
    def key(a: dict) -> tuple:
        if scorer == "judge":
            return (a["judge"] is not None, a["judge"] or 0.0, *metric_key(a))
        return metric_key(a)

    ranked = sorted(answers, key=key, reverse=True)
    best, worst = ranked[0], ranked[-1]
    if chosen == "reference":
        best = {"text": task["reference"], "reference": True}
    elif key(best) == key(worst):
        report.no_preference += 1
        return None
    if metrics.normalize(best["text"]) == metrics.normalize(worst["text"]):
        report.same_text += 1
        return None
    row: dict[str, Any] = {"instruction": task["instruction"], "input": task["input"]}
    row.update(chosen=best["text"], rejected=worst["text"], task_id=task["id"], scorer=scorer)
    row["scores"] = {side: _scores(a) for side, a in (("chosen", best), ("rejected", worst))}
    return row


def _scores(answer: dict) -> dict:
    if answer.get("reference"):
        return {"reference": True}
    keep = ("stopped", "chrf", "repetition", "judge")
    return {k: answer[k] for k in keep if k in answer}
