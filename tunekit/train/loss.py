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

A causal LM's loss runs its output head on the target positions only
(``tunekit.models.heads``): prompts and padding get no logits, in training and
in evaluation. ``evaluation_loss`` is the one function evaluation calls; it asks
the model for its full logits only when something reads them (seq_cls accuracy,
a ``metric_fn``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tunekit.adapters.hf.tasks import IGNORE_INDEX, TASKS
from tunekit.kernels.cross_entropy import cross_entropy_mean
from tunekit.models.heads import supports_target_head, target_positions

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


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
    """Real (non-padding) input tokens in ``batch``.

    Padded rows: the attention mask's ones. Packed rows (``position_ids``, no mask): every
    position but each row's padded tail, the last position-id run of a row when none of its
    labels is a target (a packed example always has one; see ``tunekit.data.packing``).
    Call it on the host batch to avoid a device sync.
    """
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids, positions, labels = batch["input_ids"], batch.get("position_ids"), batch.get("labels")
    if positions is None or labels is None or labels.shape != ids.shape:
        return ids.numel()
    positions = positions.expand_as(ids)
    run = torch.ones_like(positions, dtype=torch.long)
    run[:, 1:] = (positions[:, 1:] != positions[:, :-1] + 1).long()
    run = run.cumsum(-1)  # (B, T) index of the position-id run of every token
    last = run == run[:, -1:]
    tail = last & ~((labels != IGNORE_INDEX) & last).any(-1, keepdim=True)
    return ids.numel() - int(tail.sum())


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], forward_kwargs: dict | None = None
                   ) -> torch.Tensor:
    """``model(**batch).loss`` of a causal LM, with the head and cross-entropy on target positions only.

    Equal to transformers' loss (mean over ``labels[:, 1:] != -100``, fp32 logits) up to rounding;
    every gathered row is a target, so the cross-entropy is the one-pass-backward ``cross_entropy_mean``.
    """
    picked = target_positions(model, batch, forward_kwargs)
    return cross_entropy_mean(picked.logits.float(), picked.targets)


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor], forward_kwargs: dict,
               task: str | None = None) -> torch.Tensor:
    """The mean loss of ``batch``: for ``task="causal_lm"`` (and a model with a body and a head, every
    ``*ForCausalLM``) via ``causal_lm_loss``, otherwise the model's own (transformers computes it
    from ``labels``)."""
    if task == "causal_lm" and supports_target_head(model):
        return causal_lm_loss(model, batch, forward_kwargs)
    loss = model(**batch, **forward_kwargs).loss
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss: is it a model with a task head?")
    return loss


def evaluation_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str, forward_kwargs: dict | None = None,
                    *, need_logits: bool = False, fused_loss: LossFn | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mean loss of one evaluation batch and, when something reads them, the model's logits.

    Args:
        model: the (possibly wrapped) model, in eval mode, under ``torch.no_grad``.
        batch: a collated batch with ``labels``.
        task: ``causal_lm``, ``seq_cls`` or ``seq2seq``.
        forward_kwargs: extra forward arguments (``DataBundle.forward_kwargs``).
        need_logits: a ``metric_fn`` reads the logits (seq_cls always gets them, for accuracy).
        fused_loss: ``fn(model, batch)`` of ``train.fused_cross_entropy``, for LM losses without logits.

    Returns:
        (loss, logits): logits are fp32, (B, C) for seq_cls or the model's (B, T, V), only when
        needed; an LM loss without them runs the head on target positions only (or fused).
    """
    forward_kwargs = forward_kwargs or {}
    need_logits = need_logits or task == "seq_cls"
    if not need_logits and task == "causal_lm":
        loss = fused_loss(model, batch) if fused_loss is not None else model_loss(model, batch, forward_kwargs, task)
        return loss, None
    out = model(**batch, **forward_kwargs)
    return out.loss, out.logits.float() if need_logits else None


def fused_loss_fn(task: str) -> LossFn:
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
    """Accumulates target-weighted loss, accuracy (seq_cls) and ``metric_fn`` results over eval batches.

    Sums stay tensors on the batches' device (no host read per batch); ``result`` reads them
    once, after ``reduce`` (e.g. a strategy's ``all_reduce_sums``) summed them over processes.
    """

    def __init__(self, task: str, metric_fn: Callable | None = None) -> None:
        self.task, self.metric_fn = task, metric_fn
        self.sums: dict[str, torch.Tensor | float] = {"loss_sum": 0.0, "targets": 0.0, "rows": 0.0, "correct": 0.0}
        self.extra_keys: list[str] = []

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "seq_cls":
            return torch.tensor(float(labels.shape[0]), device=labels.device)
        if self.task == "causal_lm":
            labels = labels[..., 1:]
        return (labels != IGNORE_INDEX).sum().double()

    def add(self, batch: dict[str, torch.Tensor], loss: torch.Tensor, logits: torch.Tensor | None,
            counts: bool = True) -> None:
        """Add one batch: its mean ``loss`` and ``logits`` ((B, C) for seq_cls; needed for seq_cls and
        ``metric_fn`` only, None otherwise). ``counts=False`` adds nothing but the metric names (a
        placeholder batch that ran only to keep the processes in step)."""
        weight = 1.0 if counts else 0.0
        labels, rows = batch["labels"], batch["labels"].shape[0] * weight
        n = self._targets(labels) * weight
        # An all-masked batch has a NaN (0/0) mean loss: it adds nothing (where() drops the NaN).
        self.sums["loss_sum"] = self.sums["loss_sum"] + torch.where(n > 0, loss.detach().double() * n, 0.0)
        self.sums["targets"] = self.sums["targets"] + n
        self.sums["rows"] += rows
        if self.task == "seq_cls":
            self.sums["correct"] = self.sums["correct"] + (logits.argmax(-1) == labels).sum().double() * weight
        if self.metric_fn is not None:
            for key, value in self.metric_fn(logits, batch).items():
                if key not in self.extra_keys:
                    self.extra_keys.append(key)
                self.sums[f"extra.{key}"] = self.sums.get(f"extra.{key}", 0.0) + float(value) * rows

    def result(self, reduce: Callable[[dict], dict[str, float]] | None = None) -> dict[str, float]:
        """loss, and perplexity (LM tasks) or accuracy (seq_cls), plus metric_fn keys (row-weighted).

        ``reduce(sums) -> sums`` combines the sums of several processes (one call); without it
        they are this process's.
        """
        sums = reduce(self.sums) if reduce is not None else {k: float(v) for k, v in self.sums.items()}
        loss = sums["loss_sum"] / max(1.0, sums["targets"])
        out = {"loss": loss}
        if self.task == "seq_cls":
            out["accuracy"] = sums["correct"] / max(1.0, sums["rows"])
        else:
            out["perplexity"] = math.exp(min(loss, 700.0))  # exp overflows a float past ~709
        out.update({k: sums[f"extra.{k}"] / max(1.0, sums["rows"]) for k in self.extra_keys})
        return out
