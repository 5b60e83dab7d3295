"""Optimizer and learning-rate schedule registries.

Optimizers are picked by name from ``OPTIMIZERS``; the bitsandbytes ones are
imported only when chosen. Only parameters with ``requires_grad`` are given
to the optimizer (a frozen base costs no optimizer state), split into two
groups: matrices get weight decay, 1-D tensors (biases, norm weights) do not.

Schedules are transformers' (``transformers.get_scheduler``), picked by
tunekit's name from ``SCHEDULES``: multipliers of the peak lr as a function of
the optimizer step ``s`` (0-based: the lr used by step ``s + 1``), with ``w``
warmup steps and ``T`` steps in all::

    warmup    s < w :  s / w
    linear          :  max(0, (T - s) / (T - w))
    cosine          :  max(0, 0.5 * (1 + cos(pi * (s - w) / (T - w))))
    constant        :  1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from tunekit.train.config import TrainConfig


def _param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _bnb_optim(name: str) -> Callable[..., torch.optim.Optimizer]:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as e:
        raise ImportError(f"train.optimizer needs bitsandbytes ({e}); pip install bitsandbytes or use 'adamw'") from None
    return getattr(bnb_optim, name)


def _fused_on_cpu(groups: list[dict]) -> bool:
    """Whether every parameter is a plain CPU tensor, where torch's fused AdamW runs one kernel per
    parameter instead of ~10 ops: 4x faster on LoRA's small tensors (``bench/README.md``). GPU and
    sharded (DTensor) parameters keep torch's default choice."""
    from torch.distributed.tensor import DTensor

    params = [p for g in groups for p in g["params"]]
    return all(p.device.type == "cpu" and not isinstance(p, DTensor) for p in params)


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True if _fused_on_cpu(groups) else None)


def _adamw_8bit(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return _bnb_optim("AdamW8bit")(groups, lr=cfg.lr)


def _paged_adamw_8bit(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return _bnb_optim("PagedAdamW8bit")(groups, lr=cfg.lr)


def _sgd(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr)


OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw_8bit": _adamw_8bit,
    "paged_adamw_8bit": _paged_adamw_8bit,
    "sgd": _sgd,
}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``model``'s trainable parameters.

    Raises:
        ValueError: nothing in ``model`` requires grad.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; inject_adapters() first or unfreeze some weights")
    return OPTIMIZERS[cfg.optimizer](_param_groups(params, cfg.weight_decay), cfg)


# tunekit name -> transformers.SchedulerType name ("constant" keeps its warmup, unlike transformers' own).
SCHEDULES: dict[str, str] = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant_with_warmup",
}


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``cfg.scheduler`` with warmup, for ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[cfg.scheduler], optimizer, num_warmup_steps=cfg.warmup_for(total_steps),
                         num_training_steps=total_steps)
