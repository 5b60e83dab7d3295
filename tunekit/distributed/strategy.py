"""The strategy interface: everything device- and process-related the trainer does.

One object per run. ``tunekit.train.Trainer`` drives it like this, on every rank::

    model, optimizer = strategy.prepare(model, build_optimizer)
    for each optimizer step:
        total = strategy.all_reduce_sums({"targets": local_targets})["targets"]
        for i, batch in enumerate(micro_batches):          # the same count on every rank
            with strategy.sync_gradients(i == last), strategy.autocast():
                loss = loss_of(model, strategy.to_device(batch))
            strategy.backward(loss, weight=targets_i / total)
        outcome = strategy.optimizer_step(max_grad_norm)    # global-norm clip + step
        if outcome.stepped: scheduler.step()
        strategy.zero_grad()
        sums = strategy.all_reduce_sums({...loss·targets, targets, tokens, stop...})

``weight`` makes the step's loss the token-weighted mean over the *global*
batch; each strategy turns it into the gradient that mean has (DDP and
DeepSpeed average over ranks, so they multiply by the data-parallel size;
FSDP is set to sum). Subclasses override the hooks marked "per strategy".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tunekit.distributed.mesh import Runtime
from tunekit.distributed.options import DistributedOptions

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class Gathered:
    """Trainable tensors at their global shapes (CPU), and the bytes this rank received to assemble them."""

    tensors: dict[str, torch.Tensor]
    bytes_received: int = 0


@dataclass(frozen=True)
class StepOutcome:
    """What ``optimizer_step`` did: the global gradient norm (before clipping) and whether it stepped."""

    grad_norm: float
    stepped: bool


class Strategy:
    """Single process (``strategy: none``), and the shared machinery of the others."""

    name = "none"
    grad_average_factor = 1
    """How many ranks the engine averages gradients over (DDP, DeepSpeed); the loss is scaled by it."""
    fills_from_rank0 = False
    """Whether ``prepare`` can take a model that only rank 0 holds for real, built on the meta device elsewhere
    (``tunekit.distributed.rank0_fill``); fsdp can."""

    def __init__(self, options: DistributedOptions, runtime: Runtime) -> None:
        if options.mixed_precision == "fp16" and runtime.device.type != "cuda":
            raise ValueError("train.mixed_precision='fp16' needs a CUDA GPU (on a CPU it would silently run fp32); "
                             "use 'bf16' or 'no'")
        self.options, self.runtime = options, runtime
        self.model: nn.Module | None = None
        """The Hugging Face model (sharded in place by fsdp): adapters, names and configs live here."""
        self.wrapped: nn.Module | None = None
        """What forward is called on (a DDP or DeepSpeed wrapper, or the model itself)."""
        self.optimizer: torch.optim.Optimizer | None = None
        self.trainable_shapes: dict[str, torch.Size] = {}
        """Global shape of every trainable parameter, recorded before wrapping (the save checks against it)."""
        self._scaler = torch.amp.GradScaler("cuda") if options.mixed_precision == "fp16" else None
        self.base_on_rank0_only = False
        """Set before ``prepare`` (``tunekit.finetune`` does, where ``loads_base_on_rank0_only``): ranks other than 0
        built the model on the meta device, and every tensor is filled from rank 0's when it is sharded."""

    # ------------------------------------------------------------------ who / where
    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    @property
    def dp_size(self) -> int:
        return self.runtime.dp_size

    @property
    def dp_rank(self) -> int:
        return self.runtime.dp_rank

    def loads_base_on_rank0_only(self, quantized: bool) -> bool:
        """Whether ranks other than 0 should build the base on the meta device (then set ``base_on_rank0_only``).

        A quantized base is loaded by every rank (bitsandbytes' layers are not built on the meta device).
        """
        return (self.fills_from_rank0 and self.options.fill_from_rank0 and self.runtime.world_size > 1
                and not quantized)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module, build_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap ``model`` (adapters injected, base frozen), then build its optimizer.

        The model is never moved whole to one device before wrapping: sharding strategies
        place each shard themselves (so CPU offload and models larger than one device work).
        Trainable tensors are broadcast from rank 0, then every parameter is checked equal
        on all ranks.
        """
        self.trainable_shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable_shapes:
            raise ValueError("the model has no trainable parameters; inject_adapters() first")
        if self.options.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if self.runtime.world_size > 1 and not self.base_on_rank0_only:  # else: all of rank 0's, when sharded
            broadcast_trainable(model, self.device)
            check_replicas_identical(model, self.device)
        self.model = model
        self.wrapped, self.optimizer = self._wrap(model, build_optimizer)
        return self.wrapped, self.optimizer

    def _wrap(self, model: nn.Module, build_optimizer: OptimizerFactory):  # per strategy
        model.to(self.device)
        return model, build_optimizer(model)

    # ------------------------------------------------------------------ one step
    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.options.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager:  # per strategy
        """Around one micro-batch's forward and backward: ``False`` accumulates locally, without communication."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        """Backward of ``loss * weight`` (``weight`` = this micro-batch's share of the global targets)."""
        scaled = loss * (weight * self.grad_average_factor)
        if self._scaler is not None:
            scaled = self._scaler.scale(scaled)
        scaled.backward()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.wrapped.parameters() if p.requires_grad]

    def optimizer_step(self, max_grad_norm: float | None) -> StepOutcome:
        """Clip to ``max_grad_norm`` (the global norm; None: only measure it), then step the optimizer."""
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        norm = clip_global_norm(self.trainable_parameters(), max_grad_norm)
        if self._scaler is None:
            self.optimizer.step()
            return StepOutcome(norm, True)
        scale = self._scaler.get_scale()
        self._scaler.step(self.optimizer)
        self._scaler.update()
        return StepOutcome(norm, self._scaler.get_scale() >= scale)  # a lowered scale: inf/NaN, step skipped

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ agreement across ranks
    def all_reduce_sums(self, values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
        """Each value summed over the data-parallel ranks: one collective and one host read for the whole dict.

        Values may be numbers or 0-d tensors still on the device (a loss sum): they are
        packed there as float64, so nothing waits for the device before the collective.
        """
        keys = sorted(values)
        packed = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=self.device).reshape(())
                              for k in keys])
        if self.runtime.world_size > 1:
            dist.all_reduce(packed, group=self.runtime.dp_group())
        return dict(zip(keys, packed.tolist()))

    def gather_floats(self, value: float) -> list[float]:
        """``value`` from every rank, in rank order (a collective; one rank: ``[value]``)."""
        if self.runtime.world_size == 1:
            return [float(value)]
        out = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in range(self.runtime.world_size)]
        dist.all_gather(out, torch.tensor(float(value), dtype=torch.float64, device=self.device))
        return [float(t) for t in out]

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a run id, anything decided once); picklable values only."""
        if self.runtime.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.runtime.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ state
    def gather_trainable(self) -> Gathered:  # per strategy
        """Every trainable tensor at its global shape, on the CPU, on every rank (collective; frozen ones never travel)."""
        return Gathered({n: p.detach().to("cpu").clone() for n, p in self.model.named_parameters() if p.requires_grad})

    def snapshot_trainable(self) -> dict[str, torch.Tensor]:
        """A copy of this rank's trainable tensors as they are held (shards stay shards); no communication."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore_trainable(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Put a ``snapshot_trainable`` copy back (early stopping's best weights)."""
        params = dict(self.model.named_parameters())
        for name, value in snapshot.items():
            params[name].copy_(value)

    def save_state(self, folder) -> None:  # per strategy
        """Write the trainable parameters and the optimizer state to the DCP folder ``folder`` (collective)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from tunekit.distributed.checkpoint import save_dcp, trainable_model_state

        save_dcp(folder, {"model": trainable_model_state(self.model, self.wrapped),
                          "optim": get_optimizer_state_dict(self.wrapped, self.optimizer)})

    def load_state(self, folder) -> None:  # per strategy
        """Inverse of ``save_state``, from a folder written on any number of processes under any strategy.

        Raises:
            ValueError: the checkpoint lacks a trainable tensor of this model or holds one it lacks.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from tunekit.distributed.checkpoint import check_trainable_fit, load_dcp, trainable_model_state

        check_trainable_fit(folder, self.model, self.trainable_shapes)
        # The parameters are filled in place (DCP reads into the state dict's tensors); the
        # optimizer state is created (a zero-lr step) and then overwritten.
        state = {"model": trainable_model_state(self.model, self.wrapped),
                 "optim": get_optimizer_state_dict(self.wrapped, self.optimizer)}
        load_dcp(folder, state)
        set_optimizer_state_dict(self.wrapped, self.optimizer, state["optim"], options=StateDictOptions(strict=False))

    def close(self) -> None:
        """Leave the process group; never a collective, so it is safe after another rank failed."""
        from tunekit.distributed.mesh import stop_runtime

        stop_runtime(self.runtime)


