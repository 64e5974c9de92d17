"""Which member of the LoRA family for Japanese? The sweep of docs/lora-variants.md, scored three ways.

    .venv/bin/python benchmarks/lora_variants.py            # ~1 hour on 2 CPU cores (bf16 native)
    .venv/bin/python benchmarks/lora_variants.py --report   # tables and plot from finished runs only

1. ``kaika sweep configs/sweeps/lora-variants-gemma-3-270m.yaml``: every variant (LoRA, rsLoRA, DoRA,
   PiSSA init, LoRA+) at two ranks and two learning rates, same data, steps and seed, held-out loss on
   ELYZA-tasks-100; one point again with another seed.
2. Each run: greedy answers to the first 10 ELYZA tasks (stop rate: the answer ended with EOS within
   128 new tokens) and JCommonsenseQA accuracy on the first 100 validation items (log-likelihood, as
   ``kaika eval choice``), the adapter only; the base model's accuracy once, for reference.
3. ``benchmarks/results/lora-variants-gemma-3-270m/results.csv`` and ``.md``, and
   ``docs/img/lora-variants.png``. Nothing here is timed: time and memory per step are
   ``benchmarks/train_throughput.py --variants kaika kaika-rslora kaika-dora kaika-pissa kaika-loraplus``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs/sweeps/lora-variants-gemma-3-270m.yaml"
RUNS = ROOT / "runs/sweep-lora-variants"
RESULTS = ROOT / "benchmarks/results/lora-variants-gemma-3-270m"
PLOT = ROOT / "docs/img/lora-variants.png"
JCQA_ITEMS, ELYZA_ANSWERS = 100, 10


def score(run: Path, base_also: bool) -> dict:
    """Stop rate and JCommonsenseQA of one run, cached in the run's eval directory."""
    import kaika

    out = {}
    choice_dir = run / "eval" / "jcqa100"
    if not (choice_dir / "summary.json").is_file():
        kaika.eval_choice(run, "jcommonsenseqa", choice_dir, limit=JCQA_ITEMS, base_also=base_also)
    out["choice"] = json.loads((choice_dir / "summary.json").read_text())
    gen_dir = run / "eval" / "elyza10"
    if not (gen_dir / "summary.json").is_file():
        kaika.evaluate(run, "elyza-tasks-100", gen_dir, limit=ELYZA_ANSWERS, base_also=False,
                       max_new_tokens=128, repetition_penalty=1.2, batch_size=10)  # fmt: skip
    out["generate"] = json.loads((gen_dir / "summary.json").read_text())
    return out


def row_of(run: Path, scored: dict) -> dict:
    record = json.loads((run / "sweep_result.json").read_text())
    rec, cfg = record["record"], record["config"]
    adapter = scored["generate"]["models"]["adapter"]
    return {
        "run": run.name,
        "variant": rec["variant"],
        "r": cfg["lora"]["r"],
        "lr": cfg["train"]["lr"],
        "seed": cfg["train"]["seed"],
        "eval_loss": rec["eval_loss"],
        "stop_rate": adapter["stop_rate"],
        "jcqa_acc": jcqa_acc(scored["choice"], "adapter"),
        "trainable_params": rec["trainable_params"],
        "train_seconds": rec["train_seconds"],
        "status": rec["status"],
    }


def jcqa_acc(summary: dict, model: str) -> float:
    return summary["models"][model]["acc"]


