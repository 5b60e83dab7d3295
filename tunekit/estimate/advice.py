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


def _fixes(spec: Any, settings: Any, devices: Any) -> Iterator[tuple[tuple[str, str], Any, Any, Any]]:
    """((what to change as ``tunekit estimate`` flags, as finetune config keys), spec, settings, devices)."""
    from tunekit.models.config import QuantizationConfig

    shape = settings.shape
    if not shape.grad_checkpointing:
        yield ("--grad-checkpointing", "train.gradient_checkpointing=true"), spec, \
            replace(settings, shape=replace(shape, grad_checkpointing=True)), devices
    method = getattr(spec.adapter, "method", None)
    if method == "lora" and spec.quantization is None:
        yield ("QLoRA (--method qlora: 4-bit NF4 base)", "QLoRA (model.quantization={bits: 4})"), \
            replace(spec, quantization=QuantizationConfig()), settings, devices
    if method is None:
        from tunekit.adapters import LoRAConfig

        yield ("LoRA instead of full fine-tuning (--method lora)", "LoRA instead of full fine-tuning "
               "(adapter.method=lora)"), replace(spec, adapter=LoRAConfig()), settings, devices
    if settings.optimizer == "adamw":
        yield ("--optimizer adamw_8bit", "train.optimizer=adamw_8bit"), spec, \
            replace(settings, optimizer="adamw_8bit"), devices
    if shape.batch > 1:
        half = max(1, shape.batch // 2)
        yield (f"--batch {half} (more gradient accumulation)", f"train.batch_size={half} (more "
               "train.grad_accum_steps)"), spec, replace(settings, shape=replace(shape, batch=half)), devices
    elif shape.seq_len >= 256:
        half = shape.seq_len // 2
        yield (f"--seq-len {half}", f"data.max_seq_len={half}"), spec, \
            replace(settings, shape=replace(shape, seq_len=half)), devices
    more = 2 * devices.count
    yield (f"--gpus {more}", f"{more} processes (--nproc {more}, one GPU each)"), spec, settings, \
        replace(devices, count=more)


def advise(result: Any, spec: Any, allowed: Any = None, *, config_keys: bool = False) -> list[str]:
    """Lines naming the dominant term of the smallest peak and each fix that makes some layout fit.

    ``allowed`` (a ``LayoutFilter``) limits the layouts a fix may make fit, as in ``plan``;
    ``config_keys`` names the fixes as finetune config keys instead of ``tunekit estimate`` flags.
    """
    from tunekit.estimate.planner import plan

    supported = [r for r in result.rows if r.supported]
    if not supported:
        return []
    best = min(supported, key=lambda r: r.peak)
    term, size = max(best.terms().items(), key=lambda kv: kv[1])
    lines = [f"dominant term: {term} ({format_bytes(size)} of {format_bytes(best.peak)} under {best.layout.label})"]
    for names, new_spec, new_settings, new_devices in _fixes(spec, result.settings, result.devices):
        what = names[config_keys]
        try:
            fixed = plan(new_spec, new_settings, new_devices, tp_sizes=[], advise=False, allowed=allowed)
        except ValueError:
            continue
        if fixed.recommended is not None:
            lines.append(f"{what}: {fixed.recommended.layout.label} fits at {format_bytes(fixed.recommended.peak)}")
    if len(lines) == 1:
        lines.append("no single change fits; combine them (e.g. QLoRA with checkpointing) or use larger GPUs")
    return lines
