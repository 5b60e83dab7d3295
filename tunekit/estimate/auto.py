"""``distributed.strategy: auto``: the cheapest strategy the planner finds to fit, among those this job can run.

    finetune config --from_finetune_config--> (model + adapter, batch settings)
    the job's devices (Devices.detect(processes=world, per_node=local world))
        --plan(..., allowed=can this job run it?)--> first row that fits -> the distributed fields

The planner (``tunekit.estimate.planner``) lists every layout cheapest first;
``auto`` takes the first that fits among those this job can start: a strategy
in ``AUTO_STRATEGIES``, ``none`` on one process and a multi-process one on
several, DeepSpeed only when installed, and nothing ``config_problem`` refuses
for the run's method and base. A strategy ``tunekit.distributed`` learns later
(tensor parallelism: "tp", "fsdp_tp") joins ``auto`` by one entry there: the
planner already plans it and ``Layout.config()`` already names its fields.

``choose_strategy`` is a pure function of the config and the devices, so every
rank that calls it with the same inputs gets the same answer; ``tunekit.auto_strategy``
makes sure the inputs are the same (rank 0 decides from every rank's devices and
broadcasts the result before any mesh or sharding exists).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.estimate.planner import Breakdown, Devices, Layout, Plan, plan
from tunekit.estimate.units import format_bytes

__all__ = ["AUTO_STRATEGIES", "AutoChoice", "choose_strategy", "layout_problem", "reuse_saved_strategy"]

AUTO_STRATEGIES = ("none", "ddp", "fsdp", "deepspeed")
"""The planner's layouts (``Layout.strategy``) that ``auto`` may pick: the ones ``tunekit.distributed`` runs."""

DECIDED_FIELDS = {"strategy": "none", "cpu_offload": False, "reshard_after_forward": True}
"""``distributed`` fields auto sets (a layout's ``config()`` adds any others it needs, e.g. ``tp_size``)."""

