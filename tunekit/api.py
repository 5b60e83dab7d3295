"""``tunekit.finetune``: one call from a config to a trained, saved adapter.

    config -> validate -> load model + tokenizer -> build data -> inject adapter
           -> evaluate (before) -> Trainer.fit -> save adapter [+ merged model]

Everything is validated before the model loads. The run folder
(``output.dir``) gets::

    resolved_config.yaml     the config as run (loads back to the same config)
    adapter/                 the adapter (PEFT's format where the method allows) + tunekit_base.json
    merged/                  base with the adapter merged in (output.save_merged)
    base/                    the random-initialised base (model.from_config only)
    metrics.jsonl            the trainer's log; results.json: metrics before/after

Example:
    >>> from tunekit import finetune
    >>> result = finetune("cookbook/quickstart.yaml")  # doctest: +SKIP
    >>> result.metrics["accuracy"] > result.metrics_before["accuracy"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunekit.config import FinetuneConfig, config_to_yaml, load_config, task_for

__all__ = ["BASE_INFO_NAME", "FinetuneResult", "finetune"]

# Written beside adapter_config.json: how to rebuild the base model (source,
# dtype, task head, label names), which PEFT's config does not record.
BASE_INFO_NAME = "tunekit_base.json"


@dataclass(frozen=True)
class FinetuneResult:
    """What a run produced."""

    metrics: dict[str, float]
    """Final evaluation metrics (the last training-step metrics when there is no eval data)."""
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


def _check_runnable(cfg: FinetuneConfig) -> None:
    # Config sections that exist for the whole toolkit but have no engine behind
    # `finetune` in this version fail here, before anything heavy runs.
    if cfg.distributed.strategy != "none":
        raise ValueError(f"distributed.strategy={cfg.distributed.strategy!r} is not wired into finetune in this "
                         "version; use distributed.strategy: none")
    if cfg.hub.push:  # offline, no token, bad repo id, no write access: fail now, not after training
        from tunekit.hub import check_push_config

        check_push_config(cfg.hub)


def _base_record(cfg: FinetuneConfig, out: Path, model, tokenizer, task: str, labels) -> dict[str, Any]:
    """The base-model record for ``tunekit_base.json``; saves a from_config base under out/base."""
    model_cfg = cfg.model.model_dump(mode="json")
    if cfg.model.from_config:
        # Random weights exist only in this process: keep them, or the adapter is useless.
        base_dir = (out / "base").resolve()
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        model.config._name_or_path = str(base_dir)  # recorded as base_model_name_or_path
        model_cfg.update(name_or_path=str(base_dir), tokenizer=None, from_config=False, model_type=None,
                         config_overrides={})
    elif cfg.model.name_or_path and Path(cfg.model.name_or_path).expanduser().exists():
        model_cfg["name_or_path"] = str(Path(cfg.model.name_or_path).expanduser().resolve())
    if model_cfg.get("tokenizer") and Path(model_cfg["tokenizer"]).expanduser().exists():
        model_cfg["tokenizer"] = str(Path(model_cfg["tokenizer"]).expanduser().resolve())
    return {"model": model_cfg, "task": task, "label_names": labels, "data": cfg.data.model_dump(mode="json")}


def _setup(cfg: FinetuneConfig, out: Path):
    from tunekit.adapters import inject_adapters, trainable_parameters
    from tunekit.data import build_dataset, label_names_for
    from tunekit.models import load_model

    task = task_for(cfg)
    labels = label_names_for(cfg.data) if task == "seq_cls" else None
    torch.manual_seed(cfg.train.seed)  # a new head's init is part of the run
    model, tokenizer = load_model(cfg.model, task=task, label_names=labels)
    data = build_dataset(cfg.data, tokenizer, seed=cfg.train.seed)
    base = _base_record(cfg, out, model, tokenizer, task, labels)
    report = inject_adapters(model, cfg.adapter)
    print(f"adapter {report.method}: wrapped {len(report.wrapped)} modules; {trainable_parameters(model)}")
    print(data.stats.summary())
    return model, tokenizer, data, base


def _save(cfg: FinetuneConfig, out: Path, model, tokenizer, base: dict) -> tuple[Path, Path | None]:
    from tunekit.adapters import eject_adapters, save_adapters

    adapter_dir = out / "adapter"
    save_adapters(model, adapter_dir)
    (adapter_dir / BASE_INFO_NAME).write_text(json.dumps(base, indent=2) + "\n")
    if not cfg.output.save_merged:
        return adapter_dir, None
    merged_dir = out / "merged"
    eject_adapters(model, merge=True).save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return adapter_dir, merged_dir


def _summary(result: FinetuneResult) -> str:
    def show(metrics: dict[str, float] | None) -> str:
        keys = [k for k in ("loss", "accuracy", "perplexity") if metrics and k in metrics]
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) if keys else "n/a"

    lines = [f"eval before: {show(result.metrics_before)}"] if result.metrics_before else []
    lines += [f"eval after:  {show(result.metrics)}", f"adapter saved to {result.adapter_dir}"]
    if result.merged_dir:
        lines.append(f"merged model saved to {result.merged_dir}")
    lines.append(f"try it: tunekit generate {result.adapter_dir} --prompt \"...\"")
    return "\n".join(lines)


def finetune(config: FinetuneConfig | Mapping[str, Any] | str | Path, overrides: Iterable[str] = ()) -> FinetuneResult:
    """Run one fine-tuning job as ``config`` (a FinetuneConfig, a dict, or a YAML path) describes.

    Args:
        config: the run config.
        overrides: dotted ``key=value`` strings applied on top (as on the command line).

    Returns:
        The metrics and where the adapter, merged model and logs went.

    Raises:
        ConfigError: the config is invalid (nothing has run yet).
        ValueError: the model or data cannot be loaded (one line naming the key).
    """
    from tunekit.train import Trainer

    cfg = load_config(config, overrides)
    _check_runnable(cfg)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "resolved_config.yaml"
    config_file.write_text(config_to_yaml(cfg))
    model, tokenizer, data, base = _setup(cfg, out)
    trainer = Trainer(model, data, cfg.train, out)
    has_eval = data.eval is not None and len(data.eval) > 0
    before = trainer.evaluate() if cfg.output.eval_before and has_eval else None
    trained = trainer.fit()
    if trained.interrupted:
        # A half-trained adapter must not look like the run's result: keep only the checkpoint.
        print(f"interrupted at step {trained.global_step}; run the same command again to resume "
              f"from {trained.checkpoint_dir}")
        return FinetuneResult(metrics={}, metrics_before=before, output_dir=out, adapter_dir=out / "adapter",
                              merged_dir=None, metrics_file=trained.metrics_file, config_file=config_file,
                              train=trained, interrupted=True)
    after = trained.final_metrics or (trained.history[-1] if trained.history else {})
    adapter_dir, merged_dir = _save(cfg, out, model, tokenizer, base)
    (out / "results.json").write_text(json.dumps({"before": before, "after": after}, indent=2) + "\n")
    result = FinetuneResult(metrics=dict(after), metrics_before=before, output_dir=out, adapter_dir=adapter_dir,
                            merged_dir=merged_dir, metrics_file=trained.metrics_file, config_file=config_file,
                            train=trained)
    print(_summary(result))
    if cfg.hub.push:  # after the final save: a failed push leaves every file in place
        from tunekit.hub import push_after_finetune

        push_after_finetune(cfg, result)
    return result
