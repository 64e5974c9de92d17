"""``kaika eval compare``: runs side by side, as Markdown and as one self-contained HTML page.

A run is a ``kaika train`` output directory. From each it reads ``trainer_log.jsonl`` (loss
curves) and every evaluation under ``eval/`` (one level, or two inside a suite's directory): the
``summary.json`` of ``kaika eval generate`` (with its ``answers_*.jsonl`` for per-task deltas),
``kaika eval choice`` (with its per-item scores, for paired intervals between runs) and ``kaika eval
mt-bench``, the ``--json`` files of ``kaika eval loss``, and a suite's ``suite.json``. One evaluation's
or one suite's output directory can be given directly too. The HTML page embeds its plots as base64 PNG and its style inline: it opens
offline, can be mailed, and fetches nothing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaika.errors import KaikaError
from kaika.eval.answers import SUMMARY_JSON, TABLE_ROWS, answers_file

log = logging.getLogger(__name__)

LOG_FILE = "trainer_log.jsonl"  # written by kaika.training.sft (same name as train.LOG_FILE)
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUITE_FILE = "suite.json"  # what kaika eval suite ran, and which parts failed
DELTA_METRICS = ("judge_score", "chrf")  # per-task delta: the judge when there is one, else chrF


@dataclass
class Run:
    label: str
    path: Path
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_loss)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # task set → summary.json
    answers: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # task set → variant → rows
    losses: dict[str, dict[str, dict]] = field(default_factory=dict)  # eval/<name>.json of eval loss
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)  # task → {summary, rows: variant → rows}
    mtbench: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → summary.json
    suites: list[dict[str, Any]] = field(default_factory=list)  # suite.json of each suite run

    def empty(self) -> bool:
        return not (self.train or self.summaries or self.choices or self.mtbench or self.losses)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise KaikaError(f"{path}, line {n}: malformed JSON ({e.msg})") from None
    return rows


def _is_loss_file(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(v, dict) and "loss" in v for v in data.values())
    )


def _eval_root(path: Path) -> Path:
    """Where a run's evaluations are: ``RUN/eval``, or the directory itself when it is one evaluation's
    or one suite's output."""
    return path if (path / SUMMARY_JSON).is_file() or (path / SUITE_FILE).is_file() else path / "eval"


def _read_evaluation(run: Run, d: Path, name: str) -> None:
    from kaika.eval.choice import SCORES_FILE

    summary = json.loads((d / SUMMARY_JSON).read_text(encoding="utf-8"))
    kind = summary.get("kind", "generate")
    if kind == "choice":
        rows = {
            v: _read_jsonl(d / SCORES_FILE.format(v))
            for v in summary["models"]
            if (d / SCORES_FILE.format(v)).is_file()
        }
        run.choices[name] = {"summary": summary, "rows": rows}
    elif kind == "mt-bench":
        run.mtbench[name] = summary
    else:
        run.summaries[name] = summary
        run.answers[name] = {
            v: _read_jsonl(d / answers_file(v)) for v in summary["models"] if (d / answers_file(v)).is_file()
        }


def load_run(path: str | Path, label: str) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise KaikaError(f"run directory {path} does not exist")
    run = Run(label, path)
    if (path / LOG_FILE).is_file():
        for row in _read_jsonl(path / LOG_FILE):
            if "loss" in row:
                run.train.append((row["step"], row["loss"]))
            if "eval_loss" in row:
                run.evals.append((row["step"], row["eval_loss"]))
    root = _eval_root(path)
    if (root / SUMMARY_JSON).is_file():
        _read_evaluation(run, root, root.name)
    else:  # evaluations one level down, and two inside suites (named suite-x/part)
        for f in sorted([*root.glob(f"*/{SUMMARY_JSON}"), *root.glob(f"*/*/{SUMMARY_JSON}")]):
            _read_evaluation(run, f.parent, f.parent.relative_to(root).as_posix())
    for f in sorted([*root.glob("*.json"), *root.glob("*/*.json")]):  # kaika eval loss --json files
        if f.name not in (SUMMARY_JSON, SUITE_FILE):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # not ours
            if _is_loss_file(data):
                run.losses[f.relative_to(root).with_suffix("").as_posix()] = data
    run.suites = [
        json.loads(f.read_text(encoding="utf-8"))
        for f in sorted([*root.glob(SUITE_FILE), *root.glob(f"*/{SUITE_FILE}")])
    ]
    if run.empty():
        raise KaikaError(
            f"{path} has neither {LOG_FILE} nor evaluations (eval/*/{SUMMARY_JSON}): give kaika train output "
            "directories (after kaika eval … inside them) or evaluation or suite output directories"
        )
    return run


