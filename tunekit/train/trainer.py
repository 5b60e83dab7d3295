"""``Trainer``: one training loop for every adapter method, task and precision.

Per optimizer step::

    order  = data.train_order(epoch, seed)          deterministic, so resume is exact
    window = next grad_accum_steps micro-batches    of batch_size rows each
    for each micro-batch i (no gradient sync but on the last):
        loss_i = model(**batch_i).loss              under accelerate's autocast
        backward(loss_i * n_i / sum(n))             token-weighted mean (see loss.py)
    clip grad norm -> optimizer.step -> scheduler.step -> zero_grad
    log / evaluate / early-stop / checkpoint        as configured

accelerate provides autocast, fp16 loss scaling and gradient unscaling for
clipping; it does not wrap or shard the model. Distribution strategies come
in through ``wrap_model``, called before the optimizer is built. Its
accumulation helper is not used either: it divides every micro-batch loss by
N (a mean of means, wrong when micro-batches hold different numbers of
targets) and cannot see the short last window of an epoch.

Everything that can refuse a run (the resume checkpoint, another run's
checkpoints in the folder, a changed config, an external multi-process
launch) is checked when the ``Trainer`` is built, before ``fit`` writes
anything.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunekit.train.checkpoint import (
    SavedCheckpoint,
    foreign_checkpoints_message,
    new_run_id,
    other_runs_checkpoints,
    read_checkpoint,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from tunekit.train.config import TrainConfig
from tunekit.train.logging import EvalProgress, RunLogger
from tunekit.train.loss import TASKS, EvalMeter, batch_tokens, fused_loss_fn, model_loss, target_count
from tunekit.train.optim import build_optimizer, build_scheduler
from tunekit.train.resume import resume_note
from tunekit.train.runtime import external_launch_problem, make_accelerator, peak_memory_mib
from tunekit.train.signals import StopOnSignal

# Printed once the SIGINT/SIGTERM handlers are installed (scripts wait for it before signalling).
READY_MESSAGE = "training: Ctrl-C or SIGTERM finishes the step, saves a checkpoint and stops"


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint's ``progress.json``."""

    run_id: str = ""
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_metrics: dict[str, float] | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    restored_best: bool = False  # the weights are the best evaluation's (early stopping, end of run)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns. Metrics dicts are ``Trainer.evaluate`` outputs."""

    global_step: int
    epochs_completed: float
    final_metrics: dict[str, float] | None
    best_metrics: dict[str, float] | None
    best_step: int | None
    history: list[dict[str, Any]]
    output_dir: Path
    metrics_file: Path
    checkpoint_dir: Path | None
    tokens_per_second: float
    """Training throughput: tokens of the training steps / ``train_seconds``."""
    train_seconds: float
    """Time spent in training steps (evaluation and checkpoint writes excluded)."""
    peak_memory_mib: float
    stopped_early: bool = False
    interrupted: bool = False

    def summary(self) -> str:
        """A few human-readable lines."""
        # The final metrics are not repeated: the last eval line (or the restore message) showed them.
        lines = [
            f"steps {self.global_step} ({self.epochs_completed:.2f} epochs), {self.train_seconds:.1f} s in training "
            f"steps, {self.tokens_per_second:.0f} tokens/s, peak memory {self.peak_memory_mib:.0f} MiB",
        ]
        if self.stopped_early:
            lines.append(f"stopped early (best at step {self.best_step})")
        if self.interrupted:
            lines.append(f"interrupted: resume from {self.checkpoint_dir}")
        return "\n".join(lines)


