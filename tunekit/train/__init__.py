"""tunekit.train: the training loop (optimisers, schedules, accumulation, mixed precision,
gradient checkpointing, evaluation, early stopping, atomic checkpoints, exact resume, logging).

Example:
    >>> from tunekit.train import TrainConfig
    >>> TrainConfig(lr=1e-4, max_steps=100, scheduler="cosine", warmup_ratio=0.05).warmup_for(100)
    5
"""

from tunekit.train.checkpoint import list_checkpoints, read_checkpoint, resolve_resume
from tunekit.train.config import TrainConfig
from tunekit.train.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from tunekit.train.signals import StopOnSignal
from tunekit.train.trainer import Trainer, TrainResult

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "StopOnSignal",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "list_checkpoints",
    "read_checkpoint",
    "resolve_resume",
]
