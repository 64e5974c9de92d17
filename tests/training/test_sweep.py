"""``kaika sweep``: a grid of runs on the same data, a table, a plot; a failing run is recorded."""

from __future__ import annotations

import csv
import json
from itertools import product
from pathlib import Path

import pytest
import yaml

from helpers import build_model, seed_records, write_jsonl
from kaika.cli import main
from kaika.errors import KaikaError
from kaika.training.sweep import load_sweep, run_dir_name

SWEEPS = sorted((Path(__file__).resolve().parents[2] / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_loads(path):
    # Each shipped sweep builds a valid config for every variant at every grid point, and each
    # grid value reaches the run's config (the file is read independently of load_sweep here).
    spec = yaml.safe_load(path.read_text())
    grid = spec["grid"]
    points = (
        grid
        if isinstance(grid, list)
        else [dict(zip(grid, vals, strict=True)) for vals in product(*grid.values())]
    )
    runs = load_sweep(path)
    assert len(runs) == len(spec["variants"]) * len(points)
    assert {r.variant for r in runs} == set(spec["variants"])
    for run in runs:
        for key, value in run.point.items():
            section, field = key.split(".")
            assert getattr(getattr(run.config, section), field) == value
    assert len({run.name for run in runs}) == len(runs)


def write_sweep(tmp_path, base_dir: Path) -> Path:
    spec = {
        "base": {
            "model": {"base_model": str(base_dir)},
            "data": {
                "data": [str(write_jsonl(tmp_path / "train.jsonl", seed_records(10, max_chars=100)))],
                "val_set_size": 2,
                "cutoff_len": 64,
            },
            "lora": {"alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-2, "verify": False},
        },
        "variants": {
            "fused": {},
            "q,v": {"lora": {"qkv": ["q", "v"]}},
            "broken": {"lora": {"qkv": "q,v", "target": ["dense"]}},  # fails when its model is built
        },
        "grid": {"lora.r": [2, 4]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_sweep_table_plot_failures_and_reuse(tmp_path, ja_tokenizer, capsys):
    base = build_model("bloom", ja_tokenizer, tmp_path / "base")  # 2 layers, hidden 64
    path = write_sweep(tmp_path, base)
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--output-dir", str(out)]) == 0
    assert "4 of 6 runs done" in capsys.readouterr().out

    rows = {r["name"]: r for r in csv.DictReader((out / "results.csv").open(encoding="utf-8"))}
    assert list(rows) == ["fused-r2", "fused-r4", "q,v-r2", "q,v-r4", "broken-r2", "broken-r4"]
    for r in (2, 4):
        # Per layer: fused A (r × 64) + B (192 × r); q,v A (2r × 64) + B's q and v blocks (2 × 64 × r).
        assert int(rows[f"fused-r{r}"]["trainable_params"]) == 2 * (r * 64 + 192 * r)
        assert int(rows[f"q,v-r{r}"]["trainable_params"]) == 2 * (2 * r * 64 + 2 * 64 * r)
        assert int(rows[f"q,v-r{r}"]["stored_params"]) == 2 * (2 * r * 64 + 192 * 2 * r)
        assert rows[f"broken-r{r}"]["status"] == "failed"
        assert "not among the LoRA targets" in rows[f"broken-r{r}"]["error"]
    for name in ("fused-r2", "fused-r4", "q,v-r2", "q,v-r4"):
        row = rows[name]
        assert row["status"] == "ok" and row["steps"] == "2" and float(row["eval_loss"]) > 0
        assert float(row["wall_seconds"]) >= float(row["train_seconds"]) > 0
        assert (out / "runs" / run_dir_name(name) / "adapter_model.safetensors").is_file()
    table = (out / "results.md").read_text(encoding="utf-8")
    assert table.count("| ok |") == 4 and "**broken-r2**" in table
    assert (out / "eval_loss_vs_params.png").stat().st_size > 10_000

    # A second call reuses the finished runs (no retraining) and retries the failed ones.
    adapter = out / "runs" / "q_v-r4" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns
    assert main(["sweep", str(path), "--output-dir", str(out)]) == 0
    assert adapter.stat().st_mtime_ns == mtime
    again = {r["name"]: r for r in csv.DictReader((out / "results.csv").open(encoding="utf-8"))}
    assert again["q,v-r4"]["eval_loss"] == rows["q,v-r4"]["eval_loss"]
    # A run whose recorded config differs from the sweep's is trained again, not reused.
    summary_path = out / "runs" / "q_v-r4" / "sweep_result.json"
    summary = json.loads(summary_path.read_text())
    summary["config"]["train"]["lr"] = 0.5
    summary_path.write_text(json.dumps(summary))
    assert main(["sweep", str(path), "--output-dir", str(out)]) == 0
    assert adapter.stat().st_mtime_ns != mtime
    assert json.loads(summary_path.read_text())["config"]["train"]["lr"] == 1e-2


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in (
        ("base: {}\nvariant: {}\n", "unknown key"),
        ("base: {data: {data: [x.jsonl]}}\n", "needs validation data"),
        ("base: {data: {val_set_size: 2}}\nvariants: {a: {lora: {qkv: [q, x]}}}\n", "unknown slice"),
        ("base: {data: {val_set_size: 2}}\ngrid: {r: [1, 2]}\n", "section.field"),
        ("base: {data: {val_set_size: 2}}\nvariants: {a: {lora: {rank: 2}}}\n", "unknown key"),
    ):
        bad.write_text(text)
        with pytest.raises(KaikaError, match=message):
            load_sweep(bad)
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
