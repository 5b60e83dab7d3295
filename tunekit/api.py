"""``tunekit.finetune``: one call from a config to a trained, saved adapter, on one process or several.

    config -> validate (incl. what the strategy cannot run) -> join the processes (distributed.strategy)
           -> load model + tokenizer -> build data -> inject adapter -> Trainer (wraps, shards)
           -> (nothing written before here) -> evaluate (before) -> Trainer.fit
           -> save adapter (gathered) [+ merged model (streamed)]

The config is validated before the model loads; the model, tokenizer, data,
adapter targets and resume checkpoint (``Trainer`` checks the run folder and
a changed config) before anything is written, so a command that fails leaves
the run folder as it was. Every process of a multi-process job (``tunekit
finetune --nproc N``, ``tunekit.launch``, torchrun, srun, ...) runs this same
function; rank 0 alone writes the files below, each write followed by a
barrier. The run folder (``output.dir``) gets::

    resolved_config.yaml     the config as run (loads back to the same config)
    adapter/                 the adapter (PEFT's format where the method allows) + tunekit_base.json
    merged/                  base with the adapter merged in (output.save_merged)
    base/                    the random-initialised base (model.from_config only; a resumed run
                             reloads it, never rebuilds it)
    metrics.jsonl            the trainer's log
    results.json             eval metrics before / after training, and the last training-step metrics

Example:
    >>> from tunekit import finetune
    >>> result = finetune("cookbook/quickstart.yaml")  # doctest: +SKIP
    >>> result.metrics["accuracy"] > result.metrics_before["accuracy"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunekit.config import ConfigError, FinetuneConfig, config_to_yaml, load_config, task_for
from tunekit.data.limits import check_position_limit
from tunekit.run_report import report_run

__all__ = ["BASE_INFO_NAME", "FinetuneResult", "check_runnable", "finetune"]

# Written beside adapter_config.json: how to rebuild the base model (source,
# dtype, task head, label names), which PEFT's config does not record.
BASE_INFO_NAME = "tunekit_base.json"


@dataclass(frozen=True)
class FinetuneResult:
    """What a run produced."""

    metrics: dict[str, float]
    """Final evaluation metrics; without eval data, the last logged training-step metrics
    (``metrics_split`` says which)."""
    metrics_before: dict[str, float] | None
    """Evaluation metrics before training (``output.eval_before`` and eval data), else None."""
    output_dir: Path
    """The run folder (``output.dir``)."""
    adapter_dir: Path
    """The saved adapter (loads with ``tunekit.adapters.load_adapters`` or PEFT)."""
    merged_dir: Path | None
    """The merged model (``output.save_merged``), else None."""
    metrics_file: Path
    """The trainer's JSONL log."""
    config_file: Path
    """``resolved_config.yaml``."""
    train: Any
    """The trainer's ``TrainResult`` (steps, tokens/s, history, ...)."""
    interrupted: bool = False
    """Stopped by SIGINT/SIGTERM: a checkpoint was saved, no final adapter; rerun to resume."""
    metrics_split: str = "eval"
    """"eval" (``metrics`` are evaluation metrics) or "train" (no eval data: the last training step's)."""


def check_runnable(cfg: FinetuneConfig, *, nproc: int | None = None, nnodes: int = 1):
    """The run's ``DistributedOptions``; a ``ConfigError`` (exit 2) for what cannot run, before anything loads.

    ``nproc``: the processes per node a launch is about to start (``--nproc``); None when this
    process is one of them, or the only one (the world size then comes from the environment).
    ``distributed.strategy: auto`` is checked as what it resolves to for that job.
    """
    from tunekit.config import distributed_options
    from tunekit.distributed.checks import check_before_launch
    from tunekit.train.runtime import external_launch_problem

    if cfg.distributed.strategy == "auto":
        from tunekit.auto_strategy import job_size, resolve_auto

        cfg = resolve_auto(cfg, **job_size(nproc, nnodes)).cfg

    if nproc is None and cfg.distributed.strategy == "none" and (problem := external_launch_problem()):
        raise ConfigError([problem])
    options = distributed_options(cfg)
    quantization = cfg.model.quantization
    try:
        check_before_launch(options, nproc=nproc, nnodes=nnodes, adapter_method=cfg.adapter.method,
                            quantization=None if quantization is None else f"{quantization.bits}bit",
                            fused_cross_entropy=cfg.train.fused_cross_entropy,
                            model_config=_tensor_parallel_model_config(cfg), seq_len=cfg.data.max_seq_len)
    except ValueError as err:
        raise ConfigError([str(err)]) from None
    if cfg.hub.push:  # offline, no token, bad repo id, no write access: fail now, not after training
        from tunekit.hub import PushError, check_push_config

        try:
            check_push_config(cfg.hub)
        except PushError as err:  # a run that cannot push is refused like any config: exit 2
            raise ConfigError([str(err)]) from None
    return options