def run_labels(paths: list[Path]) -> list[str]:
    """Directory names, or longer path tails where names repeat."""
    for depth in range(1, 6):
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    title: str
    head: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines += ["| " + " | ".join(self.head) + " |", "|---" + "|---:" * (len(self.head) - 1) + "|"]
        lines += [
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in self.rows
        ]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        e = html.escape
        head = "".join(f"<th>{e(h)}</th>" for h in self.head)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        note = f"<p>{e(self.note)}</p>" if self.note else ""
        return f"<h3>{e(self.title)}</h3>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any, spec: str = "{:.3f}") -> str:
    return "–" if v is None else spec.format(v)


def runs_table(runs: list[Run]) -> Table:
    rows = []
    for r in runs:
        last_train = r.train[-1] if r.train else None
        last_eval = r.evals[-1] if r.evals else None
        rows.append(
            [
                r.label,
                str(last_train[0]) if last_train else "–",
                _fmt(last_train[1] if last_train else None, "{:.4f}"),
                _fmt(last_eval[1] if last_eval else None, "{:.4f}"),
                ", ".join([*r.choices, *r.summaries, *r.mtbench]) or "–",
            ]
        )
    return Table("Runs", ["run", "steps", "last train loss", "last eval loss", "evaluations"], rows)


def loss_table(runs: list[Run]) -> Table | None:
    rows = [
        [r.label, name, variant, f"{v['loss']:.4f}", f"{v['perplexity']:.2f}", str(v["tokens"])]
        for r in runs
        for name, data in r.losses.items()
        for variant, v in data.items()
    ]
    if not rows:
        return None
    return Table(
        "Held-out loss (kaika eval loss)", ["run", "data", "model", "loss", "perplexity", "tokens"], rows
    )


def columns_for(runs: list[Run], task_set: str) -> list[tuple[str, dict[str, Any]]]:
    """(column label, summary of one model variant): the first run's base, then every run's tuned model."""
    cols = []
    for i, r in enumerate(runs):
        models = r.summaries.get(task_set, {}).get("models", {})
        if i == 0 and "base" in models:
            cols.append((f"base ({r.label})", models["base"]))
        for variant in ("adapter", "model"):
            if variant in models:
                cols.append((r.label, models[variant]))
    return cols


def metrics_table(runs: list[Run], task_set: str) -> Table:
    cols = columns_for(runs, task_set)
    rows = []
    for key, label, spec in TABLE_ROWS:
        if any(key in s for _, s in cols):
            rows.append(
                [label]
                + [
                    (
                        "–"
                        if s.get(key) is None
                        else (spec.format(int(s[key])) if spec == "{:d}" else spec.format(s[key]))
                    )
                    for _, s in cols
                ]
            )
    return Table(f"Metrics on {task_set}", ["metric"] + [c for c, _ in cols], rows)