class Trainer:
    """Trains ``model`` on ``data`` as ``cfg`` says; checkpoints and logs under ``output_dir``.

    Args:
        model: a Hugging Face model (adapters injected, base frozen) whose forward takes the
            collated batch and returns ``.loss`` and ``.logits``.
        data: a DataBundle (duck-typed): ``train`` and ``eval`` (sized sequences of rows, eval may be
            None), ``collate(rows) -> dict[str, Tensor]``, ``train_order(epoch, seed) -> list[int]``,
            ``task`` ("causal_lm" | "seq_cls" | "seq2seq").
        cfg: the training config.
        output_dir: run folder: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``.
        wrap_model: ``wrap(model) -> model`` for a distribution strategy, called before the
            optimizer is built (so it sees the wrapped parameters). Without one, a process started
            by a multi-process launcher is refused.
        metric_fn: ``fn(logits, batch) -> {name: per-row mean}`` for extra eval metrics.
        run_config: the run's whole resolved config (JSON-able sections: model, adapter, data, ...),
            saved in every checkpoint and compared on resume; its ``train`` section is ``cfg``.

    Raises:
        ValueError: the run cannot start (bad data, a damaged or incompatible resume checkpoint,
            another run's checkpoints in ``output_dir``, a changed config, a multi-process launch).
    """

    # The clock that times training steps (a test replaces it).
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(
        self, model: nn.Module, data: Any, cfg: TrainConfig, output_dir: str | Path, *,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        metric_fn: Callable[[torch.Tensor, dict], dict[str, float]] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        if wrap_model is None and (problem := external_launch_problem()):
            raise ValueError(problem)
        if getattr(data, "task", None) not in TASKS:
            raise ValueError(f"data.task is {getattr(data, 'task', None)!r}; the trainer supports {list(TASKS)}")
        if len(data.train) == 0:
            raise ValueError("the training set is empty; check the data section of the config")
        self.model, self.data, self.cfg, self.metric_fn = model, data, cfg, metric_fn
        self.output_dir = Path(output_dir)
        self.accelerator = make_accelerator(cfg.mixed_precision)
        self._fused_loss = fused_loss_fn(data.task) if cfg.fused_cross_entropy else None
        # Extra forward arguments the data needs (use_cache=False: packed rows get their
        # block-diagonal mask only without a cache).
        self._forward_kwargs = dict(getattr(data, "forward_kwargs", None) or {})
        self._setup_model(wrap_model)
        micro_batches = math.ceil(len(data.train) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        optimizer = build_optimizer(self.wrapped, cfg)
        self.scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self._pending: list[dict[str, float]] = []  # step metrics since the last train log line
        self._last_save: Path | None = None
        # With early stopping, the trainable weights of the best evaluation (adapters are small),
        # restored when training stops, as transformers' load_best_model_at_end does.
        self._best_weights: dict[str, torch.Tensor] | None = None
        self.run_config = {**(run_config or {}), "train": cfg.model_dump(mode="json")}
        self._resume, self._resume_note, self._foreign = self._plan_start()

    def _plan_start(self) -> tuple[SavedCheckpoint | None, str | None, list[Path]]:
        """The checkpoint to resume (read in full), the line announcing it, and other runs' checkpoints
        to delete at the start; raises if the run cannot start here."""
        folder = resolve_resume(self.cfg.resume, self.output_dir)
        saved = read_checkpoint(folder) if folder is not None else None
        foreign = other_runs_checkpoints(self.output_dir, saved.run_id if saved else None)
        if foreign and not self.cfg.overwrite_checkpoints:
            raise ValueError(foreign_checkpoints_message(self.output_dir, foreign, folder))
        if saved is None:
            return None, None, foreign
        note = resume_note(saved.config, self.run_config, folder=folder, step=saved.progress["global_step"],
                           steps_per_epoch=self.steps_per_epoch, allow_changes=self.cfg.resume_with_changes)
        return saved, note, foreign

    def _setup_model(self, wrap_model: Callable[[nn.Module], nn.Module] | None) -> None:
        if self.cfg.gradient_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(self.model).__name__} does not support gradient checkpointing; "
                                 "set train.gradient_checkpointing=false")
            # Non-reentrant checkpointing gives grads to adapters even though the frozen inputs need none.
            # transformers 5.x renamed gradient_checkpointing_enable (deprecated alias) to activation_*.
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.to(self.accelerator.device)
        self.wrapped = wrap_model(self.model) if wrap_model is not None else self.model

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def windows(self, epoch: int, start: int = 0) -> list[list[list[int]]]:
        """Row indices of each optimizer step of ``epoch`` from step ``start``: [step][micro-batch][row]."""
        order = list(self.data.train_order(epoch, self.cfg.seed))
        b, a = self.cfg.batch_size, self.cfg.grad_accum_steps
        micro = [order[i : i + b] for i in range(0, len(order), b)]
        return [micro[i : i + a] for i in range(0, len(micro), a)][start:]

    def train_step(self, window: list[list[int]]) -> dict[str, float]:
        """One optimizer step over the micro-batches of ``window``; returns loss, grad_norm, lr, tokens."""
        self.wrapped.train()
        batches = [self._to_device(self.data.collate([self.data.train[i] for i in rows])) for rows in window]
        counts = [target_count(b, self.data.task) for b in batches]
        live = [(b, n) for b, n in zip(batches, counts) if n > 0]  # an all-masked batch has a 0/0 loss
        total, loss_sum = max(1, sum(counts)), 0.0
        for i, (batch, n) in enumerate(live):
            last = i == len(live) - 1
            # Only the last micro-batch all-reduces gradients (a no-op without a DDP wrapper).
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped):
                with self.accelerator.autocast():
                    loss = self._loss(batch)
                self.accelerator.backward(loss * (n / total))
            loss_sum += float(loss.detach()) * n
        grad_norm = self._clip()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum / total, "grad_norm": grad_norm, "lr": lr,
                "tokens": sum(batch_tokens(b) for b in batches)}

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._fused_loss is not None:  # it runs the body with use_cache=False itself
            return self._fused_loss(self.wrapped, batch)
        return model_loss(self.wrapped, batch, self._forward_kwargs)

    def _clip(self) -> float:
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        if self.cfg.max_grad_norm is None:
            grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            return float(torch.stack(grads).norm()) if grads else 0.0
        return float(self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over ``data.eval`` (target-weighted) plus perplexity (LM) or accuracy (seq_cls).

        Raises:
            ValueError: the data has no eval split.
        """
        rows = self.data.eval
        if rows is None or len(rows) == 0:
            raise ValueError("no eval data: set data.eval_files, data.eval_split or data.eval_fraction")
        meter, size = EvalMeter(self.data.task, self.metric_fn), self.cfg.eval_batch_size or self.cfg.batch_size
        # Only accuracy and metric_fn read logits; an LM loss on the fused path never builds (B, T, V) ones.
        needs_logits = self.data.task == "seq_cls" or self.metric_fn is not None
        was_training = self.wrapped.training
        self.wrapped.eval()
        shown = EvalProgress(len(rows), enabled=self.accelerator.is_main_process)
        for start in range(0, len(rows), size):
            shown.update(start)
            batch = self._to_device(self.data.collate([rows[i] for i in range(start, min(start + size, len(rows)))]))
            with self.accelerator.autocast():
                if self._fused_loss is not None and not needs_logits:
                    loss, logits = self._fused_loss(self.wrapped, batch), None
                else:
                    out = self.wrapped(**batch, **self._forward_kwargs)
                    loss, logits = out.loss, out.logits.float() if needs_logits else None
            meter.add(batch, loss.float(), logits)
        shown.close()
        self.wrapped.train(was_training)
        return meter.result()

    def _has_eval(self) -> bool:
        return self.data.eval is not None and len(self.data.eval) > 0

    def fit(self, eval_before: dict[str, float] | None = None) -> TrainResult:
        """Train to ``total_steps`` (or early stop / signal), evaluating and checkpointing as configured.

        ``eval_before``: the evaluation before training, logged at step 0 of a run that starts fresh."""
        progress = self._start()
        log = RunLogger(self.output_dir, self.total_steps, progress.global_step, report_to=self.cfg.trackers(),
                        run_config=self.run_config, enabled=self.accelerator.is_main_process)
        if eval_before is not None and progress.global_step == 0:
            log.log("eval", 0, eval_before)
        self._pending.clear()
        if self._resume_note:
            log.message(self._resume_note)
        try:
            with StopOnSignal() as stop:
                log.message(READY_MESSAGE)
                while self._running(progress, stop):
                    for window in self.windows(progress.epoch, progress.step_in_epoch):
                        t0 = self.clock()
                        self._pending.append(self.train_step(window))
                        progress.train_seconds += self.clock() - t0
                        progress.global_step += 1
                        progress.step_in_epoch += 1
                        progress.tokens += self._pending[-1]["tokens"]
                        self._after_step(progress, log, stop)
                        if not self._running(progress, stop):
                            break
                    else:
                        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
                if stop.requested:
                    log.message(f"{stop.signal_name}: stopping after step {progress.global_step}")
            return self._finish(progress, log, interrupted=stop.requested)
        finally:
            log.close()

    def _running(self, progress: Progress, stop: StopOnSignal) -> bool:
        return progress.global_step < self.total_steps and not progress.stopped_early and not stop.requested

    def _after_step(self, progress: Progress, log: RunLogger, stop: StopOnSignal) -> None:
        step, cfg = progress.global_step, self.cfg
        if step % cfg.log_every == 0 or step == self.total_steps:
            means = {k: sum(m[k] for m in self._pending) / len(self._pending) for k in ("loss", "grad_norm")}
            epoch = progress.epoch + progress.step_in_epoch / self.steps_per_epoch
            tokens_per_s = progress.tokens / max(progress.train_seconds, 1e-9)
            record = {"epoch": round(epoch, 4), **means, "lr": self._pending[-1]["lr"], "tokens_per_s": tokens_per_s}
            progress.history.append(log.log("train", step, record))
            self._pending.clear()
        log.advance(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps and self._has_eval():
            self._evaluate_and_track(progress, log)
        # A run that stopped early is saved once, by _finish, after the best weights are restored.
        if ((cfg.save_every and step % cfg.save_every == 0) or stop.requested) and not progress.stopped_early:
            self._save(progress)

    def _evaluate_and_track(self, progress: Progress, log: RunLogger) -> dict[str, float]:
        metrics = self.evaluate()
        progress.history.append(log.log("eval", progress.global_step, metrics))
        key = self.cfg.early_stopping_metric
        if key not in metrics:
            raise ValueError(f"train.early_stopping_metric={key!r} is not an eval metric; choose from {sorted(metrics)}")
        best = progress.best_metrics
        sign = 1.0 if self.cfg.lower_is_better() else -1.0
        if best is None or sign * metrics[key] < sign * best[key]:
            progress.best_metrics, progress.best_step, progress.bad_evals = metrics, progress.global_step, 0
            if self.cfg.early_stopping_patience:
                self._best_weights = {n: p.detach().clone() for n, p in self.model.named_parameters()
                                      if p.requires_grad}
        else:
            progress.bad_evals += 1
            patience = self.cfg.early_stopping_patience
            if patience and progress.bad_evals >= patience:
                progress.stopped_early = True
                log.message(f"early stopping: {key} did not improve for {patience} evaluations "
                            f"(best {best[key]:.4g} at step {progress.best_step})")
        return metrics

    def _save(self, progress: Progress, replace: bool = False) -> None:
        """Checkpoint this step (once; ``replace`` rewrites a checkpoint already written at it)."""
        if not replace and self._last_save is not None and self._last_save.name == f"step-{progress.global_step}":
            return
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self._last_save = save_checkpoint(
                self.output_dir / "checkpoints", progress.global_step, model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, progress=asdict(progress), config=self.run_config,
                keep_last=self.cfg.keep_last,
            )

    def _start(self) -> Progress:
        """Fresh progress with a new run id, or the state of the resume checkpoint (weights, optimizer, RNG)."""
        if self._foreign and self.accelerator.is_main_process:  # train.overwrite_checkpoints, checked at __init__
            for folder in self._foreign:
                shutil.rmtree(folder)
        if self._resume is None:
            return Progress(run_id=new_run_id())
        saved, self._resume = self._resume, None  # its tensors are not needed once restored
        restore_checkpoint(saved, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        return Progress(**{"run_id": saved.run_id, **saved.progress})

    def _restore_best(self, progress: Progress, log: RunLogger) -> dict[str, float] | None:
        """Put back the weights of the best evaluation; returns its metrics (None if not kept)."""
        if self._best_weights is None:  # the best was before a resume: its weights were not kept
            log.message(f"the best evaluation (step {progress.best_step}) predates the resume; keeping the last weights")
            return None
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self._best_weights.items():
                params[name].copy_(value)
        log.message(f"restored the weights of step {progress.best_step}, the best evaluation")
        return dict(progress.best_metrics)

    def _finish(self, progress: Progress, log: RunLogger, interrupted: bool) -> TrainResult:
        final = None
        if self._has_eval() and not interrupted:
            if progress.restored_best:  # a finished run resumed: its weights are already the best's
                final = dict(progress.best_metrics)
            elif progress.stopped_early:  # it stopped right after evaluating this step
                final = {k: v for k, v in progress.history[-1].items() if k not in ("split", "step")}
            else:
                final = self._evaluate_and_track(progress, log)
                progress.stopped_early = False  # the end-of-run evaluation stops nothing
        restored = None
        best = progress.best_step
        if (self.cfg.early_stopping_patience and not interrupted and not progress.restored_best
                and best is not None and best != progress.global_step):
            restored = self._restore_best(progress, log)
            final = restored or final
            progress.restored_best = restored is not None
        # The last checkpoint always holds the weights the run returns (the best ones, once restored).
        if interrupted or self.cfg.save_every:
            self._save(progress, replace=restored is not None)
        result = TrainResult(
            global_step=progress.global_step,
            epochs_completed=progress.epoch + progress.step_in_epoch / self.steps_per_epoch,
            final_metrics=final, best_metrics=progress.best_metrics, best_step=progress.best_step,
            history=progress.history, output_dir=self.output_dir, metrics_file=log.path,
            checkpoint_dir=self._last_save, tokens_per_second=progress.tokens / max(progress.train_seconds, 1e-9),
            train_seconds=progress.train_seconds, peak_memory_mib=peak_memory_mib(),
            stopped_early=progress.stopped_early, interrupted=interrupted,
        )
        log.message(result.summary())
        return result