def _tensor_parallel_model_config(cfg: FinetuneConfig):
    """The base's transformers config (no weights) when tensor parallelism must check its sizes, else None."""
    from tunekit.distributed.options import TENSOR_PARALLEL
    from tunekit.models import load_model_config

    return load_model_config(cfg.model) if cfg.distributed.strategy in TENSOR_PARALLEL else None


def _saved_base(cfg: FinetuneConfig, out: Path) -> Path | None:
    """The ``base/`` folder a resumed ``model.from_config`` run must reload (None: build a new base).

    Its checkpoints were trained on that random base; rebuilding it (another seed, another
    torch version) would put different weights under the resumed adapter.
    """
    from tunekit.train import read_checkpoint, resolve_resume

    if not cfg.model.from_config:
        return None
    checkpoint = resolve_resume(cfg.train.resume, out)
    if checkpoint is None:
        return None
    base_dir = checkpoint.parents[1] / "base"  # <run>/checkpoints/step-N -> <run>/base
    saved_model = read_checkpoint(checkpoint).config.get("model")
    if saved_model is not None and saved_model != cfg.model.model_dump(mode="json"):
        changed = sorted(k for k, v in cfg.model.model_dump(mode="json").items() if saved_model.get(k) != v)
        raise ValueError(f"resuming from {checkpoint}: model.{', model.'.join(changed)} changed, but a resumed "
                         f"model.from_config run keeps the base its checkpoints were trained on ({base_dir}); "
                         "revert them, or start over in a new output.dir")
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"resuming from {checkpoint}: its model.from_config base {base_dir} is missing; "
                         "restore it, or start over in a new output.dir")
    return base_dir.resolve()


def _base_record(cfg: FinetuneConfig, base_dir: Path | None, model, task: str, labels) -> dict[str, Any]:
    """The base-model record for ``tunekit_base.json`` (a from_config base lives in ``base_dir``)."""
    model_cfg = cfg.model.model_dump(mode="json")
    if cfg.model.from_config:
        model.config._name_or_path = str(base_dir)  # recorded as base_model_name_or_path
        model_cfg.update(name_or_path=str(base_dir), tokenizer=None, from_config=False, model_type=None,
                         config_overrides={})
    elif cfg.model.name_or_path and Path(cfg.model.name_or_path).expanduser().exists():
        model_cfg["name_or_path"] = str(Path(cfg.model.name_or_path).expanduser().resolve())
    if model_cfg.get("tokenizer") and Path(model_cfg["tokenizer"]).expanduser().exists():
        model_cfg["tokenizer"] = str(Path(model_cfg["tokenizer"]).expanduser().resolve())
    return {"model": model_cfg, "task": task, "label_names": labels, "data": cfg.data.model_dump(mode="json")}


@dataclass
class _Setup:
    model: Any
    tokenizer: Any
    data: Any
    base: dict[str, Any]
    """The tunekit_base.json record."""
    new_base: Path | None
    """A new from_config base saved in the scratch folder, moved to ``output.dir/base`` once the run starts."""


