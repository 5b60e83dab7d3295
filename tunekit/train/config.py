"""``TrainConfig``: every knob of the training loop, validated before any work.

Embedded by the root config tree as its ``train:`` section. Choices are
registry names (``optimizer: adamw``), never import paths; each field's
attribute docstring is its help text.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TrainConfig(BaseModel):
    """How to train: steps, batches, optimiser, schedule, precision, evaluation, checkpoints, logging.

    Example:
        >>> cfg = TrainConfig(batch_size=4, grad_accum_steps=2, max_steps=10, warmup_ratio=0.1)
        >>> cfg.effective_batch_size, cfg.warmup_for(10)
        (8, 1)
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seed: int = 0
    """Seed for the data order, adapter dropout and anything else random."""

    epochs: int = Field(1, ge=1)
    """Passes over the training set (ignored when max_steps is set)."""

    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; overrides epochs (the data order restarts each epoch)."""

    batch_size: int = Field(8, gt=0)
    """Rows per micro-batch (one forward/backward)."""

    grad_accum_steps: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step (token-weighted, so N x B == N*B)."""

    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""

    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay, applied to matrices only (never to biases or norm weights)."""

    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw"
    """Optimizer by registry name; the 8-bit ones need bitsandbytes."""

    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup: linear decay to 0, cosine decay to 0, or constant."""

    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to lr."""

    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warmup as a fraction of all steps (rounded up); use it or warmup_steps, not both."""

    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value before each step; null to disable."""

    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision for forward passes; fp16 (with loss scaling) needs a CUDA GPU."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant) to save memory."""

    eval_every: int | None = Field(None, gt=0)
    """Evaluate every N optimizer steps (and always at the end when there is eval data)."""

    eval_batch_size: int | None = Field(None, gt=0)
    """Rows per evaluation batch; defaults to batch_size."""

    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations without improving early_stopping_metric; null = never."""

    early_stopping_metric: str = "loss"
    """Evaluation metric watched by early stopping: loss, perplexity, accuracy or a metric_fn key."""

    early_stopping_mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower (min) or higher (max) is better; auto = min for loss/perplexity, else max."""

    save_every: int | None = Field(None, gt=0)
    """Write a checkpoint every N optimizer steps (and at the end); null = only when interrupted."""

    keep_last: int | None = Field(3, ge=1)
    """Checkpoints kept on disk (oldest deleted first); null keeps all."""

    resume: str = "auto"
    """'auto' (latest checkpoint in output_dir, if any), 'never', or a checkpoint (or run) folder path."""

    resume_with_changes: bool = False
    """Resume even when the config changed in a way that alters training (lr, schedule, data, model, ...);
    the new values apply from the resume step on. False refuses such a resume and lists the changes."""

    overwrite_checkpoints: bool = False
    """Delete checkpoints of another run found in output_dir/checkpoints when this run starts;
    false refuses to start there (runs are never mixed in one folder)."""

    log_every: int = Field(10, gt=0)
    """Log training metrics (averaged since the last log) every N optimizer steps."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers that also get the metrics and the resolved config (as hyper-parameters), through
    each library's own client: tensorboard (output_dir/tensorboard), wandb (``pip install 'tunekit[wandb]'``;
    WANDB_PROJECT / WANDB_MODE=offline as W&B reads them), mlflow (``pip install 'tunekit[mlflow]'``;
    MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME). Empty: only metrics.jsonl."""

    tensorboard: bool = False
    """Same as ``report_to: [tensorboard]`` (kept for older configs)."""

    fused_cross_entropy: bool = False
    """Causal LM only: compute the loss with tunekit's fused linear + cross-entropy kernel."""

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, names: list[str]) -> list[str]:
        import importlib.util

        for name in names:
            if name != "tensorboard" and importlib.util.find_spec(name) is None:
                raise ValueError(f"{name} is not installed: pip install 'tunekit[{name}]' (or drop it)")
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("train.early_stopping_patience needs train.eval_every (evaluations to compare)")
        return self

    def trackers(self) -> list[str]:
        """``report_to`` with the ``tensorboard`` alias folded in, without duplicates."""
        return list(dict.fromkeys([*self.report_to, *(["tensorboard"] if self.tensorboard else [])]))

    @property
    def effective_batch_size(self) -> int:
        """Rows per optimizer step on one process."""
        return self.batch_size * self.grad_accum_steps

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of ``total_steps`` optimizer steps."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)

    def lower_is_better(self) -> bool:
        """Direction of early_stopping_metric (``auto``: loss-like names are minimised)."""
        if self.early_stopping_mode != "auto":
            return self.early_stopping_mode == "min"
        return "loss" in self.early_stopping_metric or "perplexity" in self.early_stopping_metric