_METHODS = {"lora": "LoRA", "dora": "DoRA", "prefix": "prefix tuning", "prompt": "prompt tuning",
            "bottleneck": "bottleneck adapters", "full": "full fine-tuning"}


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` resolved to and why."""

    distributed: dict[str, Any]
    """The ``distributed`` fields to set (strategy and its options)."""
    line: str
    """The one line the run logs: ``distributed.strategy auto -> fsdp: ...``."""
    peaks: dict[str, int] = field(default_factory=dict)
    """Estimated per-device peak (bytes) of every runnable layout considered, by label."""


def layout_problem(layout: Layout, devices: Devices, cfg: Any) -> str | None:
    """Why this job (``devices.count`` processes, ``cfg``'s method and base) cannot run ``layout``, or None."""
    from tunekit.distributed.checks import config_problem
    from tunekit.distributed.options import DistributedOptions

    if layout.strategy not in AUTO_STRATEGIES:
        return f"strategy {layout.strategy} is not available in this version"
    if layout.strategy == "none" and devices.count > 1:
        return f"strategy none runs one process, not {devices.count}"
    if layout.strategy != "none" and devices.count == 1:
        return f"strategy {layout.strategy} needs several processes (tunekit finetune --nproc N)"
    if layout.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install 'tunekit[deepspeed]')"
    distributed = cfg.distributed.model_copy(update={**DECIDED_FIELDS, **layout.config()})
    options = DistributedOptions.from_configs(distributed, cfg.train)
    quantization = cfg.model.quantization
    return config_problem(options, cfg.adapter.method, None if quantization is None else f"{quantization.bits}bit",
                          fused_cross_entropy=cfg.train.fused_cross_entropy)


def _fields(layout: Layout) -> dict[str, Any]:
    return {**DECIDED_FIELDS, **layout.config()}


def _shown(layout: Layout) -> str:
    """``fsdp`` / ``fsdp cpu_offload=true``: the strategy and the options it sets away from their defaults."""
    options = layout.config()
    extra = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items() if k != "strategy"]
    return " ".join([options["strategy"], *extra])


def _job(devices: Devices) -> str:
    kind = "GPU" if devices.kind == "cuda" else "CPU process"
    many = "" if devices.count == 1 else "es" if kind.endswith("s") else "s"
    return (f"{devices.count} {kind}{many} of {format_bytes(devices.memory)} ({format_bytes(devices.usable)} usable "
            f"after {devices.headroom:.0%} headroom)")


def _what(result: Plan, cfg: Any) -> str:
    model = result.model
    method = _METHODS.get(model["method"], model["method"])
    if model["quantized"] and model["method"] == "lora":
        method = "QLoRA"
    source = cfg.model.name_or_path
    name = Path(source).name if source and Path(source).expanduser().exists() else source
    name = name or f"{cfg.model.model_type} (model.from_config)"
    return f"{method} on {name} ({_count(model['parameters'])} parameters)"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _per(devices: Devices) -> str:
    return "GPU" if devices.kind == "cuda" else "process"


def _label(layout: Layout, devices: Devices) -> str:
    return "one process" if layout.strategy == "none" and devices.kind == "cpu" else layout.label


def _chosen_line(result: Plan, cfg: Any) -> str:
    chosen = result.recommended
    per = _per(result.devices)
    others = [r for r in result.rows if r is not chosen and r.supported]
    skipped = [f"{format_bytes(r.peak)} with {_shown(r.layout)}" for r in others
               if result.rows.index(r) < result.rows.index(chosen)]
    why = f" (cheaper layouts need {', '.join(skipped)})" if skipped else ""
    return (f"distributed.strategy auto -> {_shown(chosen.layout)}: {_what(result, cfg)} needs "
            f"{format_bytes(chosen.peak)} per {per} with {_label(chosen.layout, result.devices)}{why}, on {_job(result.devices)}")


def _nothing_fits(result: Plan, spec: Any, cfg: Any) -> str:
    from tunekit.estimate.advice import advise

    best: Breakdown | None = min((r for r in result.rows if r.supported), key=lambda r: r.peak, default=None)
    if best is None:
        return f"distributed.strategy=auto: no strategy tunekit runs can train this model on {_job(result.devices)}"
    allowed = lambda layout, devices: layout_problem(layout, devices, cfg) is None  # noqa: E731
    advice = advise(result, spec, allowed, config_keys=True)
    return (f"distributed.strategy=auto: nothing fits: {_what(result, cfg)} needs at least {format_bytes(best.peak)} "
            f"per {_per(result.devices)} ({_label(best.layout, result.devices)}) on {_job(result.devices)}; " + "; ".join(advice))


def choose_strategy(cfg: Any, devices: Devices) -> AutoChoice:
    """The strategy ``auto`` resolves to for finetune config ``cfg`` on ``devices``.

    Raises:
        ValueError: one line: no strategy this job can run fits (the estimated need, the
            dominant term and each single change that would fit), or none can run at all.
    """
    from tunekit.estimate.inputs import from_finetune_config

    spec, settings, _ = from_finetune_config(cfg)
    problems = {}

    def allowed(layout: Layout, on: Devices) -> bool:
        problem = layout_problem(layout, on, cfg)
        if on == devices and problem and layout.strategy in AUTO_STRATEGIES:
            problems.setdefault(layout.strategy, problem)
        return problem is None

    result = plan(spec, settings, devices, advise=False, allowed=allowed)
    if not result.rows:
        reasons = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise ValueError(f"distributed.strategy=auto: no strategy can run this config on {_job(devices)} ({reasons})")
    if result.recommended is None:
        raise ValueError(_nothing_fits(result, spec, cfg))
    return AutoChoice(_fields(result.recommended.layout), _chosen_line(result, cfg),
                      {r.layout.label: r.peak for r in result.rows if r.supported})


def reuse_saved_strategy(cfg: Any, devices: Devices, saved: dict[str, Any], checkpoint: Path) -> AutoChoice | None:
    """The checkpoint's strategy when this job can run it (a resume keeps its strategy), else None."""
    names = {k: saved[k] for k in DECIDED_FIELDS if k in saved}
    if names.get("strategy") in (None, "auto"):
        return None
    layout = Layout(names["strategy"], bool(names.get("cpu_offload", False)), int(saved.get("tp_size", 1) or 1),
                    bool(names.get("reshard_after_forward", True)))
    if layout_problem(layout, devices, cfg) is not None:
        return None
    return AutoChoice(_fields(layout), f"distributed.strategy auto -> {_shown(layout)}: as the checkpoint it resumes "
                              f"({checkpoint}) ran, on {_job(devices)}")
