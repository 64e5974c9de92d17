"""``kaika eval loss|choice|generate|mt-bench|suite|compare``: options in, one library call, a table out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kaika.cli.options import (
    add_dataclass_args,
    add_field_arg,
    add_generate_args,
    add_inference_args,
    generate_args,
    namespace_overrides,
)
from kaika.config import (
    CompareOptions,
    DataArgs,
    EvalChoiceOptions,
    EvalGenerateOptions,
    EvalLossOptions,
    MTBenchOptions,
    SuiteOptions,
    coerce,
    from_dict,
)
from kaika.errors import KaikaError

MODEL_HELP = (
    "A kaika train output directory (or any PEFT adapter directory); a merged/full model directory, "
    "hub id or builtin name is evaluated alone"
)


def add_eval(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    add_loss(sub)
    add_choice(sub)
    add_generate(sub)
    add_mt_bench(sub)
    add_suite(sub)
    add_compare(sub)


def model_command(sub, name: str, options, run, help: str, description: str, template: bool = True,
                  answers: bool = False) -> argparse.ArgumentParser:  # fmt: skip
    """An eval subcommand on one model: ADAPTER_OR_MODEL, its options, the inference overrides, and for
    the ones that generate, the judge and decoding options."""
    cmd = sub.add_parser(name, help=help, description=description)
    cmd.add_argument("model", metavar="ADAPTER_OR_MODEL", help=MODEL_HELP)
    add_dataclass_args(cmd, options, keep_defaults=True)
    add_inference_args(cmd, template=template)
    if answers:
        add_judge_args(cmd)
        add_generate_args(cmd)
    cmd.set_defaults(eval_run=run)
    return cmd


def add_loss(sub) -> None:
    loss = model_command(
        sub, "loss", EvalLossOptions, run_loss,
        "Supervised-token loss and perplexity on held-out data, base vs adapter.",
        "Loss and perplexity over the supervised (response + EOS) tokens of held-out instruction data, "
        "encoded with the run's own template, cutoff_len and masking. The loss is summed over all "
        "supervised tokens and divided by their count (independent of batch size).",
    )  # fmt: skip
    add_field_arg(loss, DataArgs, "cutoff_len", "Override the run's cutoff_len", None)


def add_choice(sub) -> None:
    model_command(
        sub, "choice", EvalChoiceOptions, run_choice,
        "Multiple-choice tasks by log-likelihood (JCommonsenseQA, JNLI, your own), base vs adapter.",
        "Score multiple-choice and classification items without generating: each choice's summed token "
        "log-likelihood after a fixed Japanese prompt, as lm-evaluation-harness scores multiple_choice "
        "tasks (acc; acc_norm divides by the choice's length in characters). Accuracy with a 95 % Wilson "
        "interval per model, and a paired bootstrap interval of adapter minus base.",
        template=False,
    )  # fmt: skip


def add_generate(sub) -> None:
    model_command(
        sub, "generate", EvalGenerateOptions, run_generate,
        "Answer an evaluation set (Alpaca or ELYZA-tasks-100 form) and score the answers.",
        "Answer every task with the base model and the tuned model, write the answers as JSONL and score "
        "them against the reference: character chrF and ROUGE-L, morpheme BLEU and ROUGE-L, stop rate, "
        "repetition rate, Japanese-character ratio, length ratio; optionally an LLM judge (1–5).",
        answers=True,
    )  # fmt: skip


def add_mt_bench(sub) -> None:
    model_command(
        sub, "mt-bench", MTBenchOptions, run_mt_bench,
        "Japanese MT-Bench: 80 two-turn questions answered in the run's template, judged 1-10.",
        "Answer Japanese MT-Bench's 80 questions (8 categories) as two-turn conversations in the run's "
        "template, base and adapter, and with --judge grade each turn by MT-Bench's single-answer prompts "
        "(Japanese for turn 1, the English multi-turn ones for turn 2; math, reasoning and coding against "
        "the GPT-4 reference answers) on any OpenAI-compatible endpoint.",
        answers=True,
    )  # fmt: skip


def add_suite(sub) -> None:
    model_command(
        sub, "suite", SuiteOptions, run_suite,
        "Run a Japanese evaluation suite and write one report (Markdown + HTML).",
        "Run every part of a suite on a run, base vs adapter in one model load: JCommonsenseQA and JNLI by "
        "log-likelihood, the ELYZA-tasks-100 loss and answers (character and morpheme metrics), and with "
        "--judge the judged sets (ELYZA-tasks-100 1-5, Japanese MT-Bench 1-10). One report, "
        "ADAPTER/eval/suite-<suite>/report.md and report.html. A part that fails is named in the report; "
        "the others are kept.",
        answers=True,
    )  # fmt: skip


def add_judge_args(gen: argparse.ArgumentParser) -> None:
    from kaika.eval.judge import JudgeSettings

    add_dataclass_args(gen, JudgeSettings, "judge")


def judge_settings(ns: argparse.Namespace):
    """The judge the options ask for (checked), or None without --judge."""
    from kaika.eval.judge import JudgeSettings

    given = namespace_overrides(ns).get("judge", {})
    return from_dict(JudgeSettings, given, "judge options") if given.get("url") else None


def add_compare(sub) -> None:
    cmp = sub.add_parser(
        "compare",
        help="Report comparing runs: Markdown and a self-contained HTML page with plots.",
        description="Compare kaika runs: loss curves from trainer_log.jsonl, metric bars and per-task "
        "deltas from each run's eval/*/summary.json (written by kaika eval generate).",
    )
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="Run directories (the first is the baseline)")
    add_dataclass_args(cmp, CompareOptions, keep_defaults=True)
    cmp.set_defaults(eval_run=run_compare)


def run_loss(ns: argparse.Namespace) -> None:
    from kaika.eval.loss import eval_loss, format_loss_table

    columns = coerce(ns.columns, dict[str, str], "--columns") or None
    results = eval_loss(
        ns.model,
        ns.data,
        batch_size=ns.batch_size,
        base_model=ns.base_model,
        dtype=ns.dtype,
        template=ns.template,
        cutoff_len=ns.cutoff_len,
        columns=columns,
        json_path=ns.json_path,
    )
    print(format_loss_table(results))


def run_choice(ns: argparse.Namespace) -> None:
    from kaika.eval.answers import default_output_dir
    from kaika.eval.choice import eval_choice, summary_markdown

    out = ns.output_dir or default_output_dir(ns.model, ns.tasks)
    summary = eval_choice(ns.model, ns.tasks, out, ns.base_also, ns.base_model, ns.dtype, ns.limit)
    print(summary_markdown(summary))
    print(f"scores and summary written to {out}")


def run_generate(ns: argparse.Namespace) -> None:
    from kaika.eval.answers import SUMMARY_MD, default_output_dir, eval_generate, side_by_side

    args = generate_args(ns)
    out = ns.output_dir or default_output_dir(ns.model, ns.tasks)
    judge = judge_settings(ns)
    eval_generate(
        ns.model,
        ns.tasks,
        out,
        args,
        base_also=ns.base_also,
        base_model=ns.base_model,
        dtype=ns.dtype,
        template=ns.template,
        limit=ns.limit,
        judge=judge,
    )
    print((Path(out) / SUMMARY_MD).read_text(encoding="utf-8"))
    if ns.show:
        print(side_by_side(out, ns.show) + "\n")
    print(f"answers and summary written to {out}")


def run_mt_bench(ns: argparse.Namespace) -> None:
    from kaika.eval.answers import default_output_dir
    from kaika.eval.mtbench import OUTPUT_NAME, eval_mt_bench, summary_markdown

    out = ns.output_dir or default_output_dir(ns.model, OUTPUT_NAME)
    summary = eval_mt_bench(
        ns.model,
        out,
        generate_args(ns),
        judge_settings(ns),
        ns.base_also,
        ns.base_model,
        ns.dtype,
        ns.template,
        ns.categories,
        ns.limit,
    )
    print(summary_markdown(summary))
    print(f"answers and summary written to {out}")


def run_suite(ns: argparse.Namespace) -> None:
    from kaika.eval.answers import side_by_side
    from kaika.eval.suite import SUITE_FILE, default_suite_dir, eval_suite, summary_text

    out = Path(ns.output_dir or default_suite_dir(ns.model, ns.suite))
    md, page, failed = eval_suite(
        ns.model,
        ns.suite,
        out,
        generate_args(ns),
        judge_settings(ns),
        ns.base_model,
        ns.dtype,
        ns.template,
        ns.limit,
    )
    print(summary_text(out))
    parts = json.loads((out / SUITE_FILE).read_text(encoding="utf-8"))["parts"]
    answered = [out / p["name"] for p in parts if p["kind"] == "generate" and (out / p["name"]).is_dir()]
    if ns.show and answered:
        print(side_by_side(answered[0], ns.show) + "\n")
    print(f"report written to {md} and {page}")
    if failed:
        raise KaikaError(
            f"{len(failed)} part(s) of the suite failed: {', '.join(failed)} (named in the report)"
        )


def run_compare(ns: argparse.Namespace) -> None:
    from kaika.eval.report import compare

    md, page = compare(ns.runs, ns.output_dir)
    print(f"report written to {md} and {page}")
