"""``Trainer``: one training loop for every adapter method, task, precision and number of processes.

Per optimizer step, on every rank::

    order  = data.train_order(epoch, seed)           deterministic, the same on every rank
    step   = its next batch_size x grad_accum_steps x dp_size rows (the global batch)
    window = this rank's micro-batches of the step   disjoint shards, the same count on every rank
    total  = targets of the step, summed over ranks  (one all-reduce)
    for each micro-batch i (gradient sync on the last only):
        loss_i = model(**batch_i).loss               under the strategy's autocast
        backward(loss_i * n_i / total)               the token-weighted mean over the global batch
    clip to the global grad norm -> optimizer.step -> scheduler.step -> zero_grad
    one all-reduce of loss sum, targets, tokens and the stop flag, read once
    log / evaluate / early-stop / checkpoint         decided alike on every rank

So N processes with batch B train what one process trains with batch N·B (see
``tunekit.distributed.data``). Everything device- and process-related goes through
a ``tunekit.distributed`` strategy: placement and wrapping (the model is never moved
whole to one device first), activation checkpointing, autocast, backward, sync
boundaries, clipping, the optimizer step, metric all-reduce, trainable snapshots
and checkpoint state. One process is the ``none`` strategy. Only rank 0 prints and
writes metrics; every rank takes part in checkpoints, which any number of processes
can resume. Micro-batch losses, targets and tokens stay on the device until the
step's one read (no host sync per micro-batch). No collective runs on an error path.

Everything that can refuse a run (the resume checkpoint, another run's checkpoints
in the folder, a changed config, an external multi-process launch without a
strategy) is checked when the ``Trainer`` is built, before ``fit`` writes anything.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunekit.distributed.data import MicroBatch, eval_shards, finite_loss_batch, rank_windows, resume_step, steps_per_epoch
from tunekit.train.checkpoint import (
    STATE,
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
from tunekit.train.loss import (
    TASKS,
    EvalMeter,
    batch_tokens,
    evaluation_loss,
    fused_loss_fn,
    model_loss,
    target_count,
)
from tunekit.train.optim import build_optimizer, build_scheduler
from tunekit.train.progress import Progress, TrainResult
from tunekit.train.resume import resume_note, sections_changed
from tunekit.train.runtime import external_launch_problem, peak_memory_mib
from tunekit.train.signals import StopOnSignal

__all__ = ["READY_MESSAGE", "Progress", "TrainResult", "Trainer"]

# Printed once every rank's SIGINT/SIGTERM handlers are installed (scripts wait for it before signalling).
READY_MESSAGE = "training: Ctrl-C or SIGTERM finishes the step, saves a checkpoint and stops"


def _default_strategy(cfg: TrainConfig):
    """The one-process strategy for ``cfg``; refuses a process that a multi-process launcher started."""
    from tunekit.distributed import DistributedOptions, make_strategy

    if problem := external_launch_problem():
        raise ValueError(problem)
    return make_strategy(DistributedOptions.from_configs(DistributedOptions(), cfg))


FUSED_HEAD_STRATEGIES = ("none", "tp")
"""Strategies under which ``train.fused_cross_entropy`` runs: one process, and tensor parallelism, whose head
stays whole on every rank (its hooks are on the split layers, not around the model's forward)."""


def _check_strategy_fits(strategy, cfg: TrainConfig) -> None:
    """A strategy built with other training settings than ``cfg`` would silently train differently."""
    options = strategy.options
    mine = {"mixed_precision": cfg.mixed_precision, "gradient_checkpointing": cfg.gradient_checkpointing,
            "max_grad_norm": cfg.max_grad_norm}
    for key, value in mine.items():
        if getattr(options, key) != value:
            raise ValueError(f"the strategy was built with {key}={getattr(options, key)!r} but train.{key}={value!r}; "
                             "build it with DistributedOptions.from_configs(distributed_section, train_config)")
    if cfg.fused_cross_entropy and strategy.name not in FUSED_HEAD_STRATEGIES:
        raise ValueError(f"train.fused_cross_entropy=true is not supported with distributed.strategy={strategy.name}: "
                         "the fused head runs outside the engine's forward; set it to false")


class Trainer:
    """Trains ``model`` on ``data`` as ``cfg`` says; checkpoints and logs under ``output_dir``.

    Args:
        model: a Hugging Face model (adapters injected, base frozen) whose forward takes the
            collated batch and returns ``.loss`` and ``.logits``; on the CPU (the strategy places it).
        data: a DataBundle (duck-typed): ``train`` and ``eval`` (sized sequences of rows, eval may be
            None), ``collate(rows) -> dict[str, Tensor]``, ``train_order(epoch, seed, step_rows) -> list[int]``
            (``step_rows``: rows per optimizer step, for length groups that batches do not straddle),
            ``task`` ("causal_lm" | "seq_cls" | "seq2seq").
        cfg: the training config.
        output_dir: run folder: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``.
        strategy: a ``tunekit.distributed`` strategy (``make_strategy(DistributedOptions.from_configs(
            distributed, cfg))``), built on every rank; default: one process (a process started by
            a multi-process launcher is then refused).
        metric_fn: ``fn(logits, batch) -> {name: per-row mean}`` for extra eval metrics.
        run_config: the run's whole resolved config (JSON-able sections: model, adapter, data, ...),
            saved in every checkpoint and compared on resume; its ``train`` section is ``cfg``.

    Raises:
        ValueError: the run cannot start (bad data, a damaged or incompatible resume checkpoint,
            another run's checkpoints in ``output_dir``, a changed config, a multi-process launch
            without a strategy).
    """

    # The clock that times training steps (a test replaces it).
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(
        self, model: nn.Module, data: Any, cfg: TrainConfig, output_dir: str | Path, *, strategy: Any = None,
        metric_fn: Callable[[torch.Tensor, dict], dict[str, float]] | None = None,
        run_config: Mapping[str, Any] | None = None, wrap_model: Any = None,
    ) -> None:
        if wrap_model is not None:
            raise TypeError("Trainer(wrap_model=...) is gone: pass strategy=tunekit.distributed.make_strategy("
                            "DistributedOptions(strategy='ddp' | 'fsdp' | 'deepspeed', ...)), which wraps the model")
        if getattr(data, "task", None) not in TASKS:
            raise ValueError(f"data.task is {getattr(data, 'task', None)!r}; the trainer supports {list(TASKS)}")
        if len(data.train) == 0:
            raise ValueError("the training set is empty; check the data section of the config")
        self.model, self.data, self.cfg, self.metric_fn = model, data, cfg, metric_fn
        self.output_dir = Path(output_dir)
        self.strategy = strategy if strategy is not None else _default_strategy(cfg)
        _check_strategy_fits(self.strategy, cfg)
        self._fused_loss = fused_loss_fn(data.task) if cfg.fused_cross_entropy else None
        # Extra forward arguments the data needs (use_cache=False: packed rows get their
        # block-diagonal mask only without a cache).
        self._forward_kwargs = dict(getattr(data, "forward_kwargs", None) or {})
        self.wrapped, self.optimizer = self.strategy.prepare(model, lambda m: build_optimizer(m, cfg))
        dp = self.strategy.dp_size
        self.global_batch = cfg.batch_size * cfg.grad_accum_steps * dp
        self.steps_per_epoch = steps_per_epoch(len(data.train), cfg.batch_size, cfg.grad_accum_steps, dp)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self._pending: list[dict[str, float]] = []  # step metrics since the last train log line
        self._last_save: Path | None = None
        self._signal: StopOnSignal | None = None
        self._stopping = False  # a stop signal reached some rank: agreed by all in a step's all-reduce
        # With early stopping, the trainable weights of the best evaluation (adapters are small;
        # shards stay shards), restored when training stops, as transformers' load_best_model_at_end does.
        self._best_weights: dict[str, torch.Tensor] | None = None
        self.run_config = {**(run_config or {}), "train": cfg.model_dump(mode="json"), "data_parallel_size": dp}
        self._resume, self._resume_note, self._foreign = self._plan_start()

    # ------------------------------------------------------------------ start
    def _plan_start(self) -> tuple[SavedCheckpoint | None, str | None, list[Path]]:
        """The checkpoint to resume (its files checked), the line announcing it, and other runs'
        checkpoints to delete at the start; raises if the run cannot start here."""
        folder = resolve_resume(self.cfg.resume, self.output_dir)
        saved = read_checkpoint(folder) if folder is not None else None
        foreign = other_runs_checkpoints(self.output_dir, saved.run_id if saved else None)
        if foreign and not self.cfg.overwrite_checkpoints:
            raise ValueError(foreign_checkpoints_message(self.output_dir, foreign, folder))
        if saved is None:
            return None, None, foreign
        note = resume_note(saved.config, self.run_config, folder=folder, step=saved.progress["global_step"],
                           steps_per_epoch=self.steps_per_epoch, allow_changes=self.cfg.resume_with_changes)
        self._check_trainable_fit(saved)
        self._resume_step = self._resume_position(saved.progress)
        return saved, note, foreign

    def _check_trainable_fit(self, saved: SavedCheckpoint) -> None:
        """Refuse, before anything is written, a checkpoint whose trainable tensors this model cannot take."""
        from tunekit.distributed.checkpoint import trainable_mismatch

        problem = trainable_mismatch(saved.folder / STATE, self.model, self.strategy.trainable_shapes)
        if problem:
            changed = sections_changed(saved.config, self.run_config, ("model", "adapter"))
            cause = f" ({changed})" if changed else ""
            raise ValueError(f"resuming from {saved.folder} refused: the trainable parameters differ from this "
                             f"model's{cause}: {problem}; resume with the checkpoint's model and adapter config, or "
                             "start over in a new output.dir")

    def _resume_position(self, progress: dict[str, Any]) -> int:
        samples = int(progress.get("samples_in_epoch", 0))
        if samples >= len(self.data.train):  # the epoch was complete: go on with the next one
            return self.steps_per_epoch
        return resume_step(samples, self.global_batch)

    def _start(self) -> Progress:
        """Fresh progress with rank 0's new run id, or the state of the resume checkpoint (weights, optimizer, RNG)."""
        if self._foreign and self.strategy.is_main:  # train.overwrite_checkpoints, checked at __init__
            for folder in self._foreign:
                shutil.rmtree(folder)
        self.strategy.barrier()
        if self._resume is None:
            return Progress(run_id=self.strategy.broadcast_object(new_run_id()))
        saved, self._resume = self._resume, None
        restore_checkpoint(saved, strategy=self.strategy, scheduler=self.scheduler)
        progress = Progress(**{"run_id": saved.run_id, **saved.progress})
        progress.step_in_epoch = self._resume_step
        return progress

    # ------------------------------------------------------------------ one step
    def windows(self, epoch: int, start: int = 0) -> list[list[MicroBatch]]:
        """This rank's micro-batches of each optimizer step of ``epoch`` from step ``start``: [step][micro-batch]."""
        # Length groups are rounded to whole optimizer steps of all ranks, so no step straddles two groups.
        order = self.data.train_order(epoch, self.cfg.seed, step_rows=self.global_batch)
        return rank_windows(order, batch_size=self.cfg.batch_size,
                            grad_accum_steps=self.cfg.grad_accum_steps, dp_size=self.strategy.dp_size,
                            dp_rank=self.strategy.dp_rank, start_step=start)

    def _micro_batches(self, window: list[MicroBatch]) -> tuple[list[dict], list[int], int]:
        """(device batches, target counts, input tokens) of this rank's micro-batches; counted on the host."""
        batches, counts, tokens = [], [], 0
        for micro in window:
            batch = self.data.collate([self.data.train[i] for i in micro.rows])
            n = 0 if micro.placeholder else target_count(batch, self.data.task)
            tokens += 0 if micro.placeholder else batch_tokens(batch)
            # A batch without targets still runs (the ranks stay in step) at weight 0, with a finite loss.
            batches.append(self.strategy.to_device(batch if n else finite_loss_batch(batch, self.data.task)))
            counts.append(n)
        return batches, counts, tokens

    def train_step(self, window: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the step's global loss, grad_norm,
        lr and tokens, and whether a stop signal reached any rank ("stop")."""
        self.wrapped.train()
        batches, counts, tokens = self._micro_batches(window)
        total = self.strategy.all_reduce_sums({"targets": sum(counts)})["targets"]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.strategy.device)
        for i, (batch, n) in enumerate(zip(batches, counts)):
            if not total:  # no rank has a target: no gradient at all, as on one process
                break
            with self.strategy.sync_gradients(i == len(batches) - 1), self.strategy.autocast():
                loss = self._loss(batch)
            self.strategy.backward(loss, n / total)
            loss_sum += loss.detach().double() * n
        lr = self.scheduler.get_last_lr()[0]
        outcome = self.strategy.optimizer_step(self.cfg.max_grad_norm)
        if outcome.stepped:  # fp16 overflow: the step did not happen
            self.scheduler.step()
        self.strategy.zero_grad()
        stop = self._signal is not None and self._signal.requested
        sums = self.strategy.all_reduce_sums({"loss_sum": loss_sum, "targets": sum(counts), "tokens": tokens,
                                              "stop": float(stop)})
        return {"loss": sums["loss_sum"] / max(1.0, sums["targets"]), "grad_norm": outcome.grad_norm, "lr": lr,
                "tokens": int(sums["tokens"]), "stop": sums["stop"] > 0}

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._fused_loss is not None:  # it runs the body with use_cache=False itself
            return self._fused_loss(self.wrapped, batch)
        return model_loss(self.wrapped, batch, self._forward_kwargs, self.data.task)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over ``data.eval`` (target-weighted) plus perplexity (LM) or accuracy (seq_cls).

        Each rank evaluates its shard of the rows; the sums are all-reduced, so every rank
        returns what one process evaluating all rows returns.

        Raises:
            ValueError: the data has no eval split.
        """
        rows = self.data.eval
        if rows is None or len(rows) == 0:
            raise ValueError("no eval data: set data.eval_files, data.eval_split or data.eval_fraction")
        meter, size = EvalMeter(self.data.task, self.metric_fn), self.cfg.eval_batch_size or self.cfg.batch_size
        was_training = self.wrapped.training
        self.wrapped.eval()
        shown = EvalProgress(len(rows), enabled=self.strategy.is_main)
        shards = eval_shards(len(rows), size, self.strategy.dp_size, self.strategy.dp_rank)
        for done, micro in enumerate(shards):
            shown.update(min(len(rows), done * size * self.strategy.dp_size))  # rows all ranks have done
            batch = self.strategy.to_device(self.data.collate([rows[i] for i in micro.rows]))
            with self.strategy.autocast():
                loss, logits = evaluation_loss(self.wrapped, batch, self.data.task, self._forward_kwargs,
                                               need_logits=self.metric_fn is not None, fused_loss=self._fused_loss)
            meter.add(batch, loss.float(), logits, counts=not micro.placeholder)
        shown.close()
        self.wrapped.train(was_training)
        return meter.result(reduce=self.strategy.all_reduce_sums)

    def _has_eval(self) -> bool:
        return self.data.eval is not None and len(self.data.eval) > 0

    # ------------------------------------------------------------------ the loop
    def fit(self, eval_before: dict[str, float] | None = None) -> TrainResult:
        """Train to ``total_steps`` (or early stop / signal), evaluating and checkpointing as configured.

        ``eval_before``: the evaluation before training, logged at step 0 of a run that starts fresh."""
        progress = self._start()
        log = RunLogger(self.output_dir, self.total_steps, progress.global_step, report_to=self.cfg.trackers(),
                        run_config=self.run_config, enabled=self.strategy.is_main)
        if eval_before is not None and progress.global_step == 0:
            log.log("eval", 0, eval_before)
        self._pending.clear()
        if self._resume_note:
            log.message(self._resume_note)
        try:
            with StopOnSignal(repeat_quits=self.strategy.runtime.world_size == 1) as stop:
                self._signal = stop
                self.strategy.barrier()  # every rank has its handlers before the line says so
                log.message(READY_MESSAGE)
                self._train(progress, log)
                if self._stopping:
                    log.message(f"{stop.signal_name or 'a stop signal (on another rank)'}: stopping after step "
                                f"{progress.global_step}")
            return self._finish(progress, log, interrupted=self._stopping)
        finally:
            self._signal = None
            log.close()

    def _train(self, progress: Progress, log: RunLogger) -> None:
        while self._running(progress):
            for window in self.windows(progress.epoch, progress.step_in_epoch):
                t0 = self.clock()
                metrics = self.train_step(window)
                progress.train_seconds += self.clock() - t0
                self._stopping = bool(metrics.pop("stop", False))
                progress.global_step += 1
                progress.step_in_epoch += 1
                progress.samples_in_epoch = min(progress.step_in_epoch * self.global_batch, len(self.data.train))
                progress.tokens += metrics["tokens"]
                self._pending.append(metrics)
                self._after_step(progress, log)
                if not self._running(progress):
                    break
            else:
                progress.epoch, progress.step_in_epoch, progress.samples_in_epoch = progress.epoch + 1, 0, 0

    def _running(self, progress: Progress) -> bool:
        return progress.global_step < self.total_steps and not progress.stopped_early and not self._stopping

    def _after_step(self, progress: Progress, log: RunLogger) -> None:
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
        if ((cfg.save_every and step % cfg.save_every == 0) or self._stopping) and not progress.stopped_early:
            self._save(progress)

    def _evaluate_and_track(self, progress: Progress, log: RunLogger) -> dict[str, float]:
        # The metrics are global (all-reduced), so every rank takes the same early-stopping decision.
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
                self._best_weights = self.strategy.snapshot_trainable()
        else:
            progress.bad_evals += 1
            patience = self.cfg.early_stopping_patience
            if patience and progress.bad_evals >= patience:
                progress.stopped_early = True
                log.message(f"early stopping: {key} did not improve for {patience} evaluations "
                            f"(best {best[key]:.4g} at step {progress.best_step})")
        return metrics

    def _save(self, progress: Progress, replace: bool = False) -> None:
        """Checkpoint this step from every rank (once; ``replace`` rewrites a checkpoint already written at it)."""
        from tunekit.adapters import adapter_configs
        from tunekit.distributed.adapter_save import save_gathered_adapter

        if not replace and self._last_save is not None and self._last_save.name == f"step-{progress.global_step}":
            return
        write_adapter = None
        if adapter_configs(self.model):
            def write_adapter(folder: Path) -> None:
                save_gathered_adapter(self.strategy, folder)
        self._last_save = save_checkpoint(
            self.output_dir / "checkpoints", progress.global_step, strategy=self.strategy, scheduler=self.scheduler,
            progress=asdict(progress), config=self.run_config, keep_last=self.cfg.keep_last,
            write_adapter=write_adapter,
        )

    def _restore_best(self, progress: Progress, log: RunLogger) -> dict[str, float] | None:
        """Put back the weights of the best evaluation; returns its metrics (None if not kept)."""
        if self._best_weights is None:  # the best was before a resume: its weights were not kept
            log.message(f"the best evaluation (step {progress.best_step}) predates the resume; keeping the last weights")
            return None
        self.strategy.restore_trainable(self._best_weights)
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
        peaks = self.strategy.gather_floats(peak_memory_mib())
        result = TrainResult(
            global_step=progress.global_step,
            epochs_completed=progress.epoch + progress.step_in_epoch / self.steps_per_epoch,
            final_metrics=final, best_metrics=progress.best_metrics, best_step=progress.best_step,
            history=progress.history, output_dir=self.output_dir, metrics_file=log.path,
            checkpoint_dir=self._last_save, tokens_per_second=progress.tokens / max(progress.train_seconds, 1e-9),
            train_seconds=progress.train_seconds, peak_memory_mib=peaks[self.strategy.runtime.rank],
            stopped_early=progress.stopped_early, interrupted=interrupted, peak_memory_mib_per_rank=peaks,
        )
        log.message(result.summary())
        return result