def task_deltas(
    runs: list[Run], task_set: str
) -> tuple[str, list[str], list[dict], list[list[float | None]]] | None:
    """Per task, each compared model's score minus the baseline's.

    With two or more runs the baseline is the first run's tuned model and every later run is
    compared with it; with one run, its tuned model is compared with its base.
    """
    variant = lambda r: next((v for v in ("adapter", "model") if v in r.answers.get(task_set, {})), None)  # noqa: E731
    have = [r for r in runs if variant(r)]
    if not have:
        return None
    if len(have) >= 2:
        baseline = have[0].answers[task_set][variant(have[0])]
        compared = [(r.label, r.answers[task_set][variant(r)]) for r in have[1:]]
        base_label = have[0].label
    elif "base" in have[0].answers[task_set]:
        baseline = have[0].answers[task_set]["base"]
        compared = [(have[0].label, have[0].answers[task_set][variant(have[0])])]
        base_label = "base"
    else:
        return None
    metric = next(
        (
            m
            for m in DELTA_METRICS
            if all(any(r.get(m) is not None for r in rows) for rows in [baseline] + [c[1] for c in compared])
        ),
        None,
    )
    if metric is None:
        return None
    for label, rows in compared:
        if [r["instruction"] for r in rows] != [r["instruction"] for r in baseline]:
            log.warning("per-task deltas skipped: %s answered other tasks than %s", label, base_label)
            return None
    deltas = [
        [
            None if a.get(metric) is None or b.get(metric) is None else a[metric] - b[metric]
            for a, b in zip(rows, baseline, strict=True)
        ]
        for _, rows in compared
    ]
    return metric, [f"{label} − {base_label}" for label, _ in compared], baseline, deltas


def delta_table(task_set: str, found) -> Table:
    metric, labels, baseline, deltas = found
    rows = []
    for i, task in enumerate(baseline):
        short = task["instruction"].replace("\n", " ")
        rows.append(
            [str(task.get("id", i)), short[:40] + ("…" if len(short) > 40 else "")]
            + [_fmt(d[i], "{:+.2f}") for d in deltas]
        )
    return Table(f"Per-task Δ {metric} on {task_set}", ["task", "instruction", *labels], rows)


def choice_columns(runs: list[Run], task: str) -> list[tuple[str, dict, list[dict]]]:
    """(label, model summary, per-item rows): the first run's base, then every run's tuned model."""
    cols = []
    for i, r in enumerate(runs):
        found = r.choices.get(task)
        if not found:
            continue
        models = found["summary"]["models"]
        names = (["base"] if i == 0 and "base" in models else []) + [
            v for v in ("adapter", "model") if v in models
        ]
        for v in names:
            cols.append(
                (f"base ({r.label})" if v == "base" else r.label, models[v], found["rows"].get(v, []))
            )
    return cols


def choice_table(runs: list[Run], task: str) -> Table:
    """Accuracy with its Wilson interval per model, and each model minus the first column on the same
    items with a paired bootstrap interval: "within noise" when it holds 0."""
    from kaika.eval.choice import (
        accuracy_cell,
        baselines_text,
        difference_text,
        paired_difference,
        shares_cell,
    )

    cols = choice_columns(runs, task)
    summary = next(r.choices[task]["summary"] for r in runs if task in r.choices)
    first_rows = cols[0][2]
    rows = []
    for j, (label, m, items) in enumerate(cols):
        delta = "–"
        same = items and first_rows and [x["id"] for x in items] == [x["id"] for x in first_rows]
        if j and same:
            d = paired_difference([x["correct"] for x in first_rows], [x["correct"] for x in items])
            delta = difference_text(d)
        rows.append([label, accuracy_cell(m), accuracy_cell(m, "acc_norm"), shares_cell(m), delta])
    note = (
        f"{summary['items']} items, {summary['scoring']}; 95 % Wilson intervals; Δ: paired bootstrap "
        f"against {cols[0][0]}. {baselines_text(summary['baselines'])}"
    )
    head = [
        "model",
        "acc %",
        "acc_norm %",
        "answers by position, %",
        f"Δ acc vs {cols[0][0]} (points, 95 % CI)",
    ]
    return Table(f"{summary.get('title', task)} ({task})", head, rows, note)


