"""``deepspeed``: DeepSpeed ZeRO-3 (optionally offloading parameters and optimizer state to host memory).

For users who already run DeepSpeed. The engine is configured from tunekit's
settings as a DeepSpeed JSON (``deepspeed_config``; printable, or replaced by
the user's own file, which is checked for the few keys tunekit relies on):

- ``gradient_accumulation_steps: 1`` and ``managed_gradient_accumulation: false``:
  tunekit keeps its own token-weighted accumulation, and ``step()`` is the
  boundary (DeepSpeed reduces each backward's gradients into the partitions).
- ``stage3_gather_16bit_weights_on_model_save: false``: tunekit gathers only the
  adapters (``GatheredParameters`` over the trainable parameters).
- checkpoints in the DCP layout of the other strategies (``deepspeed_state``): the
  trainable tensors and their optimizer state gathered whole, so they resume on any
  number of processes, under any strategy.

On a CPU, DeepSpeed needs ``DS_ACCELERATOR=cpu`` before it is imported, and it
compiles C++ ops once; they are cached under ``TORCH_EXTENSIONS_DIR`` (set here to
a stable folder when unset, so later runs reuse them).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from tunekit.distributed.options import DistributedOptions
from tunekit.distributed.strategy import Gathered, OptimizerFactory, StepOutcome, Strategy

INSTALL_HINT = "pip install 'tunekit[deepspeed]'"
# What tunekit's loop relies on; a user's file may leave them out, not contradict them.
_REQUIRED = {
    "gradient_accumulation_steps": 1,
    "managed_gradient_accumulation": False,
    "zero_optimization.stage": 3,
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
}


def extensions_dir() -> Path:
    """Where DeepSpeed's compiled ops are cached when ``TORCH_EXTENSIONS_DIR`` is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunekit" / "torch_extensions"


def import_deepspeed(device: torch.device):
    """``deepspeed``, set up for ``device`` (its accelerator is fixed at import).

    Raises:
        ImportError: DeepSpeed is not installed (one line saying how to install it).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    try:
        import deepspeed
    except ImportError:
        raise ImportError(f"distributed.strategy=deepspeed needs DeepSpeed, which is not installed: {INSTALL_HINT}") from None
    return deepspeed


def generated_config(options: DistributedOptions, world_size: int) -> dict:
    """The DeepSpeed JSON tunekit generates from its own settings.

    Example:
        >>> cfg = generated_config(DistributedOptions(strategy="deepspeed", cpu_offload=True), 2)
        >>> cfg["zero_optimization"]["offload_optimizer"], cfg["train_batch_size"]
        ({'device': 'cpu'}, 2)
    """
    zero: dict = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    if options.cpu_offload:
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": options.micro_batch_size,
        "train_batch_size": options.micro_batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": options.max_grad_norm or 0.0,
        "zero_optimization": zero,
        # Precision comes from tunekit's autocast: DeepSpeed's bf16/fp16 modes would cast fp32 adapters.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # The optimizer is tunekit's torch one (same update rule as the other strategies).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def deepspeed_config(options: DistributedOptions, world_size: int) -> dict:
    """The generated config, or the user's ``options.deepspeed_config`` file checked against tunekit's needs.

    Raises:
        ValueError: the file is missing, not JSON, or contradicts a key tunekit relies on.
    """
    if options.deepspeed_config is None:
        return generated_config(options, world_size)
    path = Path(options.deepspeed_config)
    if not path.is_file():
        raise ValueError(f"distributed.deepspeed_config={str(path)!r} is not a file")
    try:
        user = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"distributed.deepspeed_config {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    for key, wanted in _REQUIRED.items():
        value = _get(user, key)
        if value is not None and value != wanted:
            raise ValueError(f"distributed.deepspeed_config {path}: {key}={value!r}, tunekit needs {wanted!r} "
                             "(it accumulates micro-batches itself and gathers only the adapters)")
    merged = generated_config(options, world_size)
    for key, value in user.items():
        if key == "zero_optimization":
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-3 over all ranks (its engine builds its own groups)."""

    name = "deepspeed"

    @property
    def grad_average_factor(self) -> int:  # ZeRO averages the reduced gradients over the ranks
        return self.dp_size

    def _wrap(self, model: nn.Module, build_optimizer: OptimizerFactory):
        deepspeed = import_deepspeed(self.device)
        # DeepSpeed 0.19 calls torch.distributed functions torch 2.13 deprecated, once per collective.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        optimizer = build_optimizer(model)
        # The groups' parameters as built: DeepSpeed replaces them by its flat fp32 partitions.
        self.group_params = [list(group["params"]) for group in optimizer.param_groups]
        self.config = deepspeed_config(self.options, self.runtime.world_size)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config, dist_init_required=False)
        self.engine = engine
        return engine, optimizer

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        self.engine.backward(loss * (weight * self.grad_average_factor))

    def optimizer_step(self, max_grad_norm: float | None) -> StepOutcome:
        # DeepSpeed clips inside its step, with the gradient_clipping its config was built with.
        if (max_grad_norm or 0.0) != self.config.get("gradient_clipping", 0.0):
            raise ValueError(f"max_grad_norm={max_grad_norm} differs from the DeepSpeed config's gradient_clipping="
                             f"{self.config.get('gradient_clipping')}; set it through DistributedOptions.max_grad_norm")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return StepOutcome(float(norm) if norm is not None else 0.0, True)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def gather_trainable(self) -> Gathered:
        deepspeed = import_deepspeed(self.device)
        named = self._trainable()
        # Parameters under stage3_param_persistence_threshold are kept whole on every rank: nothing to gather.
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        partitioned = [p for _, p in named if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        received = sum(p.ds_tensor.numel() * p.element_size() * self.runtime.world_size for p in partitioned)
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return Gathered({n: p.detach().to("cpu").clone() for n, p in named}, received)

    def snapshot_trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.ds_tensor.detach().clone() for n, p in self._trainable()}

    @torch.no_grad()
    def restore_trainable(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, p in self._trainable():
            p.ds_tensor.copy_(snapshot[name])
        self.engine.optimizer.refresh_fp32_params()  # the optimizer's fp32 partitions follow

    def save_state(self, folder) -> None:
        from tunekit.distributed.deepspeed_state import save_state

        save_state(self, folder)

    def load_state(self, folder) -> None:
        from tunekit.distributed.deepspeed_state import load_state

        load_state(self, folder)