def _setup(cfg: FinetuneConfig, out: Path, scratch: Path, strategy) -> _Setup:
    from tunekit.adapters import inject_adapters, trainable_parameters
    from tunekit.data import build_dataset, label_names_for
    from tunekit.models import load_model
    from tunekit.models.fastpath import adopt_fast_path, choose_fast_path

    task = task_for(cfg)
    labels = label_names_for(cfg.data) if task == "seq_cls" else None
    saved_base = _saved_base(cfg, out)
    model_cfg = cfg.model
    if saved_base is not None:
        model_cfg = cfg.model.model_copy(update=dict(name_or_path=str(saved_base), tokenizer=None, from_config=False,
                                                     model_type=None, config_overrides={}))
    main = strategy.is_main
    # fsdp: one copy of the base per job; the other ranks build it on the meta device (rank0_fill).
    strategy.base_on_rank0_only = strategy.loads_base_on_rank0_only(quantized=model_cfg.quantization is not None)
    on_meta = strategy.base_on_rank0_only and strategy.runtime.rank != 0
    torch.manual_seed(cfg.train.seed)  # a new head's init is part of the run (the same on every rank)
    model, tokenizer = load_model(model_cfg, task=task, label_names=labels, on_meta=on_meta)
    new_base = None
    if cfg.model.from_config and saved_base is None and main:
        # Random weights exist only in these processes: keep rank 0's (saved before the adapter goes
        # in; the strategy checks every rank built the same).
        new_base = scratch / "base"
        model.save_pretrained(new_base)
        tokenizer.save_pretrained(new_base)
    # data.packing null / attention auto: packing and the varlen attention where exact on this model.
    fast = None if on_meta else choose_fast_path(model, task=task, method=cfg.adapter.method,
                                                 packing=cfg.data.packing,
                                                 attn_implementation=cfg.model.attn_implementation)
    if strategy.base_on_rank0_only:  # a meta model cannot run the probe: every rank trains as rank 0 chose
        fast = strategy.broadcast_object(fast)
        if on_meta:
            adopt_fast_path(model, fast)
    cfg.data.packing = fast.packing  # resolved_config.yaml and the checkpoints record what ran
    if main:
        print(fast.note)
    data = build_dataset(cfg.data, tokenizer, seed=cfg.train.seed)
    base = _base_record(cfg, saved_base or (out / "base").resolve(), model, task, labels)
    report = inject_adapters(model, cfg.adapter)
    if strategy.base_on_rank0_only:
        from tunekit.distributed.rank0_fill import check_signatures, signatures

        reference = strategy.broadcast_object(signatures(model) if not on_meta else None)
        if on_meta:
            check_signatures(model, reference)
    if main:
        print(f"adapter {report.method}: wrapped {len(report.wrapped)} modules; {trainable_parameters(model)}")
        print(data.stats.summary())
        if strategy.base_on_rank0_only:
            print(f"base: loaded by rank 0 only; the other {strategy.runtime.world_size - 1} rank(s) built it on the "
                  "meta device and receive their shards from rank 0 (distributed.fill_from_rank0: false opts out)")
    return _Setup(model, tokenizer, data, base, new_base)


def _write_run_files(cfg: FinetuneConfig, out: Path, setup: _Setup, strategy, auto_line: str | None = None) -> Path:
    """The run is known to start: rank 0 writes resolved_config.yaml (and a new base/); returns the config file.

    A resolved ``distributed.strategy: auto`` heads it as a comment (the section holds the choice).
    """
    config_file = out / "resolved_config.yaml"
    if strategy.is_main:
        out.mkdir(parents=True, exist_ok=True)
        head = f"# {auto_line}\n" if auto_line else ""
        config_file.write_text(head + config_to_yaml(cfg), encoding="utf-8")
        if setup.new_base is not None:
            shutil.rmtree(out / "base", ignore_errors=True)  # an earlier run's, which left no checkpoints
            shutil.move(str(setup.new_base), str(out / "base"))
    strategy.barrier()
    return config_file


def _save(out: Path, setup: _Setup, strategy) -> Path:
    """The final adapter, gathered from every rank and written by rank 0 with tunekit_base.json; a barrier after."""
    from tunekit.distributed.adapter_save import save_gathered_adapter

    adapter_dir = out / "adapter"
    save_gathered_adapter(strategy, adapter_dir)
    if strategy.is_main:
        (adapter_dir / BASE_INFO_NAME).write_text(json.dumps(setup.base, indent=2) + "\n", encoding="utf-8")
    strategy.barrier()
    return adapter_dir


def _save_merged(adapter_dir: Path, merged_dir: Path) -> None:
    """Rank 0 only, and no barrier after: streaming a large base takes longer than a collective may wait,
    and the other ranks have nothing left to do."""
    from tunekit.distributed.merge_plan import merge_saved_adapter

    print(merge_saved_adapter(adapter_dir, merged_dir).summary())  # from the base on disk, shard by shard


