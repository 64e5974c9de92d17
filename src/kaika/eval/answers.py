"""``kaika eval generate``: answer an evaluation set with base and tuned model, score the answers.

Task files come in two forms, told apart per record:

* Alpaca: ``{"instruction", "input"?, "output"?}`` — ``output`` is the reference answer;
* ELYZA-tasks-100: ``{"input", "output", "eval_aspect"}`` (CSV with that header, or JSON/JSONL) —
  ``input`` is the task, ``output`` the reference, ``eval_aspect`` the grading notes.

An optional ``eval_aspect`` is kept in both forms for the judge. Output, in ``output_dir``:
``answers_<model>.jsonl`` (one line per task: prompt, reference, answer, metrics),
``summary.json`` and ``summary.md``, plus the judge's files when ``--judge`` is given.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kaika.atomic import staged_output
from kaika.config import GenerateArgs
from kaika.data.records import DataError, Problem, builtin_data_path, iter_source
from kaika.errors import KaikaError
from kaika.eval import metrics
from kaika.eval.loss import load_subject, variants
from kaika.guard import DirLock, check_not_input
from kaika.inference.generate import Loaded
from kaika.rundir import EVAL_SUMMARY

log = logging.getLogger(__name__)

BUILTIN_TASKS = {"elyza-tasks-100": "elyza_tasks_100/elyza_tasks_100.csv"}  # CC BY-SA 4.0, shipped
SUMMARY_JSON = EVAL_SUMMARY  # the name rundir gives it: the model card reads it too
SUMMARY_MD = "summary.md"


def default_output_dir(model: str | Path, tasks: str | Path) -> Path:
    """Where an evaluation goes when not told: inside the run (``RUN/eval/<tasks>``), or, for a model
    that is not a directory (a hub id, a builtin), ``kaika-eval/<tasks>``."""
    stem = Path(str(tasks)).stem
    return Path(model) / "eval" / stem if Path(model).is_dir() else Path("kaika-eval") / stem


def answers_file(name: str) -> str:
    return f"answers_{name}.jsonl"


# --------------------------------------------------------------------------- tasks


def _text(rec: dict, key: str, source: str, where: str, problems: list[Problem], required: bool) -> str:
    value = rec.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            problems.append(Problem(source, where, key, "missing" if value is None else "empty"))
        return ""
    if not isinstance(value, str):
        problems.append(Problem(source, where, key, f"expected a string, got {type(value).__name__}"))
        return ""
    return value


def normalise_task(rec: Any, source: str, where: str, problems: list[Problem]) -> dict[str, str] | None:
    if not isinstance(rec, dict):
        problems.append(Problem(source, where, None, f"expected a JSON object, got {type(rec).__name__}"))
        return None
    before = len(problems)
    if "instruction" in rec:  # Alpaca form
        task = {
            "instruction": _text(rec, "instruction", source, where, problems, True),
            "input": _text(rec, "input", source, where, problems, False),
        }
    elif "input" in rec:  # ELYZA-tasks-100 form: the task is in "input"
        task = {"instruction": _text(rec, "input", source, where, problems, True), "input": ""}
    else:
        problems.append(
            Problem(
                source,
                where,
                None,
                f"neither Alpaca form (instruction, input?, output?) nor ELYZA form (input, output, "
                f"eval_aspect); the record has keys {', '.join(map(str, rec)) or 'none'}",
            )
        )
        return None
    task["reference"] = _text(rec, "output", source, where, problems, False)
    task["eval_aspect"] = _text(rec, "eval_aspect", source, where, problems, False)
    return task if len(problems) == before else None


def _iter_csv(path: Path, problems: list[Problem]):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        problems.append(
            Problem(str(path), "file", None, f"invalid UTF-8 at byte {e.start}; re-save as UTF-8")
        )
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for rec in reader:
        # reader.line_num is the line where the record ended (fields may span lines)
        yield f"line {reader.line_num}", {k: v for k, v in rec.items() if k is not None}


def load_tasks(source: str | Path) -> list[dict[str, str]]:
    """Tasks as ``{id, instruction, input, reference, eval_aspect}``; raises DataError listing problems.
    ``elyza-tasks-100`` names the copy shipped with kaika (with its grading notes)."""
    path = builtin_data_path(str(source), BUILTIN_TASKS) or Path(source)
    problems: list[Problem] = []
    rows = _iter_csv(path, problems) if path.suffix.lower() == ".csv" and path.is_file() else None
    tasks = []
    for where, rec in rows if rows is not None else iter_source(str(source), problems):
        task = normalise_task(rec, str(source), where, problems)
        if task is not None:
            tasks.append({"id": len(tasks), **task})
    if not tasks and not problems:
        problems.append(Problem(str(source), "file", None, "contains no tasks"))
    if problems:
        raise DataError(problems)
    return tasks


# --------------------------------------------------------------------------- answering


def answer_tasks(subject: Loaded, tasks: list[dict[str, str]], args: GenerateArgs, desc: str) -> list[dict]:
    """One row per task: the task, the answer, the generation facts and the metrics."""
    from tqdm.auto import tqdm

    from kaika.inference.generate import generate_batch

    rows: list[dict | None] = [None] * len(tasks)
    # Similar prompt lengths per batch: less left padding. Rows are put back in task order.
    order = sorted(range(len(tasks)), key=lambda i: len(tasks[i]["instruction"]) + len(tasks[i]["input"]))
    with tqdm(total=len(tasks), desc=desc, unit="task") as bar:
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            for i, gen in zip(idx, generate_batch(subject, [tasks[i] for i in idx], args), strict=True):
                t = tasks[i]
                rows[i] = {
                    **t,
                    "response": gen.text,
                    "new_tokens": gen.new_tokens,
                    **metrics.score(gen.text, t["reference"], gen.stopped),
                }
            bar.update(len(idx))
    return rows  # type: ignore[return-value]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def eval_generate(
    path: str | Path,
    tasks_file: str | Path,
    output_dir: str | Path,
    args: GenerateArgs | None = None,
    base_also: bool = True,
    base_model: str | None = None,
    dtype: str | None = None,
    template: str | None = None,
    limit: int | None = None,
    judge: Any = None,  # kaika.eval.judge.JudgeSettings
    subject: Loaded | None = None,
) -> dict[str, Any]:
    """Answer every task with each model variant, score, optionally judge; write and return the summary.
    ``subject``: the model already loaded (by the suite), else it is loaded from ``path``."""
    args = args or GenerateArgs()
    tasks = load_tasks(tasks_file)[:limit] if limit else load_tasks(tasks_file)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise KaikaError(f"output directory {out} is a file")
    for name in (*(answers_file(n) for n in ("base", "adapter", "model")), SUMMARY_JSON, SUMMARY_MD):
        check_not_input(out / name, [tasks_file], "the output file")
    metrics.check_installed()
    if judge is not None:
        judge.check()  # a bad judge URL or key fails before minutes of generation
    subject = subject or load_subject(path, base_model, dtype, template)
    # Everything is written aside and published together, the summary last; an earlier evaluation's
    # files that this one does not write again are removed with its summary: the directory is never a mix.
    ours = (*(answers_file(n) for n in ("base", "adapter", "model")), SUMMARY_MD, *JUDGE_FILES)
    with (
        DirLock(out, "eval generate"),
        staged_output(out, commit=SUMMARY_JSON, stale=ours, hint="Free some space and run it again") as stage,
    ):
        summary = _answer_and_write(subject, path, tasks_file, tasks, args, base_also, judge, stage)
    if summary.get("judge_error"):  # the answers and metrics are kept; the command still fails
        raise KaikaError(f"{summary['judge_error']}. The answers and their metrics were written to {out}.")
    return summary


def _answer_and_write(subject, path, tasks_file, tasks, args, base_also, judge, out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "model": str(path),
        "tasks_file": str(tasks_file),
        "tasks": len(tasks),
        "template": subject.template.name,
        "generate": asdict(args),
        "repetition_n": metrics.REPETITION_N,
        "tokenizers": metrics.morpheme_tokenizers(),
        "models": {},
    }
    all_rows: dict[str, list[dict]] = {}
    for name, context in variants(subject, base_also):
        with context():
            all_rows[name] = answer_tasks(subject, tasks, args, f"answering ({name})")
        write_jsonl(out / answers_file(name), all_rows[name])
        summary["models"][name] = asdict(metrics.summarize(all_rows[name]))
    if judge is not None:
        from kaika.eval.judge import judge_runs

        try:
            summary["judge"] = judge_runs(judge, all_rows, out)
        except KaikaError as e:  # every request failed: named in the summary, the answers kept
            summary["judge_error"] = str(e)
    if "judge" in summary:
        for name, rows in all_rows.items():
            write_jsonl(out / answers_file(name), rows)  # now with judge_score
            summary["models"][name].update(summary["judge"]["models"][name])
    (out / SUMMARY_JSON).write_text(
        json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    (out / SUMMARY_MD).write_text(summary_markdown(summary), encoding="utf-8")
    return summary


# The files a judged evaluation adds (kaika.eval.judge writes them).
JUDGE_FILES = ("judge_prompt.txt", *(f"judgments_{n}.jsonl" for n in ("base", "adapter", "model")))


# --------------------------------------------------------------------------- summary table

# (key, label, format) in table order; the judge rows appear only when present.
TABLE_ROWS = [
    ("chrf", "chrF (characters, 0–100) ↑", "{:.2f}"),
    ("rouge_l", "ROUGE-L (characters, 0–1) ↑", "{:.3f}"),
    ("bleu_ja", "BLEU (MeCab/IPAdic morphemes, 0–100) ↑", "{:.2f}"),
    ("rouge_l_morph", "ROUGE-L (MeCab/UniDic-lite morphemes, 0–1) ↑", "{:.3f}"),
    ("judge_mean", "judge score (1–5) ↑", "{:.2f}"),
    ("judge_parsed", "judgments parsed", "{:d}"),
    ("judge_unparseable", "judgments unparseable", "{:d}"),
    ("stop_rate", "stop rate (EOS before limit) ↑", "{:.2f}"),
    ("empty_rate", "empty answers", "{:.2f}"),
    ("repetition", "repetition rate ↓", "{:.3f}"),
    ("japanese_ratio", "Japanese-character ratio", "{:.3f}"),
    ("length_ratio", "length ratio (answer/reference)", "{:.2f}"),
    ("mean_new_tokens", "mean new tokens", "{:.1f}"),
]


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    return spec.format(int(value)) if spec == "{:d}" else spec.format(value)


def side_by_side(out_dir: str | Path, n: int, width: int = 160) -> str:
    """The first ``n`` tasks with each model's answer (from ``answers_<model>.jsonl``), as text:
    one block per task, ⏎ for a newline, long answers cut at ``width`` characters."""
    out_dir = Path(out_dir)
    names = [name for name in ("base", "adapter", "model") if (out_dir / answers_file(name)).is_file()]
    rows = {name: _read_rows(out_dir / answers_file(name))[:n] for name in names}

    def short(text: str) -> str:
        text = text.replace("\n", " ⏎ ")
        return text if len(text) <= width else text[: width - 1] + "…"

    blocks = []
    for i in range(min(len(r) for r in rows.values()) if rows else 0):
        first = rows[names[0]][i]
        lines = [f"[{i + 1}] {short(first['instruction'])}"]
        for name in names:
            row = rows[name][i]
            end = "EOS" if row.get("stopped") else f"cut at {row['new_tokens']} tokens"
            lines.append(f"  {name:>7} ({end}): {short(row['response'])}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summary_markdown(summary: dict[str, Any]) -> str:
    models = summary["models"]
    names = list(models)
    show_delta = names == ["base", "adapter"]
    head = ["metric", *names, *(["Δ (adapter − base)"] if show_delta else [])]
    lines = [
        f"Tasks: `{summary['tasks_file']}` ({summary['tasks']}), model: `{summary['model']}`, "
        f"greedy={summary['generate']['temperature'] == 0}, max_new_tokens={summary['generate']['max_new_tokens']}",
        "",
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
    ]
    for key, label, spec in TABLE_ROWS:
        values = [models[n].get(key) for n in names]
        if key not in models[names[0]]:
            continue
        cells = [_fmt(v, spec) for v in values]
        if show_delta:
            a, b = values[1], values[0]
            cells.append(
                "–" if a is None or b is None or spec == "{:d}" else ("{:+" + spec[2:]).format(a - b)
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if summary.get("judge_error"):
        lines.append(f"\n**judge failed**: {summary['judge_error']}")
    for metric, tokenizer in summary.get("tokenizers", {}).items():
        lines.append(f"\n`{metric}` tokenized by {tokenizer}")
    return "\n".join(lines) + "\n"