def write(rows: list[dict], base_acc: float | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"base gemma-3-270m: JCommonsenseQA {JCQA_ITEMS} items acc {base_acc:.3f}"
        if base_acc is not None
        else "",
        "",
        "| variant | r | lr | seed | ELYZA loss | stop rate | JCQA acc | trainable | train s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(rows, key=lambda r: (r["variant"], r["r"], r["lr"], r["seed"])):
        lines.append(
            f"| {r['variant']} | {r['r']} | {r['lr']:g} | {r['seed']} | {r['eval_loss']:.4f} | "
            f"{r['stop_rate']:.1f} | {r['jcqa_acc']:.2f} | {r['trainable_params']:,} | {r['train_seconds']:.0f} |"
        )
    lines += ["", *paired_table(rows)]
    (RESULTS / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    plot(rows, base_acc)


def correct(run: str) -> list[bool]:
    path = RUNS / "runs" / run / "eval" / "jcqa100" / "scores_adapter.jsonl"
    return [json.loads(line)["correct"] for line in path.read_text(encoding="utf-8").splitlines()]


def paired_table(rows: list[dict]) -> list[str]:
    """Each variant against plain LoRA trained at the same rank, learning rate and seed: the held-out
    loss difference, and the JCommonsenseQA difference on the same 100 items with its paired bootstrap
    95% interval (kaika.eval.choice.paired_difference)."""
    from kaika.eval.choice import paired_difference

    plain = {(r["r"], r["lr"], r["seed"]): r for r in rows if r["variant"] == "lora"}
    out = [
        "Against plain LoRA at the same r, lr and seed (Δ = variant − LoRA; JCQA: paired bootstrap 95%):",
        "",
        "| variant | r | lr | seed | Δ ELYZA loss | Δ JCQA acc (95% interval) | Δ stop rate |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(rows, key=lambda r: (r["variant"], r["r"], r["lr"], r["seed"])):
        ref = plain.get((r["r"], r["lr"], r["seed"]))
        if r["variant"] == "lora" or ref is None:
            continue
        d = paired_difference(correct(ref["run"]), correct(r["run"]))
        noise = " (within noise)" if d["within_noise"] else ""
        out.append(
            f"| {r['variant']} | {r['r']} | {r['lr']:g} | {r['seed']} | {r['eval_loss'] - ref['eval_loss']:+.4f} | "
            f"{d['delta']:+.2f} ({d['ci'][0]:+.2f} to {d['ci'][1]:+.2f}){noise} | "
            f"{r['stop_rate'] - ref['stop_rate']:+.1f} |"
        )
    seeds = sorted({r["seed"] for r in rows})
    for variant in sorted({r["variant"] for r in rows}):
        same = {r["seed"]: r for r in rows if r["variant"] == variant and (r["r"], r["lr"]) == (8, 1e-3)}
        if len(same) == len(seeds) > 1:
            a, b = (same[s] for s in seeds)
            out.append(
                f"\n{variant}, r 8, lr 1e-3: seed {seeds[1]} − seed {seeds[0]}: ELYZA loss "
                f"{b['eval_loss'] - a['eval_loss']:+.4f}, JCQA {b['jcqa_acc'] - a['jcqa_acc']:+.2f}"
            )
    return out


def plot(rows: list[dict], base_acc: float | None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 3)
    variants = sorted({r["variant"] for r in rows})
    for ax, key, label in zip(
        axes,
        ("eval_loss", "stop_rate", "jcqa_acc"),
        (
            "held-out loss (ELYZA-tasks-100)",
            "stop rate (10 ELYZA tasks)",
            f"JCommonsenseQA acc ({JCQA_ITEMS})",
        ),
        strict=True,
    ):
        for i, variant in enumerate(variants):
            mine = [r for r in rows if r["variant"] == variant and r["seed"] == 42]
            for j, r in enumerate(sorted(mine, key=lambda r: (r["r"], r["lr"]))):
                marker = "o" if r["r"] == 8 else "s"
                fill = "none" if r["lr"] < 1e-3 else None
                ax.scatter(i + 0.08 * (j - 1.5), r[key], marker=marker, facecolors=fill, color=f"C{i}")
            for r in (r for r in rows if r["variant"] == variant and r["seed"] != 42):
                ax.scatter(i + 0.3, r[key], marker="x", color=f"C{i}")
        if key == "jcqa_acc" and base_acc is not None:
            ax.axhline(base_acc, color="grey", linestyle="--", linewidth=1, label="base")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_xticks(range(len(variants)), variants, fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(
        "gemma-3-270m, 1 epoch of 175 seed tasks: ○ r 8, □ r 32; hollow lr 5e-4, filled 1e-3; × another seed",
        fontsize=9,
    )
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", action="store_true", help="only score finished runs and write the tables")
    args = parser.parse_args()
    if not args.report:
        subprocess.run([sys.executable, "-m", "kaika", "sweep", str(SWEEP)], cwd=ROOT, check=False)
    runs = sorted(p.parent for p in RUNS.glob("runs/*/sweep_result.json"))
    rows, base_acc = [], None
    for run in runs:
        if json.loads((run / "sweep_result.json").read_text())["record"]["status"] != "ok":
            continue
        scored = score(run, base_also=base_acc is None)  # the base once, with the first scored run
        if base_acc is None:
            base_acc = jcqa_acc(scored["choice"], "base")
        rows.append(row_of(run, scored))
    if rows:
        write(rows, base_acc)


if __name__ == "__main__":
    main()