# ---------------------------------------------------------------------- shared helpers

def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing on each decoder layer (Hugging Face's own switch).

    Set before wrapping, so every FSDP unit recomputes its own layer in backward.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; "
                         "set train.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}  # adapters get gradients although the frozen inputs need none
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@torch.no_grad()
def broadcast_trainable(model: nn.Module, device: torch.device) -> None:
    """Give every rank rank 0's trainable tensors (adapters and new heads start identical)."""
    for p in model.parameters():
        if p.requires_grad:
            buf = p.data.to(device)
            dist.broadcast(buf, src=0)
            if buf is not p.data:
                p.data.copy_(buf)


@torch.no_grad()
def parameter_checksums(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and float64 (sum, sum of squares, sum of even positions) of every parameter: ``(P, 3)``.

    Computed in chunks, so the float64 copy never exceeds a few MiB whatever the tensor size.
    """
    names, sums = [], []
    for name, p in model.named_parameters():
        acc = torch.zeros(3, dtype=torch.float64)
        for chunk in p.detach().reshape(-1).split(1 << 20):  # even chunk sizes keep "even positions" global
            c = chunk.double()
            acc += torch.stack([c.sum(), (c * c).sum(), c[::2].sum()]).cpu()
        names.append(name)
        sums.append(acc)
    return names, torch.stack(sums) if sums else torch.zeros(0, 3, dtype=torch.float64)


def check_replicas_identical(model: nn.Module, device: torch.device) -> None:
    """Raise unless every parameter is bit-for-bit the same on all ranks (checksums, one all-gather).

    FSDP2 and DeepSpeed shard each rank's own copy: a base or head that loaded or
    initialised differently on one rank would silently train a mix of models.
    """
    names, local = parameter_checksums(model)
    gathered = [torch.empty_like(local, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local.to(device))
    reference = gathered[0].cpu()
    for rank, other in enumerate(gathered[1:], start=1):
        differs = (other.cpu() != reference).any(dim=1).nonzero()
        if len(differs):
            raise ValueError(
                f"parameter {names[int(differs[0])]!r} differs between rank 0 and rank {rank}: every rank must load "
                "the same base (a random-initialised base or head needs the same seed on every rank)"
            )


@torch.no_grad()
def clip_global_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """The global 2-norm of ``params``' gradients (all shards, all ranks); clipped to ``max_norm`` if given."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):  # DTensor grads give a partial norm: reduce it over the mesh
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return float(total)


@contextlib.contextmanager
def no_forward_hooks(modules: list[nn.Module]) -> Iterator[None]:
    """Lift the forward hooks of ``modules`` for the block (engine hooks must not fire on a plain export)."""
    saved = [(m, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in modules]
    for m, _, _ in saved:
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    try:
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks.update(pre)
            m._forward_hooks.update(post)