def mtbench_table(runs: list[Run], name: str) -> Table:
    cols = []
    for i, r in enumerate(runs):
        models = r.mtbench.get(name, {}).get("models", {})
        for v in (["base"] if i == 0 else []) + ["adapter", "model"]:
            if v in models:
                cols.append((f"base ({r.label})" if v == "base" else r.label, models[v]))
    keys = [("score", "score (1–10) ↑"), ("turn_1", "turn 1"), ("turn_2", "turn 2")]
    cats = list(dict.fromkeys(c for _, m in cols for c in m.get("categories", {})))
    rows = [[label] + [_fmt(m.get(k), "{:.2f}") for _, m in cols] for k, label in keys]
    rows += [[c] + [_fmt(m.get("categories", {}).get(c), "{:.2f}") for _, m in cols] for c in cats]
    rows += [[label] + [_fmt(m.get(k), "{:.2f}") for _, m in cols]
             for k, label in (("stop_rate_turn_1", "stop rate, turn 1"), ("stop_rate_turn_2", "stop rate, turn 2"))]  # fmt: skip
    return Table(f"Japanese MT-Bench ({name})", ["", *(c for c, _ in cols)], rows)


def judges_table(runs: list[Run]) -> Table | None:
    """What was judged by what: every judged evaluation, its judge and how many judgments parsed."""
    rows = []
    for r in runs:
        judged = [
            (n, s.get("judge"), s.get("judge_error")) for n, s in [*r.summaries.items(), *r.mtbench.items()]
        ]
        for name, judge, error in judged:
            if judge:
                for variant, m in judge["models"].items():
                    rows.append([r.label, name, variant, f"{judge['judge_model']} at {judge['url']}",
                                 str(m["judge_parsed"]), str(m["judge_unparseable"]), str(m["judge_errors"])])  # fmt: skip
                if judge.get("error"):
                    rows.append([r.label, name, "–", f"failed: {judge['error']}", "–", "–", "–"])
            elif error:
                rows.append([r.label, name, "–", f"failed: {error}", "–", "–", "–"])
    head = ["run", "evaluation", "model", "judge", "parsed", "unparseable", "failed"]
    return Table("Judges", head, rows) if rows else None


def suite_table(runs: list[Run]) -> Table | None:
    rows = [
        [
            r.label,
            s["suite"],
            p["name"],
            p["kind"],
            "failed: " + p["error"]
            if "error" in p
            else ("skipped: " + p["skipped"] if "skipped" in p else "done"),
            _fmt(p.get("seconds"), "{:.0f}"),
        ]  # fmt: skip
        for r in runs
        for s in r.suites
        for p in s["parts"]
    ]
    return Table("Suite parts", ["run", "suite", "part", "kind", "status", "seconds"], rows) if rows else None


def plot_choices(runs: list[Run], tasks: list[str]) -> bytes | None:
    """Accuracy per task and model with its 95 % interval, chance and majority marked."""
    if not tasks:
        return None
    fig = _figure(figsize=(3.2 * len(tasks), 3.4), dpi=100)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        cols = choice_columns(runs, task)
        acc = [100 * m["acc"] for _, m, _ in cols]
        err = [[a - 100 * m["acc_ci"][0] for a, (_, m, _) in zip(acc, cols, strict=True)],
               [100 * m["acc_ci"][1] - a for a, (_, m, _) in zip(acc, cols, strict=True)]]  # fmt: skip
        ax.bar(range(len(cols)), acc, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(cols))])
        b = next(r.choices[task]["summary"]["baselines"] for r in runs if task in r.choices)
        ax.axhline(100 * b["chance"], color="grey", linestyle=":", linewidth=1, label="chance")
        ax.axhline(100 * b["majority"], color="black", linestyle="--", linewidth=0.8, label="majority")
        ax.set_title(f"{task}: acc % (95 % CI)", fontsize=8)
        ax.set_xticks(range(len(cols)), [c for c, _, _ in cols], rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=6)
    return _png(fig)


# --------------------------------------------------------------------------- plots


