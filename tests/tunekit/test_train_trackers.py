"""train.report_to: TensorBoard, W&B (offline) and MLflow (a file: tracking URI) get every logged metric
at its step and the resolved config as hyper-parameters. Oracles: each library's own readers (TensorBoard's
EventAccumulator, the files W&B writes for an offline run, MlflowClient)."""

import json

import pytest
from _tiny import tiny_llama
from _train_data import ToyLM

from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.train import TrainConfig, Trainer


@pytest.mark.slow
def test_metrics_and_config_reach_tensorboard_wandb_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store works offline; MLflow 3 asks to opt in
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(rank=2))
    cfg = TrainConfig(max_steps=4, batch_size=4, log_every=2, eval_every=2, lr=3e-4, resume="never",
                      report_to=["tensorboard", "wandb", "mlflow"])
    result = Trainer(model, ToyLM(n=8), cfg, tmp_path / "run", run_config={"data": {"max_seq_len": 16}}).fit()
    train_losses = [(h["step"], h["loss"]) for h in result.history if h["split"] == "train"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [step for step, _ in train_losses]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([loss for _, loss in train_losses])

    import mlflow

    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["train.lr"] == "0.0003" and run.data.params["data.max_seq_len"] == "16"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(step, pytest.approx(loss)) for step, loss in train_losses]

    (log_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(log_file)
    history = [(r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(step, row["train/loss"]) for step, row in history] == [(s, pytest.approx(v)) for s, v in train_losses]
    assert history[-1][1]["eval/loss"] == pytest.approx(result.final_metrics["loss"])
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    assert config["train"]["lr"] == 3e-4 and config["data"] == {"max_seq_len": 16}


def _wandb_records(path):
    """The records of an offline W&B run file, read with W&B's own protobuf schema (its log format: a
    7-byte file header, then records of checksum (4), length (2, little-endian), type (1: full,
    2-4: first/middle/last piece) in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, piece, out = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            out.append(record)
            piece = b""
    return out


def test_a_tracker_that_is_not_installed_is_refused_when_the_config_is_read(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"wandb is not installed: pip install 'tunekit\[wandb\]'"):
        TrainConfig(report_to=["wandb"])
    assert TrainConfig(tensorboard=True).trackers() == ["tensorboard"]
