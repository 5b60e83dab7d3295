"""Resuming with a changed config: exactly what changed, and what it does to training.

The checkpoint's ``config.json`` holds the whole resolved config of the run
that wrote it (model, adapter, data, train, ...); the resuming run's is
compared with it field by field (``section.field: old -> new``). Each change
falls in one of three groups:

    bookkeeping  logging, checkpointing, evaluation batch size, activation
                 checkpointing, the output, hub and distributed sections, and
                 evaluation settings when no early stopping watches them: they
                 change no weight of any step and not where the run ends
    the split    batch_size, grad_accum_steps and the data-parallel size (the
                 ``data_parallel_size`` the trainer records): while their
                 product, the global batch, is the same, every step reads the
                 same rows and the loss the same targets (sums differ in
                 rounding, random dropout masks differ); reported apart and
                 allowed (that is how a run resumes on another number of
                 processes), else they alter training
    schedule     lr, scheduler, warmup, max_steps, epochs: harmless when the
                 learning rates of the steps already taken are the same under
                 both configs (a constant schedule run longer or shorter),
                 else they alter training
    the rest     model, adapter, data, seed, batch, optimizer settings,
                 precision, early stopping, ...: alter training

Harmless changes are reported; the resumed run then ends exactly where an
uninterrupted run of the new config would. Changes that alter training are
refused unless ``train.resume_with_changes`` is set, and then applied for
real from the resume step on (``restore_checkpoint`` keeps the configured
optimizer hyperparameters and schedule); the run matches neither config's
uninterrupted run, and the message says so. A changed ``train.optimizer`` is
always refused: the saved state belongs to another optimizer.

Only the sections the resuming run supplies are compared (a bare ``Trainer``
supplies ``train`` alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from tunekit.train.config import TrainConfig
from tunekit.train.optim import build_scheduler

_BOOKKEEPING = {
    "train.resume", "train.resume_with_changes", "train.overwrite_checkpoints", "train.log_every",
    "train.tensorboard", "train.report_to", "train.save_every", "train.keep_last", "train.eval_batch_size",
    "train.gradient_checkpointing",
}
_BOOKKEEPING_SECTIONS = {"output", "hub", "distributed"}
# Their product is the global batch; changed together with it, they alter training.
_GLOBAL_BATCH = {"train.batch_size", "train.grad_accum_steps", "data_parallel_size"}
# Evaluation settings matter only when early stopping acts on the evaluations.
_EVALUATION = {"train.eval_every", "train.early_stopping_metric", "train.early_stopping_mode"}
_SCHEDULE = {"train.lr", "train.scheduler", "train.warmup_steps", "train.warmup_ratio", "train.max_steps",
             "train.epochs"}
_NEVER_APPLIABLE = {"train.optimizer"}
_UNSET = "(unset)"


@dataclass
class ConfigChanges:
    """Changed fields (``section.field -> (old, new)``), grouped by their effect on training."""

    harmless: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    resplit: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Another split of the same global batch over micro-batches and processes."""
    altering: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _fields(config: Mapping[str, Any], sections: Any) -> dict[str, Any]:
    """``section.field -> value`` for the given top-level sections (nested values compared whole)."""
    out = {}
    for section in sections:
        value = config.get(section, _UNSET)
        if isinstance(value, Mapping):
            out.update({f"{section}.{key}": item for key, item in value.items()})
        else:
            out[section] = value
    return out


def _learning_rates(cfg: TrainConfig, steps: int, steps_per_epoch: int) -> list[float]:
    """The lr of each of the first ``steps`` optimizer steps under ``cfg``."""
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    multiplier = build_scheduler(dummy, cfg, total).lr_lambdas[0]
    return [cfg.lr * multiplier(step) for step in range(steps)]


