"""The measured peak of a real tunekit training step, to hold the estimate against.

``measure_training_step`` runs ``tunekit.train.Trainer.train_step`` (autocast,
token-weighted backward, clipping, optimizer step, ``zero_grad``) on one
micro-batch: once to create the optimizer state, then once measured. The
measure is what the allocator holds, not the process's RSS (which includes the
import footprint and freed-but-cached pages):

- on a GPU: ``torch.cuda.max_memory_allocated()`` over the step;
- on a CPU: the tensors alive before the step (parameters, buffers,
  quantization tables, optimizer state) plus the highest running sum of the
  allocation and free events the PyTorch profiler records during the step
  (``profile_memory=True``: every CPU allocation of the step, at its size).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Measurement", "check_estimate", "measure_training_step", "padded_batch", "real_model", "resident_bytes"]


@dataclass(frozen=True)
class Measurement:
    """Bytes of one measured training step."""

    peak: int
    """Most bytes allocated at once during the step (resident tensors included)."""
    resident: int
    """Allocated before the step: weights, buffers, quantization tables, optimizer state."""
    how: str
    """cuda | profiler."""


def _quant_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    state = getattr(param, "quant_state", None)
    if state is None:
        scales = getattr(param, "SCB", None)
        return [scales] if isinstance(scales, torch.Tensor) else []
    nested = getattr(state, "state2", None)
    tensors = [state.absmax, state.code, state.offset]
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages behind ``model``'s tensors (and ``optimizer``'s state)."""
    tensors: list[torch.Tensor] = [*model.buffers()]
    for param in model.parameters():
        tensors += [param, *_quant_tensors(param)] + ([param.grad] if param.grad is not None else [])
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _allocation_events(prof: Any) -> list[tuple[int, int]]:
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.typed[0] == _EventType.Allocation:
            events.append((event.start_time_ns, event.typed[1].alloc_size))
        stack.extend(event.children)
    return sorted(events)


def _profiled_step_peak(step: Any) -> int:
    """Highest running total of the bytes allocated (minus freed) while ``step()`` runs on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for _, size in _allocation_events(prof):
        live += size
        peak = max(peak, live)
    return peak


class _Rows:
    """The data bundle ``Trainer`` reads, holding one collated micro-batch."""

    def __init__(self, batch: dict[str, torch.Tensor], task: str) -> None:
        self.batch, self.task, self.eval = batch, task, None
        self.train = list(range(next(iter(batch.values())).shape[0]))
        self.forward_kwargs = {"use_cache": False} if "position_ids" in batch else {}

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {k: v[rows].clone() for k, v in self.batch.items()}  # a fresh batch per step, as a collate makes

    def train_order(self, epoch: int, seed: int, step_rows: int | None = None) -> list[int]:
        return list(self.train)


def measure_training_step(model: nn.Module, batch: dict[str, torch.Tensor], task: str, train_cfg: Any) -> Measurement:
    """Peak bytes of the second ``Trainer.train_step`` of ``model`` on ``batch`` (one micro-batch).

    Args:
        model: adapters injected (or every weight trainable), on the device to measure.
        batch: a collated micro-batch with ``labels``.
        task: causal_lm | seq_cls | seq2seq.
        train_cfg: the ``TrainConfig`` (optimizer, precision, checkpointing, fused loss).
    """
    from tunekit.distributed.data import MicroBatch
    from tunekit.train import Trainer

    data = _Rows(batch, task)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, data, train_cfg, out)
        window = [MicroBatch(data.train)]  # one optimizer step of one micro-batch
        trainer.train_step(window)  # creates the optimizer state
        if torch.cuda.is_available() and next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            trainer.train_step(window)
            torch.cuda.synchronize()
            return Measurement(torch.cuda.max_memory_allocated(), resident, "cuda")
        resident = resident_bytes(model, trainer.optimizer.optimizer
                                  if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer)
        step_peak = _profiled_step_peak(lambda: trainer.train_step(window))
        return Measurement(resident + step_peak, resident, "profiler")


def real_model(spec: Any, device: str = "cpu", seed: int = 0) -> nn.Module:
    """The model of ``spec`` with random weights, built as ``tunekit.load_model`` would, adapter injected.

    A quantized spec is saved to a temporary folder and loaded back through
    transformers' bitsandbytes path (quantization needs weights), then prepared
    as tunekit prepares it.
    """
    from tunekit.adapters import inject_adapters
    from tunekit.estimate.model import DTYPES, auto_class, bnb_config, replica_config
    from tunekit.models.loading import prepare_quantized

    auto = auto_class(spec.task)
    kwargs = {"attn_implementation": spec.attn} if spec.attn else {}
    torch.manual_seed(seed)
    model = auto.from_config(replica_config(spec, None, 1), dtype=DTYPES[spec.dtype], **kwargs)
    if spec.quantization is not None:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = auto.from_pretrained(folder, dtype=DTYPES[spec.dtype], quantization_config=bnb_config(
                spec.quantization), **kwargs)
        prepare_quantized(model)
    if spec.kernels:
        from tunekit.models.kernels import apply_kernels

        apply_kernels(model)
    model.to(device)
    if spec.adapter is None:
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        inject_adapters(model, spec.adapter)
    return model


def padded_batch(task: str, shape: Any, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A micro-batch of ``shape`` whose last row ends in padding (what real batches have), or packed rows."""
    g = torch.Generator().manual_seed(seed)
    b, t = shape.batch, shape.seq_len
    ids = torch.randint(0, vocab, (b, t), generator=g)
    batch = {"input_ids": ids}
    labels = ids.clone()
    if shape.packed:  # two examples per row: positions restart, as tunekit's packing writes them
        half = t // 2
        batch["position_ids"] = torch.cat([torch.arange(half), torch.arange(t - half)]).repeat(b, 1)
    elif shape.padded:
        mask = torch.ones(b, t, dtype=torch.long)
        mask[-1, t - max(1, t // 8):] = 0
        batch["attention_mask"] = mask
        labels[mask == 0] = -100
    if task == "seq_cls":
        labels = torch.zeros(b, dtype=torch.long)
    elif task == "seq2seq":
        labels = torch.randint(0, vocab, (b, shape.target_len), generator=g)
    return {**batch, "labels": labels}


def check_estimate(spec: Any, settings: Any, device: str = "cpu") -> tuple[int, Measurement]:
    """(estimated single-device peak, measured peak) of one training step of ``spec`` on this machine."""
    from tunekit.estimate.planner import Devices, plan
    from tunekit.train import TrainConfig

    one_device = Devices(1, 2**50, None, 1, "cpu" if device == "cpu" else "cuda", 0.0)
    estimated = plan(spec, settings, one_device, advise=False).rows[0].peak  # the single-device layout
    shape = settings.shape
    train_cfg = TrainConfig(optimizer=settings.optimizer, mixed_precision=shape.mixed_precision,
                            gradient_checkpointing=shape.grad_checkpointing,
                            fused_cross_entropy=shape.fused_cross_entropy)
    model = real_model(spec, device)
    batch = padded_batch(spec.task, shape, spec.config.vocab_size)
    return estimated, measure_training_step(model, batch, spec.task, train_cfg)