def _figure(**kwargs):
    """A Figure of its own, not pyplot's: no backend is switched or kept open (a notebook's inline
    plots keep working, and nothing accumulates across calls)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_losses(runs: list[Run]) -> bytes | None:
    if not any(r.train or r.evals for r in runs):
        return None
    fig = _figure(figsize=(7, 3.8), dpi=100)
    ax = fig.subplots()
    for i, r in enumerate(runs):
        color = f"C{i}"
        if r.train:
            ax.plot(*zip(*r.train, strict=True), "-", color=color, label=f"{r.label} train")
        if r.evals:
            ax.plot(*zip(*r.evals, strict=True), "o--", color=color, label=f"{r.label} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_metrics(runs: list[Run], task_set: str) -> bytes | None:
    cols = columns_for(runs, task_set)
    keys = [
        (k, label)
        for k, label, spec in TABLE_ROWS
        if spec != "{:d}" and any(s.get(k) is not None for _, s in cols)
    ]
    if not keys:
        return None
    fig = _figure(figsize=(2.3 * len(keys), 3.2), dpi=100)
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        values = [s.get(key) or 0.0 for _, s in cols]
        ax.bar(range(len(cols)), values, color=[f"C{i}" for i in range(len(cols))])
        ax.set_title(label.replace(" (", "\n("), fontsize=8)
        ax.set_xticks(range(len(cols)), [c for c, _ in cols], rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    return _png(fig)


def plot_deltas(found) -> bytes | None:
    metric, labels, baseline, deltas = found
    fig = _figure(figsize=(max(6, 0.09 * len(baseline) * len(labels) + 3), 3.5), dpi=100)
    ax = fig.subplots()
    width = 0.8 / len(labels)
    for j, (label, d) in enumerate(zip(labels, deltas, strict=True)):
        xs = [i + j * width for i in range(len(d))]
        ax.bar(xs, [v or 0.0 for v in d], width=width, label=label, color=f"C{j + 1}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("task")
    ax.set_ylabel(f"Δ {metric}")
    ax.legend(fontsize=8)
    return _png(fig)


# --------------------------------------------------------------------------- report

_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th:first-child,td:first-child,td:nth-child(2){text-align:left}"
    "img{max-width:100%;display:block;margin:.5em 0 1.5em}"
)


def compare(paths: list[str | Path], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` (with PNGs beside it) and a self-contained ``report.html``; return both paths."""
    if not paths:
        raise KaikaError("give at least one run directory to report on")
    paths = [Path(p) for p in paths]
    runs = [load_run(p, label) for p, label in zip(paths, run_labels(paths), strict=True)]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, list[Table], list[tuple[str, bytes]]]] = []
    losses = plot_losses(runs)
    training = [runs_table(runs)] + ([t] if (t := loss_table(runs)) else [])
    sections.append(("Training", training, [("loss_curves.png", losses)] if losses else []))
    if (t := suite_table(runs)) is not None:
        sections.append(("Suite", [t], []))
    choice_tasks = list(dict.fromkeys(name for r in runs for name in r.choices))
    if choice_tasks:
        bars = plot_choices(runs, choice_tasks)
        sections.append(("Multiple choice by log-likelihood", [choice_table(runs, t) for t in choice_tasks],
                         [("choice_accuracy.png", bars)] if bars else []))  # fmt: skip
    for name in dict.fromkeys(n for r in runs for n in r.mtbench):
        sections.append((f"Evaluation: {name}", [mtbench_table(runs, name)], []))
    if (t := judges_table(runs)) is not None:
        sections.append(("Judges", [t], []))
    task_sets = list(dict.fromkeys(name for r in runs for name in r.summaries))
    for ts in task_sets:
        tables, plots = [metrics_table(runs, ts)], []
        if (bars := plot_metrics(runs, ts)) is not None:
            plots.append((f"metrics_{ts.replace('/', '_')}.png", bars))
        if (found := task_deltas(runs, ts)) is not None:
            tables.append(delta_table(ts, found))
            plots.append((f"deltas_{ts.replace('/', '_')}.png", plot_deltas(found)))
        sections.append((f"Evaluation: {ts}", tables, plots))

    title = "kaika run comparison: " + ", ".join(r.label for r in runs)
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, tables, plots in sections:
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for name, png in plots:
            (out / name).write_bytes(png)
            md += [f"![{name}]({name})", ""]
            body.append(
                f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            )
        for t in tables:
            md.append(t.markdown())
            body.append(t.html())
    (out / REPORT_MD).write_text("\n".join(md), encoding="utf-8")
    page = (
        f'<!DOCTYPE html><html lang="ja"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    (out / REPORT_HTML).write_text(page, encoding="utf-8")
    return out / REPORT_MD, out / REPORT_HTML