def compare_configs(old: Mapping[str, Any], new: Mapping[str, Any], *, steps_done: int,
                    steps_per_epoch: int) -> ConfigChanges:
    """What changed from checkpoint config ``old`` to ``new`` after ``steps_done`` optimizer steps."""
    before, after = _fields(old, new.keys()), _fields(new, new.keys())
    changed = {key: (before.get(key, _UNSET), after.get(key, _UNSET)) for key in sorted(before.keys() | after.keys())
               if before.get(key, _UNSET) != after.get(key, _UNSET)}
    new_train = TrainConfig(**new["train"])
    try:
        old_train = TrainConfig(**old.get("train", {}))
    except ValidationError:  # written by another tunekit version: judge every change as altering
        old_train = None
    same_lrs = old_train is not None and (_learning_rates(old_train, steps_done, steps_per_epoch)
                                          == _learning_rates(new_train, steps_done, steps_per_epoch))
    watched = old_train is None or bool(old_train.early_stopping_patience or new_train.early_stopping_patience)
    same_global_batch = old_train is not None and global_batch(old) == global_batch(new)
    changes = ConfigChanges()
    for key, change in changed.items():
        if key in _GLOBAL_BATCH and same_global_batch:
            changes.resplit[key] = change
            continue
        harmless = (key in _BOOKKEEPING or key.split(".")[0] in _BOOKKEEPING_SECTIONS
                    or (key in _EVALUATION and not watched) or (key in _SCHEDULE and same_lrs))
        (changes.harmless if harmless else changes.altering)[key] = change
    return changes


def global_batch(config: Mapping[str, Any]) -> int:
    """Rows per optimizer step of a run config: batch_size x grad_accum_steps x data_parallel_size."""
    train = config.get("train", {})
    return (int(train.get("batch_size", 1)) * int(train.get("grad_accum_steps", 1))
            * int(config.get("data_parallel_size", 1)))


def sections_changed(old: Mapping[str, Any], new: Mapping[str, Any], sections: tuple[str, ...]) -> str:
    """``key: old -> new, ...`` of the fields of ``sections`` that differ ("" when none does)."""
    before, after = _fields(old, sections), _fields(new, sections)
    keys = [k for k in sorted(before.keys() | after.keys()) if k.split(".")[0] in new
            and before.get(k, _UNSET) != after.get(k, _UNSET)]
    return describe({k: (before.get(k, _UNSET), after.get(k, _UNSET)) for k in keys})


def _show(value: Any) -> str:
    text = value if value == _UNSET else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``key: old -> new, ...``."""
    return ", ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items())


def resume_note(saved_config: Mapping[str, Any], run_config: Mapping[str, Any], *, folder: Path, step: int,
                steps_per_epoch: int, allow_changes: bool) -> str:
    """The line to print when resuming from ``folder`` at ``step``.

    Raises:
        ValueError: the config changed in a way that alters training and ``allow_changes`` is
            false, or ``train.optimizer`` changed.
    """
    changes = compare_configs(saved_config, run_config, steps_done=step, steps_per_epoch=steps_per_epoch)
    where = f"resuming from {folder} at step {step}"
    never = {k: v for k, v in changes.altering.items() if k in _NEVER_APPLIABLE}
    if never:
        raise ValueError(f"{where} refused: {describe(never)}; the saved optimizer state belongs to the old "
                         "optimizer: revert it, or start over in a new output.dir")
    if changes.altering and not allow_changes:
        batch = ""
        if _GLOBAL_BATCH & changes.altering.keys():
            batch = (f" (the global batch batch_size x grad_accum_steps x processes goes {global_batch(saved_config)}"
                     f" -> {global_batch(run_config)}; keep it to resume on another number of processes)")
        raise ValueError(f"{where} refused: {describe(changes.altering)} would change training{batch} (the run "
                         f"would match no uninterrupted run); revert, set train.resume_with_changes=true to apply "
                         f"the new values from step {step} on, or start over in a new output.dir")
    parts = [where]
    if changes.altering:
        parts.append(f"applying from this step on (the run will match no uninterrupted run): "
                     f"{describe(changes.altering)}")
    if changes.harmless:
        parts.append(f"changed without effect on the trajectory: {describe(changes.harmless)}")
    if changes.resplit:
        parts.append(f"the same global batch of {global_batch(run_config)} rows split another way (the same rows "
                     f"per step; sums round differently, dropout masks differ): {describe(changes.resplit)}")
    return "; ".join(parts)
