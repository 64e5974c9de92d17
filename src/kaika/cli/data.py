"""``kaika data check|stats|convert`` and ``kaika translate``: options in, one library call, a report out."""

from __future__ import annotations

import argparse
import json

from kaika.cli.options import add_dataclass_args, options_from
from kaika.config import ConvertOptions, StatsOptions, coerce, from_dict
from kaika.data.check import (
    KINDS,
    CheckCommand,
    CheckOptions,
    FixOptions,
    check_files,
    failing,
    fix_files,
    print_report,
)
from kaika.data.stats import data_stats, print_stats


def _columns(values: list[str]) -> dict[str, str]:
    return coerce(values, dict[str, str], "--columns")


def add_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    kinds = "\n".join(f"  {k:<22} {sev:<8} {meaning}" for k, (sev, meaning) in KINDS.items())
    c = sub.add_parser(
        "check",
        help="Report problems in instruction data",
        description="Report problems in instruction data: a table per kind, examples with their line and "
        "field, --json for machines, an exit status for CI (--fail-on). Japanese checks run on files whose "
        "text is mostly Japanese. Nothing is modified; --fix writes new files.",
        epilog=f"kinds (severity):\n{kinds}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("files", nargs="+", metavar="FILE", help="Data files: Alpaca, conversations or preference "
                   "pairs, JSON/JSONL (or dataset dirs)")  # fmt: skip
    add_dataclass_args(c, CheckOptions)
    add_dataclass_args(c, CheckCommand)
    add_dataclass_args(c, FixOptions)
    c.set_defaults(data_run=run_check)
    s = sub.add_parser(
        "stats",
        help="Lengths in characters and tokens; the cutoff_len that fits",
        description=data_stats.__doc__,
    )
    s.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="Data files: Alpaca or conversations, JSON/JSONL (or dataset dirs)",
    )
    add_dataclass_args(s, StatsOptions, keep_defaults=True)
    s.set_defaults(data_run=run_stats)
    from kaika.data import convert

    v = sub.add_parser(
        "convert",
        help="Alpaca records into conversations (messages, ShareGPT) and back",
        description=convert.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument(
        "files", nargs="+", metavar="FILE", help="Data files (or dataset dirs), any mix of formats"
    )
    add_dataclass_args(v, ConvertOptions, keep_defaults=True)
    v.set_defaults(data_run=run_convert)


def _write_json(path: str | None, data: dict) -> None:
    if path:
        from kaika.atomic import write_text

        write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n", "--json")


def run_check(ns: argparse.Namespace) -> int:
    opts, cmd = options_from(CheckOptions, ns), options_from(CheckCommand, ns)
    report = check_files(ns.files, opts)
    bad = failing(report, cmd.fail_on)  # checks --fail-on before anything is written
    print_report(report, cmd.show)
    _write_json(cmd.json, report.to_json())
    if cmd.fix:
        fixes = options_from(FixOptions, ns)
        for fixed, log, n in fix_files(ns.files, cmd.out_dir, opts, fixes, cmd.overwrite):
            print(f"\nfixed: {n} field(s) changed; wrote {fixed} and the log {log}")
    if bad:
        print(f"\nFAIL: {len(bad):,} finding(s) match --fail-on {cmd.fail_on}")
        return 1
    return 0


def run_stats(ns: argparse.Namespace) -> None:
    report = data_stats(ns.files, ns.model, ns.template, ns.cutoff_len, _columns(ns.columns), ns.plot)
    print_stats(report)
    _write_json(ns.json, report.to_json())
    if ns.plot:
        print(f"\nhistogram: {ns.plot}")


def run_convert(ns: argparse.Namespace) -> None:
    from kaika.data.convert import convert_file

    r = convert_file(ns.files, ns.output, ns.to, _columns(ns.columns), ns.overwrite, ns.strict)
    print(f"wrote {r.written:,} record(s) as {ns.to} to {r.output}")
    if r.left_out:
        shown = "; ".join(r.left_out[:5]) + (" …" if len(r.left_out) > 5 else "")
        print(f"left out {len(r.left_out):,} multi-turn conversation(s) with no Alpaca form: {shown}")


def add_translate(p: argparse.ArgumentParser) -> None:
    from kaika.data.translate import TranslateArgs

    p.add_argument("input", help="Alpaca-format JSON/JSONL file to translate")
    add_dataclass_args(p, TranslateArgs)


def run_translate(ns: argparse.Namespace) -> None:
    from kaika.data.translate import TranslateArgs, print_result, translate_file

    given = {k: v for k, v in vars(ns).items() if k in TranslateArgs.__dataclass_fields__}
    print_result(translate_file(ns.input, from_dict(TranslateArgs, given, "translate options")))
