"""``kaika sweep``: train a grid of LoRA configurations on the same data and seed, then compare.

A sweep file is YAML::

    base:            # a kaika train config (sections model, data, lora, train), or a path to one
      ...
    variants:        # name → overrides of base (same sections); default: one variant, "base"
      fused: {lora: {qkv: fused}}
      q,v:   {lora: {qkv: [q, v]}}
    grid:            # dotted key → values (every combination), or a list of {dotted key: value}
      lora.r: [4, 8, 16]

Every variant runs at every grid point, in ``<output_dir>/runs/<name>`` (``output_dir`` is
``base.train.output_dir``). The results go to ``results.csv``, ``results.md`` and
``eval_loss_vs_params.png`` in ``output_dir``. A run that fails is recorded and the others go
on; a run that finished before with the same config is reused unless ``rerun`` is set, so an
interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaika.config import TrainConfig, deep_update, from_dict, load_yaml
from kaika.errors import KaikaError
from kaika.modeling.qkv import parse_slices

log = logging.getLogger(__name__)

RESULT_FILE = "sweep_result.json"  # in each run's directory, written when the run finished
SWEEP_KEYS = {"base", "variants", "grid"}


@dataclass
class SweepRun:
    name: str
    variant: str
    point: dict[str, Any]  # the grid point: dotted key → value
    config: TrainConfig


@dataclass
class RunRecord:
    name: str
    variant: str
    qkv: str
    target: str
    r: int
    alpha: int
    trainable_params: int | None = None  # entries actually trained (slice-masked zeros excluded)
    stored_params: int | None = None  # entries in the saved adapter
    eval_loss: float | None = None
    train_loss: float | None = None
    steps: int | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    tokens_per_second: float | None = None
    status: str = "ok"
    error: str = ""


def _dotted(point: dict[str, Any]) -> dict[str, Any]:
    """{"lora.r": 8} → {"lora": {"r": 8}}."""
    out: dict[str, Any] = {}
    for key, value in point.items():
        section, sep, name = str(key).partition(".")
        if not sep:
            raise KaikaError(f"grid key {key!r}: write section.field, e.g. lora.r")
        out.setdefault(section, {})[name] = value
    return out


def _grid_points(grid: Any, where: str) -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    if isinstance(grid, dict):
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise KaikaError(f"{where}: grid.{key} must be a non-empty list of values")
        keys = list(grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]
    if isinstance(grid, list) and all(isinstance(p, dict) for p in grid) and grid:
        return grid
    raise KaikaError(f"{where}: grid must map section.field to lists of values, or list such mappings")


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def run_dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "run"


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> list[SweepRun]:
    """Every run of the sweep file at ``path``, each config checked (bad keys fail here, before training).

    ``overrides`` (nested, like the command line's) apply to the base config.
    """
    path = Path(path)
    spec = load_yaml(path)
    unknown = sorted(set(spec) - SWEEP_KEYS)
    if unknown:
        raise KaikaError(f"{path}: unknown key(s) {', '.join(unknown)}; a sweep has base, variants and grid")
    base = spec.get("base") or {}
    if isinstance(base, str):  # a train config file, relative to the sweep file
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        base = load_yaml(base_path)
    if not isinstance(base, dict):
        raise KaikaError(f"{path}: base must be a train config mapping or a path to one")
    base = deep_update(base, overrides or {})
    variants = spec.get("variants") or {"base": {}}
    if not isinstance(variants, dict):
        raise KaikaError(f"{path}: variants must map names to overrides, e.g. q,v: {{lora: {{qkv: [q, v]}}}}")
    runs = []
    for variant, changes in variants.items():
        for point in _grid_points(spec.get("grid"), str(path)):
            name = "-".join([str(variant)] + [f"{k.rsplit('.', 1)[-1]}{_short(v)}" for k, v in point.items()])
            data = deep_update(deep_update(base, changes or {}), _dotted(point))
            cfg = from_dict(TrainConfig, data, where=f"{path} run {name}")
            parse_slices(cfg.lora.qkv)
            runs.append(SweepRun(name, str(variant), point, cfg))
    if len({run_dir_name(r.name) for r in runs}) != len(runs):
        raise KaikaError(f"{path}: two runs get the same name; give the variants distinct names")
    first = runs[0].config
    if not (first.data.val_data or first.data.val_set_size):
        raise KaikaError(
            f"{path}: a sweep compares eval loss, so base needs validation data "
            "(data.val_set_size or data.val_data)"
        )
    return runs


def _record(run: SweepRun) -> RunRecord:
    lora = run.config.lora
    slices = parse_slices(lora.qkv)
    return RunRecord(
        run.name,
        run.variant,
        ",".join(slices) if slices else "fused",
        ",".join(lora.target),
        lora.r,
        lora.alpha,
    )


def _train_one(run: SweepRun, out: Path) -> RunRecord:
    from kaika.modeling.qkv import held_at_zero
    from kaika.training.sft import train

    record = _record(run)
    start = time.perf_counter()
    try:
        result = train(run.config)
    except KaikaError as e:
        record.status, record.error = "failed", str(e)
    except Exception as e:  # one broken run must not take the sweep down with it
        log.debug("run %s failed", run.name, exc_info=True)
        record.status, record.error = "failed", f"{type(e).__name__}: {e}"
    else:
        stored = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
        record.stored_params = stored
        record.trainable_params = stored - held_at_zero(result.model)
        record.eval_loss = result.eval_loss
        record.train_loss = result.train_loss
        record.steps = result.global_step
        record.train_seconds = round(result.train_seconds, 2)
        record.tokens_per_second = round(result.tokens_per_second, 1)
        del result
    record.wall_seconds = round(time.perf_counter() - start, 2)
    gc.collect()
    if record.status == "ok":
        summary = {"record": dataclasses.asdict(record), "config": dataclasses.asdict(run.config)}
        (out / RESULT_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return record


def sweep(runs: list[SweepRun], output_dir: str | Path, rerun: bool = False) -> list[RunRecord]:
    """Train every run (reusing finished ones unless ``rerun``), then write the table and the plot."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, run in enumerate(runs, 1):
        out = output_dir / "runs" / run_dir_name(run.name)
        done = out / RESULT_FILE
        run.config.train.output_dir = str(out)
        run.config.train.overwrite, run.config.train.resume = True, False
        finished = json.loads(done.read_text()) if done.is_file() and not rerun else None
        # Reuse only a run trained with exactly this config (the sweep file may have changed since).
        if finished and finished.get("config") == dataclasses.asdict(run.config):
            record = RunRecord(**finished["record"])
            log.info(
                "sweep [%d/%d] %s: finished before, reused (eval loss %.4f)",
                i,
                len(runs),
                run.name,
                record.eval_loss or float("nan"),
            )
            records.append(record)
            continue
        log.info("sweep [%d/%d] %s: training in %s", i, len(runs), run.name, out)
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        record = _train_one(run, out)
        records.append(record)
        if record.status == "ok":
            log.info(
                "sweep [%d/%d] %s: eval loss %s, %s trainable parameters, %d steps, %.0f s",
                i,
                len(runs),
                run.name,
                f"{record.eval_loss:.4f}" if record.eval_loss is not None else "n/a",
                f"{record.trainable_params:,}",
                record.steps,
                record.wall_seconds,
            )
        else:
            log.warning(
                "sweep [%d/%d] %s: FAILED after %.0f s: %s",
                i,
                len(runs),
                run.name,
                record.wall_seconds,
                record.error,
            )
        write_results(records, runs, output_dir)  # a table at every point, even if interrupted later
    write_results(records, runs, output_dir)
    return records


# --------------------------------------------------------------------------- results


def write_results(records: list[RunRecord], runs: list[SweepRun], output_dir: Path) -> None:
    fields = [f.name for f in dataclasses.fields(RunRecord)]
    with (output_dir / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in records)
    (output_dir / "results.md").write_text(results_markdown(records, runs), encoding="utf-8")
    plot_results(records, output_dir / "eval_loss_vs_params.png")


def _fmt(value: Any, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def results_markdown(records: list[RunRecord], runs: list[SweepRun]) -> str:
    cfg = runs[0].config
    t = cfg.train
    budget = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"
    lrs = {run.config.train.lr for run in runs}  # a grid over lr: each run's own, not the first's
    lr = f"lr {t.lr:g}" if len(lrs) == 1 else f"lr {', '.join(f'{v:g}' for v in sorted(lrs))} (per run)"
    seeds = sorted({run.config.train.seed for run in runs})  # a grid over seeds: each run's own
    seed = f"seed {t.seed}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (per run)"
    lines = [
        "# Sweep results",
        "",
        f"Base model `{cfg.model.base_model}`; data {', '.join(f'`{d}`' for d in cfg.data.data)}; "
        f"{budget} at batch {t.batch_size}, {lr}, {seed}, cutoff {cfg.data.cutoff_len}. "
        "Trainable parameters exclude LoRA entries that a q/k/v slice mask holds at zero. "
        "Wall time includes model loading and adapter verification.",
        "",
        "| run | qkv | target | r | alpha | trainable params | eval loss | train loss | steps | train s | wall s | status |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in records:
        lines.append(
            f"| {r.name} | {r.qkv} | {r.target} | {r.r} | {r.alpha} | {_fmt(r.trainable_params, ',')} | "
            f"{_fmt(r.eval_loss, '.4f')} | {_fmt(r.train_loss, '.4f')} | {_fmt(r.steps)} | "
            f"{_fmt(r.train_seconds, '.0f')} | {_fmt(r.wall_seconds, '.0f')} | {r.status} |"
        )
    failed = [r for r in records if r.status != "ok"]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- **{r.name}**: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def plot_results(records: list[RunRecord], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no backend switched under a notebook

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    ok = [r for r in records if r.status == "ok" and r.eval_loss is not None and r.trainable_params]
    for variant in dict.fromkeys(r.variant for r in ok):
        # Runs of one size (other seeds, say) are drawn each, and the line goes through their mean.
        sizes: dict[tuple[int, int], list[float]] = {}
        for r in ok:
            if r.variant == variant:
                sizes.setdefault((r.trainable_params, r.r), []).append(r.eval_loss)
        points = sorted((x, sum(ys) / len(ys), rank) for (x, rank), ys in sizes.items())
        xs, means, _ = zip(*points, strict=True)
        (line,) = ax.plot(xs, means, "-", label=variant)
        for (x, rank), ys in sorted(sizes.items()):
            ax.plot([x] * len(ys), ys, "o", color=line.get_color(), alpha=0.8 if len(ys) == 1 else 0.5)
            ax.annotate(f"r{rank}", (x, max(ys)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable LoRA parameters")
    ax.set_ylabel("eval loss (supervised tokens)")
    ax.set_title("eval loss vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    if ok:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
