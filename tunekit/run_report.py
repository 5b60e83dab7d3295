"""What a finished run leaves behind so that it explains itself (``finetune`` calls ``report_run`` once).

In the run folder (``output.dir``)::

    results.json            eval metrics before / after, the last training step, and ``train``: the
                            summary line's facts (steps, epochs, seconds, tokens/s, peak memory, hardware)
    training_curves.png     loss (and accuracy / perplexity when evaluated) against the step
    adapter/README.md       the model card ``tunekit push`` builds, for the folder on disk
    adapter/tokenizer*      the tokenizer, with the chat template training used (vLLM / transformers read it)
    merged/README.md        the same for the merged model (``output.save_merged``), whose tokenizer gets
                            the template too

and the adapter records its base by Hub id, ``pkg:``, or a path relative to the
adapter folder when the base lives inside the run (``../base``), so the run folder
can be moved or copied. Everything here runs on the main process only: pass
``is_main_process`` (nothing inside is a collective).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["CURVES_FILE", "report_run", "train_stats"]

CURVES_FILE = "training_curves.png"


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def train_stats(trained) -> dict[str, Any]:
    """The summary line's facts from a ``TrainResult`` (also the card's "Hardware and time")."""
    return {"steps": trained.global_step, "epochs": round(trained.epochs_completed, 4),
            "train_seconds": round(trained.train_seconds, 1), "tokens_per_second": round(trained.tokens_per_second, 1),
            "peak_memory_mib": round(trained.peak_memory_mib), "hardware": _hardware()}


def _write_results(result, stats: dict[str, Any]) -> None:
    history = result.train.history
    last = next((h for h in reversed(history) if h.get("split") == "train"), None)
    results = {"before": result.metrics_before, "after": result.train.final_metrics,
               "last_train_step": {k: v for k, v in (last or {}).items() if k != "split"}, "train": stats}
    (result.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _relative_to(folder: Path, value: Any, run: Path) -> Any:
    """``value`` as a path relative to ``folder`` when it is a local path inside ``run``."""
    if not isinstance(value, str) or not Path(value).is_absolute():
        return value
    path, root = Path(value).resolve(), run.resolve()
    if path != root and root not in path.parents:
        return value
    return os.path.relpath(path, folder.resolve())


def make_relocatable(adapter_dir: Path, run: Path) -> None:
    """Rewrite the base paths an adapter records (``tunekit_base.json``, PEFT's ``base_model_name_or_path``)
    that point inside the run folder as paths relative to their adapter folder."""
    from tunekit.api import BASE_INFO_NAME

    for config_file in adapter_dir.rglob("adapter_config.json"):
        folder = config_file.parent
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        if saved.get("base_model_name_or_path"):
            saved["base_model_name_or_path"] = _relative_to(folder, saved["base_model_name_or_path"], run)
            config_file.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        record_file = folder / BASE_INFO_NAME
        if record_file.is_file():
            record = json.loads(record_file.read_text(encoding="utf-8"))
            for key in ("name_or_path", "tokenizer"):
                record["model"][key] = _relative_to(folder, record["model"].get(key), run)
            record_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _save_tokenizer(cfg, tokenizer, folders: list[Path]) -> None:
    """The tokenizer beside the adapter / merged model, with the run's chat template set (chat runs and
    instruction runs through a template), so loaders outside tunekit render prompts as training did."""
    templated = cfg.data.format == "chat" or (cfg.data.format == "instruction" and cfg.data.chat_template)
    if templated and not cfg.data.sources:
        from tunekit.data.templates import resolve_chat_template

        tokenizer.chat_template = resolve_chat_template(cfg.data.chat_template, tokenizer)
    for folder in folders:
        tokenizer.save_pretrained(folder)


def _plot(out: Path, notes: list[str]) -> str | None:
    try:
        from tunekit.plot import metric_series, plot_metrics, read_metrics
    except ImportError:
        return None
    records = read_metrics(out)
    shown = [m for m in ("loss", "accuracy", "perplexity")
             if any(metric_series(records, m, s)[0] for s in ("train", "eval"))]
    try:
        plot_metrics(out, out / CURVES_FILE, metrics=shown or ("loss",))
    except ImportError:
        notes.append("no training_curves.png: matplotlib is not installed (pip install matplotlib)")
        return None
    except ValueError:  # nothing was logged
        return None
    return CURVES_FILE


def _cards(cfg, result, stats: dict[str, Any], image: str | None) -> None:
    from tunekit.adapter_check import recorded_base
    from tunekit.hub.card import adapter_spec, local_card, merged_spec
    from tunekit.hub.manifest import hub_id_or_none

    out = result.output_dir
    base_id = cfg.hub.base_model or hub_id_or_none(cfg.model.name_or_path if not cfg.model.from_config else None)
    local_base = None if base_id else (cfg.model.name_or_path or "a random model.from_config base (base/)")
    picture = f"../{image}" if image else None
    spec = adapter_spec(result.adapter_dir, out, str(result.adapter_dir), base_id, train_stats=stats, local=True,
                        local_base=local_base, image=picture)
    (result.adapter_dir / "README.md").write_text(local_card(spec), encoding="utf-8")
    if result.merged_dir is not None:
        task = recorded_base(result.adapter_dir)[0]
        spec = merged_spec(out, str(result.merged_dir), base_id, task, train_stats=stats, local=True,
                           local_base=local_base, image=picture)
        (result.merged_dir / "README.md").write_text(local_card(spec), encoding="utf-8")


def report_run(cfg, result, tokenizer, *, is_main_process: bool = True) -> list[str]:
    """Write results.json, the curves, the tokenizer with its template and the cards; returns lines to show."""
    if not is_main_process:
        return []
    notes: list[str] = []
    stats = train_stats(result.train)
    _write_results(result, stats)
    make_relocatable(result.adapter_dir, result.output_dir)
    _save_tokenizer(cfg, tokenizer, [f for f in (result.adapter_dir, result.merged_dir) if f is not None])
    image = _plot(result.output_dir, notes)
    _cards(cfg, result, stats, image)
    if image:
        notes.append(f"training curves: {result.output_dir / image}")
    notes.append(f"model card: {result.adapter_dir / 'README.md'}")
    return notes
