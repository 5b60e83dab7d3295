"""Loss weighting and evaluation metrics, per task.

Gradient accumulation must give the gradient of ONE loss over all the
micro-batches of a step: the token-weighted mean. A model's ``.loss`` is
the mean over the targets of its own micro-batch, so micro-batch ``i`` with
``n_i`` targets contributes ``loss_i * n_i / sum(n)``; then N micro-batches
of B rows equal one batch of N*B rows exactly, whatever the padding. What
counts as a target is the task's:

    causal_lm   labels[:, 1:] != -100   (transformers shifts labels by one)
    seq2seq     labels != -100
    seq_cls     one per row
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from tunekit.adapters.hf.tasks import IGNORE_INDEX, TASKS


def target_count(batch: dict[str, torch.Tensor], task: str) -> int:
    """Number of loss targets in ``batch`` (labels: (B, T) for LM tasks, (B,) for seq_cls)."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("training batches need 'labels'; the data collate function must produce them")
    if task == "seq_cls":
        return labels.shape[0]
    if task == "causal_lm":
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens in ``batch`` (non-padding when there is an attention mask)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor], forward_kwargs: dict) -> torch.Tensor:
    """The model's own mean loss on ``batch`` (transformers computes it from ``labels``)."""
    loss = model(**batch, **forward_kwargs).loss
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss: is it a model with a task head?")
    return loss


def fused_loss_fn(task: str) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """``tunekit.models.kernels.fused_causal_lm_loss``, imported now so a missing kernel fails before training."""
    if task != "causal_lm":
        raise ValueError(f"train.fused_cross_entropy is for causal_lm data, this data's task is {task!r}; set it to false")
    try:
        from tunekit.models.kernels import fused_causal_lm_loss
    except ImportError as e:
        raise ImportError(
            f"train.fused_cross_entropy needs tunekit.models.kernels.fused_causal_lm_loss, unavailable here ({e}); "
            "set train.fused_cross_entropy=false"
        ) from None
    return fused_causal_lm_loss


class EvalMeter:
    """Accumulates target-weighted loss, accuracy (seq_cls) and ``metric_fn`` results over eval batches."""

    def __init__(self, task: str, metric_fn: Callable | None = None) -> None:
        self.task, self.metric_fn = task, metric_fn
        self.loss_sum, self.targets, self.rows, self.correct = 0.0, 0, 0, 0
        self.extra: dict[str, float] = {}

    def add(self, batch: dict[str, torch.Tensor], loss: torch.Tensor, logits: torch.Tensor | None) -> None:
        """Add one batch: its mean ``loss`` and ``logits`` ((B, C) for seq_cls; needed for seq_cls and
        ``metric_fn`` only, None otherwise)."""
        n, rows = target_count(batch, self.task), batch["labels"].shape[0]
        if n:
            self.loss_sum += float(loss) * n
        self.targets += n
        self.rows += rows
        if self.task == "seq_cls":
            self.correct += int((logits.argmax(-1) == batch["labels"]).sum())
        if self.metric_fn is not None:
            for key, value in self.metric_fn(logits, batch).items():
                self.extra[key] = self.extra.get(key, 0.0) + float(value) * rows

    def result(self) -> dict[str, float]:
        """loss, and perplexity (LM tasks) or accuracy (seq_cls), plus metric_fn keys (row-weighted)."""
        loss = self.loss_sum / max(1, self.targets)
        out = {"loss": loss}
        if self.task == "seq_cls":
            out["accuracy"] = self.correct / max(1, self.rows)
        else:
            out["perplexity"] = math.exp(min(loss, 700.0))  # exp overflows a float past ~709
        out.update({k: v / max(1, self.rows) for k, v in self.extra.items()})
        return out
