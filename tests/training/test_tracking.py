"""--report-to: the Trainer's trackers get what trainer_log.jsonl gets (loss, eval loss, lr, tokens/s),
read back here through each tracker's own reader: TensorBoard's event files, an offline W&B run,
an MLflow file store."""

from __future__ import annotations

import json

import pytest

from helpers import seed_records, write_jsonl
from kaika.config import TrainConfig
from kaika.errors import KaikaError
from kaika.training.sft import train


def tiny_run(tmp_path, report_to: str) -> tuple[TrainConfig, list[dict]]:
    cfg = TrainConfig()
    cfg.model.base_model, cfg.model.dtype = "tiny-bloom-ja", "float32"
    cfg.data.data = [str(write_jsonl(tmp_path / "train.jsonl", seed_records(24, max_chars=120)))]
    cfg.data.cutoff_len, cfg.data.val_set_size = 64, 4
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.max_steps = 4, 4, 4
    # eval at step 3 and at the last step, 4 (inside training: trackers close their run at train end)
    cfg.train.logging_steps, cfg.train.eval_steps, cfg.train.report_to = 1, 3, report_to
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    return cfg, log


def steps(log: list[dict], key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in log if key in row}


def test_tensorboard_event_files_hold_the_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, log = tiny_run(tmp_path, "tensorboard")
    runs = list((tmp_path / "run" / "tensorboard").iterdir())
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert runs and {"train/loss", "train/learning_rate", "train/tokens_per_s", "eval/loss"} <= set(
        events.Tags()["scalars"]
    )
    for tag, key in (
        ("train/loss", "loss"),
        ("eval/loss", "eval_loss"),
        ("train/tokens_per_s", "tokens_per_s"),
    ):
        board = {e.step: e.value for e in events.Scalars(tag)}
        assert board == pytest.approx(steps(log, key), rel=1e-6), tag
    assert len(steps(log, "loss")) == 4 and all(v > 0 for v in steps(log, "tokens_per_s").values())


def test_wandb_offline_run_holds_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, log = tiny_run(tmp_path, "wandb")
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # The offline run's record file (what `wandb sync` uploads): protobuf history items, each a key
    # and its value as JSON text. wandb ships no Python reader of it any more, so the test looks for
    # the keys, and for each logged value as JSON text (the same float, the same repr).
    data = record.read_bytes()
    for key in (b"train/loss", b"eval/loss", b"train/learning_rate", b"train/tokens_per_s"):
        assert key in data, key
    for key in ("loss", "eval_loss", "tokens_per_s"):
        for value in steps(log, key).values():
            assert json.dumps(value).encode() in data, (key, value)


def test_mlflow_file_store_holds_the_log(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(
        "MLFLOW_ALLOW_FILE_STORE", "true"
    )  # MLflow 3 prefers a database; a folder suffices here
    _, log = tiny_run(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "run"
    for metric, key in (("loss", "loss"), ("eval_loss", "eval_loss"), ("tokens_per_s", "tokens_per_s")):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
        assert history == pytest.approx(steps(log, key), rel=1e-6), metric
    assert client.get_metric_history(run.info.run_id, "learning_rate")


def test_a_tracker_that_is_not_installed_is_refused_first(tmp_path, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a)
    )
    with pytest.raises(
        KaikaError, match=r"--report-to wandb needs the wandb package: pip install 'kaika\[wandb\]'"
    ):
        tiny_run(tmp_path, "wandb")
    assert not (tmp_path / "run").exists()
