"""``kaika eval suite``: every Japanese evaluation of a suite on one run, and one report.

A suite is data (``kaika/assets/eval_suites.json``): a list of parts, each one of kaika's evaluations
with its inputs and limits. The model is loaded once and every part scores base (adapter switched off)
and adapter with it. Each part writes what its own command writes, into ``OUT/<part>/`` (the loss into
``OUT/<part>.json``); a part that fails is named in ``suite.json`` and in the report, and the others
are kept. The report is :func:`kaika.eval.report.compare` on the suite's directory, which is also what
``kaika eval compare`` reads when given several runs' suites.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from kaika.config import GenerateArgs
from kaika.errors import KaikaError
from kaika.eval.report import SUITE_FILE, compare

__all__ = ["SUITE_FILE", "default_suite_dir", "eval_suite", "suite_parts", "summary_text"]

log = logging.getLogger(__name__)

SUITES_FILE = "eval_suites.json"  # in kaika.assets


@dataclass(frozen=True)
class Part:
    name: str
    kind: str  # choice | loss | generate | mt-bench
    tasks: str | None = None
    data: str | None = None
    limit: int | None = None
    per_category: int | None = None
    judged_only: bool = False  # only with --judge (answers nobody grades are not worth the time)


@cache
def suites() -> dict[str, dict[str, Any]]:
    text = resources.files("kaika.assets").joinpath(SUITES_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def suite_parts(name: str) -> list[Part]:
    if name not in suites():
        raise KaikaError(f"--suite {name!r}: no such suite; choose from {', '.join(suites())}")
    return [Part(**p) for p in suites()[name]["parts"]]


def default_suite_dir(model: str | Path, suite: str) -> Path:
    from kaika.eval.answers import default_output_dir

    return default_output_dir(model, f"suite-{suite}")


def _cap(limit: int | None, cap: int | None) -> int | None:
    return min(x for x in (limit, cap) if x) if (limit or cap) else None


def run_part(part: Part, subject, path, out: Path, args: GenerateArgs, judge, limit: int | None) -> None:
    """One part, into ``out``; raises KaikaError when it fails."""
    n = _cap(part.limit, limit)
    if part.kind == "choice":
        from kaika.eval.choice import eval_choice

        eval_choice(path, part.tasks, out / part.name, limit=n, subject=subject)
    elif part.kind == "loss":
        from kaika.eval.loss import eval_loss

        eval_loss(path, part.data, json_path=out / f"{part.name}.json", subject=subject)
    elif part.kind == "generate":
        from kaika.eval.answers import eval_generate

        eval_generate(path, part.tasks, out / part.name, args, limit=n, judge=judge, subject=subject)
    elif part.kind == "mt-bench":
        from kaika.eval.mtbench import eval_mt_bench

        eval_mt_bench(
            path, out / part.name, args, judge, limit=n, subject=subject, per_category=part.per_category
        )
    else:
        raise KaikaError(f"suite part {part.name}: unknown kind {part.kind!r}")


def summary_text(out: Path) -> str:
    """What a terminal shows after a suite: each part's own summary table, in the suite's order."""
    from kaika.eval.loss import LossResult, format_loss_table

    record = json.loads((out / SUITE_FILE).read_text(encoding="utf-8"))
    blocks = []
    for p in record["parts"]:
        if "skipped" in p or "error" in p:
            blocks.append(
                f"### {p['name']}: "
                + ("skipped, " + p["skipped"] if "skipped" in p else "FAILED: " + p["error"])
            )
        elif p["kind"] == "loss":
            data = json.loads((out / f"{p['name']}.json").read_text(encoding="utf-8"))
            table = format_loss_table({k: LossResult(**v) for k, v in data.items()})
            blocks.append(f"### {p['name']} (loss on the reference answers)\n\n{table}")
        else:
            md = (out / p["name"] / "summary.md").read_text(encoding="utf-8").strip()
            blocks.append(md if md.startswith("###") else f"### {p['name']}\n\n{md}")
    return "\n\n".join(blocks) + "\n"


def eval_suite(
    path: str | Path,
    suite: str,
    output_dir: str | Path,
    args: GenerateArgs | None = None,
    judge: Any = None,  # kaika.eval.judge.JudgeSettings
    base_model: str | None = None,
    dtype: str | None = None,
    template: str | None = None,
    limit: int | None = None,
) -> tuple[Path, Path, list[str]]:
    """Run every part of ``suite`` (the judged ones only with a judge), write ``suite.json`` and the
    report; return the report's two paths and the names of the parts that failed."""
    from kaika.eval.loss import load_subject

    parts = suite_parts(suite)
    if judge is not None:
        judge.check()  # a bad judge URL fails before any model loads
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    subject = load_subject(path, base_model, dtype, template)
    record: dict[str, Any] = {"suite": suite, "model": str(path), "description": suites()[suite]["description"],
                              "judge": judge.url if judge else None, "parts": []}  # fmt: skip
    for part in parts:
        entry: dict[str, Any] = {"name": part.name, "kind": part.kind}
        if part.judged_only and judge is None:
            entry["skipped"] = "needs --judge"
        else:
            started = time.monotonic()
            try:
                run_part(part, subject, path, out, args or GenerateArgs(), judge, limit)
            except KaikaError as e:
                log.error("suite part %s failed: %s", part.name, e)
                entry["error"] = str(e)
            entry["seconds"] = round(time.monotonic() - started, 1)
        record["parts"].append(entry)
        (out / SUITE_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", "utf-8")
    md, page = compare([out], out)
    return md, page, [e["name"] for e in record["parts"] if "error" in e]
