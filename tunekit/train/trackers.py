"""Experiment trackers of ``train.report_to``, each through its library's own client.

=============  ==========================================  ==========================================
tracker        where                                       the resolved config
=============  ==========================================  ==========================================
tensorboard    ``output_dir/tensorboard`` (SummaryWriter)  hparams (flattened) + the YAML as text
wandb          ``wandb.init(dir=output_dir)``: W&B reads   ``wandb.init(config=...)``
               WANDB_PROJECT, WANDB_MODE (``offline``
               runs without a network), WANDB_API_KEY
mlflow         ``mlflow.start_run``: MLflow reads           ``mlflow.log_params`` (flattened)
               MLFLOW_TRACKING_URI (a ``file:`` URI or a
               server), MLFLOW_EXPERIMENT_NAME
=============  ==========================================  ==========================================

Metrics go as ``<split>/<name>`` at the optimizer step. wandb and mlflow are
optional extras (``pip install 'tunekit[wandb]'`` / ``'tunekit[mlflow]'``);
``train.report_to`` refuses one that is not installed when the config is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["TRACKERS", "flatten", "open_trackers"]

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker name -> the Python package it needs."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists and None become strings."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class _TensorBoard:
    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")
        # run_name "." keeps the hparams in this run's folder (torch adds a sub-run otherwise)
        self.writer.add_hparams(flatten(config), {}, run_name=".")

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunekit"), name=run_name,
                              dir=str(output_dir), config=config, reinit="finish_previous")

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        self.run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        params = {k: (str(v)[:500]) for k, v in flatten(config).items()}
        mlflow.log_params(params)

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_CLASSES = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


def open_trackers(names: list[str], output_dir: Path, config: dict[str, Any], start_step: int = 0) -> list:
    """One open tracker per name (``log(split, step, metrics)``, ``close()``)."""
    run_name = output_dir.resolve().name
    return [_CLASSES[name](output_dir, config, run_name) for name in names]
