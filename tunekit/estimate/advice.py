"""What would make a run fit when no layout does: the dominant term, and fixes tried one at a time.

Each fix is planned again (without tensor-parallel rows, to stay quick) and
reported with the layout it makes fit, so the advice is a result, not a rule
of thumb: "--grad-checkpointing: FSDP2 ZeRO-3 fits at 61.2 GiB".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from tunekit.estimate.units import format_bytes

__all__ = ["advise"]


def _fixes(spec: Any, settings: Any, devices: Any) -> Iterator[tuple[str, Any, Any, Any]]:
    """(what to change, spec, settings, devices) for every applicable fix."""
    from tunekit.models.config import QuantizationConfig

    shape = settings.shape
    if not shape.grad_checkpointing:
        yield "--grad-checkpointing", spec, replace(settings, shape=replace(shape, grad_checkpointing=True)), devices
    method = getattr(spec.adapter, "method", None)
    if method == "lora" and spec.quantization is None:
        yield "QLoRA (--method qlora: 4-bit NF4 base)", replace(spec, quantization=QuantizationConfig()), \
            settings, devices
    if method is None:
        from tunekit.adapters import LoRAConfig

        yield "LoRA instead of full fine-tuning (--method lora)", replace(spec, adapter=LoRAConfig()), settings, \
            devices
    if settings.optimizer == "adamw":
        yield "--optimizer adamw_8bit", spec, replace(settings, optimizer="adamw_8bit"), devices
    if shape.batch > 1:
        yield f"--batch {max(1, shape.batch // 2)} (more gradient accumulation)", spec, \
            replace(settings, shape=replace(shape, batch=max(1, shape.batch // 2))), devices
    elif shape.seq_len >= 256:
        yield f"--seq-len {shape.seq_len // 2}", spec, replace(settings, shape=replace(shape, seq_len=shape.seq_len // 2)), \
            devices
    yield f"--gpus {2 * devices.count}", spec, settings, replace(devices, count=2 * devices.count)


def advise(result: Any, spec: Any) -> list[str]:
    """Lines naming the dominant term of the smallest peak and each fix that makes some layout fit."""
    from tunekit.estimate.planner import plan

    supported = [r for r in result.rows if r.supported]
    if not supported:
        return []
    best = min(supported, key=lambda r: r.peak)
    term, size = max(best.terms().items(), key=lambda kv: kv[1])
    lines = [f"dominant term: {term} ({format_bytes(size)} of {format_bytes(best.peak)} under {best.layout.label})"]
    for what, new_spec, new_settings, new_devices in _fixes(spec, result.settings, result.devices):
        try:
            fixed = plan(new_spec, new_settings, new_devices, tp_sizes=[], advise=False)
        except ValueError:
            continue
        if fixed.recommended is not None:
            lines.append(f"{what}: {fixed.recommended.layout.label} fits at {format_bytes(fixed.recommended.peak)}")
    if len(lines) == 1:
        lines.append("no single change fits; combine them (e.g. QLoRA with checkpointing) or use larger GPUs")
    return lines
