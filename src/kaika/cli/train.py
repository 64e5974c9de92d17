"""``kaika train``, ``kaika pretrain`` and ``kaika sweep``: a config from YAML + options, one library call."""

from __future__ import annotations

import argparse
import math
import sys

from kaika.cli.options import add_config_args, namespace_overrides
from kaika.config import DpoConfig, PretrainConfig, TrainConfig, resolve_config
from kaika.errors import KaikaError


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", help="YAML config (sections model, data, lora, train); options override it"
    )
    add_config_args(p, TrainConfig)


def run_train(ns: argparse.Namespace) -> None:
    from kaika.api import train
    from kaika.training.trainer import is_main_process

    result = train(resolve_config(TrainConfig, ns.config, namespace_overrides(ns)))
    if not is_main_process():  # rank 0 saved the adapter and reports it
        return
    eval_part = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    # nan: a resume with nothing left to train, whose checkpoint logged no loss
    loss_part = f", train loss {result.train_loss:.4f}" if math.isfinite(result.train_loss) else ""
    print(
        f"adapter saved to {result.output_dir} — {result.global_step} steps{loss_part}{eval_part}, "
        f"{result.train_seconds:.0f} s, {result.tokens_per_second:.0f} tokens/s"
    )


def add_dpo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", help="YAML config (sections model, data, lora, train, dpo); options override it"
    )
    p.epilog = (
        "Typical: kaika train … --output-dir runs/sft, then kaika dpo --from runs/sft --data pairs.jsonl "
        "--output-dir runs/dpo, then kaika eval compare runs/sft runs/dpo. Without --from a fresh adapter "
        "trains on --base-model. Options of the lora section apply to a fresh adapter only."
    )
    add_config_args(p, DpoConfig)
    sub = p.add_subparsers(dest="dpo_command", metavar="pairs", required=False)
    pairs = sub.add_parser(
        "pairs",
        help="Make preference pairs from a run's own sampled answers, scored by metrics or a judge",
        description="Sample several answers per task from a run, score them (metrics against the task's "
        "reference answer, or an LLM judge), and write the best as chosen, the worst as rejected: a "
        "JSONL file that kaika dpo --data reads.",
    )
    add_pairs_args(pairs)


def add_pairs_args(p: argparse.ArgumentParser) -> None:
    from kaika.cli.eval import add_judge_args
    from kaika.cli.options import add_dataclass_args, add_inference_args
    from kaika.config import GenerateArgs, PairsOptions

    p.add_argument(
        "run_dir", metavar="RUN", help="The run (or model) whose answers are compared, e.g. runs/sft"
    )
    add_dataclass_args(p, PairsOptions, keep_defaults=True)
    add_inference_args(p)
    # Sampling, not greedy: several draws of the same greedy answer compare nothing.
    sampling = GenerateArgs(temperature=0.8, top_p=0.95)
    add_dataclass_args(p, GenerateArgs, "generate", defaults=sampling)
    p.set_defaults(**{"generate.temperature": sampling.temperature, "generate.top_p": sampling.top_p})
    add_judge_args(p)


def run_pairs(ns: argparse.Namespace) -> None:
    from kaika.cli.eval import judge_settings
    from kaika.cli.options import generate_args
    from kaika.eval.pairs import make_pairs

    judge = judge_settings(ns)
    report = make_pairs(
        ns.run_dir,
        ns.tasks,
        ns.output,
        generate_args(ns),
        samples=ns.samples,
        scorer=ns.score,
        chosen=ns.chosen,
        judge=judge,
        limit=ns.limit,
        base_model=ns.base_model,
        dtype=ns.dtype,
    )
    print(report.summary())


def run_dpo(ns: argparse.Namespace) -> None:
    from kaika.api import dpo
    from kaika.training.trainer import is_main_process

    if getattr(ns, "dpo_command", None) == "pairs":
        return run_pairs(ns)
    result = dpo(resolve_config(DpoConfig, ns.config, namespace_overrides(ns)))
    if not is_main_process():
        return
    parts = [f"{result.global_step} steps"]
    if math.isfinite(result.train_loss):
        parts.append(f"train loss {result.train_loss:.4f}")
    if result.reward_accuracy is not None:
        parts.append(f"reward accuracy {result.reward_accuracy:.3f}, margin {result.reward_margin:.3f}")
    if result.kl is not None:
        parts.append(f"KL {result.kl:.3f}")
    if result.eval_loss is not None:
        parts.append(f"eval loss {result.eval_loss:.4f}")
    print(f"adapter saved to {result.output_dir} — {', '.join(parts)}, {result.train_seconds:.0f} s")


def add_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", help="YAML config (sections model, pretrain, lora, train); options override it"
    )
    add_config_args(p, PretrainConfig)


def run_pretrain(ns: argparse.Namespace) -> None:
    from kaika.api import pretrain
    from kaika.training.trainer import is_main_process

    result = pretrain(resolve_config(PretrainConfig, ns.config, namespace_overrides(ns)))
    if not is_main_process():  # rank 0 saved the model and reports it
        return
    held = result.heldout
    held_part = f", held-out loss {held['loss']:.4f} (perplexity {held['perplexity']:.2f})" if held else ""
    print(
        f"saved to {result.output_dir} — {result.global_step} steps, {result.tokens_seen} tokens, "
        f"train loss {result.train_loss:.4f}{held_part}, {result.train_seconds:.0f} s"
    )


def add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        help="Sweep YAML: base (a train config or a path to one), variants (name → overrides) and "
        "grid (section.field → values), e.g. configs/sweeps/qkv-tiny-bloom-ja.yaml",
    )
    p.add_argument(
        "--rerun", action="store_true", help="Train every run again, even those a previous sweep finished"
    )
    p.epilog = (
        "Train options below override the sweep's base config; --output-dir is the sweep's directory "
        "(runs go to OUTPUT_DIR/runs/NAME, results to OUTPUT_DIR/results.{md,csv} and a plot)."
    )
    add_config_args(p, TrainConfig)


def run_sweep(ns: argparse.Namespace) -> None:
    from kaika.training.sweep import load_sweep, sweep

    runs = load_sweep(ns.config, namespace_overrides(ns))
    output_dir = runs[0].config.train.output_dir
    records = sweep(runs, output_dir, rerun=ns.rerun)
    failed = [r.name for r in records if r.status != "ok"]
    print(
        f"sweep: {len(records) - len(failed)} of {len(records)} runs done; results in {output_dir}/results.md"
    )
    if len(failed) == len(records):
        raise KaikaError(f"every run failed ({', '.join(failed)}); see {output_dir}/results.md")
    if failed:
        print(f"sweep: failed runs: {', '.join(failed)} (errors in results.md)", file=sys.stderr)