def _summary(result: FinetuneResult) -> str:
    def show(metrics: dict[str, float] | None) -> str:
        keys = [k for k in ("loss", "accuracy", "perplexity") if metrics and k in metrics]
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) if keys else "n/a"

    if result.metrics_split == "eval":
        lines = [f"eval before: {show(result.metrics_before)}"] if result.metrics_before else []
        lines.append(f"eval after:  {show(result.metrics)}")
    else:
        lines = [f"last training step (no eval data): {show(result.metrics)}"]
    lines.append(f"adapter saved to {result.adapter_dir}")
    if result.merged_dir:
        lines.append(f"merged model saved to {result.merged_dir}")
    lines.append(f"try it: tunekit generate {result.adapter_dir} --prompt \"...\"")
    return "\n".join(lines)


def finetune(config: FinetuneConfig | Mapping[str, Any] | str | Path, overrides: Iterable[str] = ()) -> FinetuneResult:
    """Run one fine-tuning job as ``config`` (a FinetuneConfig, a dict, or a YAML path) describes.

    Under a multi-process launcher every process calls it (``distributed.strategy`` says how they
    share the work); each returns the same result, rank 0 alone writes files and prints.

    Args:
        config: the run config.
        overrides: dotted ``key=value`` strings applied on top (as on the command line).

    Returns:
        The metrics and where the adapter, merged model and logs went.

    Raises:
        ConfigError: the config is invalid or asks for what cannot run here (nothing has run yet).
        ValueError: the model, data or resume checkpoint cannot be used (one line naming the key);
            the run folder is left as it was.
    """
    from tunekit.auto_strategy import start_strategy

    cfg = load_config(config, overrides)
    # Joins the job's processes before anything loads; distributed.strategy auto is resolved there,
    # the same on every rank.
    cfg, strategy, auto_line = start_strategy(cfg)
    try:
        return _run(cfg, strategy, auto_line)
    finally:
        strategy.close()  # not a collective: safe after an error on another rank


def _run(cfg: FinetuneConfig, strategy, auto_line: str | None = None) -> FinetuneResult:
    from tunekit.train import Trainer

    out, main = Path(cfg.output.dir), strategy.is_main
    if auto_line and main:
        print(auto_line)
    note = check_position_limit(cfg)  # data.max_seq_len against the model's positions, before anything loads
    if note and main:
        print(note)
    with tempfile.TemporaryDirectory(prefix="tunekit-") as scratch:
        setup = _setup(cfg, out, Path(scratch), strategy)
        trainer = Trainer(setup.model, setup.data, cfg.train, out, strategy=strategy,
                          run_config=cfg.model_dump(mode="json"))
        config_file = _write_run_files(cfg, out, setup, strategy, auto_line)
    data = setup.data
    has_eval = data.eval is not None and len(data.eval) > 0
    before = trainer.evaluate() if cfg.output.eval_before and has_eval else None
    trained = trainer.fit(eval_before=before)
    if trained.interrupted:
        # A half-trained adapter must not look like the run's result: keep only the checkpoint.
        if main:
            print(f"interrupted at step {trained.global_step}; run the same command again to resume "
                  f"from {trained.checkpoint_dir}")
        return FinetuneResult(metrics={}, metrics_before=before, output_dir=out, adapter_dir=out / "adapter",
                              merged_dir=None, metrics_file=trained.metrics_file, config_file=config_file,
                              train=trained, interrupted=True)
    last_train = next((h for h in reversed(trained.history) if h.get("split") == "train"), None)
    last_train = {k: v for k, v in (last_train or {}).items() if k != "split"}
    after = trained.final_metrics
    adapter_dir = _save(out, setup, strategy)
    merged_dir = out / "merged" if cfg.output.save_merged else None
    if merged_dir is not None and main:
        _save_merged(adapter_dir, merged_dir)
    metrics = dict(after) if after is not None else {k: v for k, v in last_train.items() if k != "step"}
    result = FinetuneResult(metrics=metrics, metrics_before=before, output_dir=out, adapter_dir=adapter_dir,
                            merged_dir=merged_dir, metrics_file=trained.metrics_file, config_file=config_file,
                            train=trained, metrics_split="eval" if after is not None else "train")
    # results.json, curves, model cards, tokenizer + template, relocatable base paths: rank 0
    notes = report_run(cfg, result, setup.tokenizer, is_main_process=main)
    if main:
        print("\n".join([_summary(result), *notes]))
    if cfg.hub.push:  # after the final save: a failed push leaves every file in place
        from tunekit.hub import push_after_finetune

        push_after_finetune(cfg, result, is_main_process=main)  # rank 0 only; the others need not wait
    return result
