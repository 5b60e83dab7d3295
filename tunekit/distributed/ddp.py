"""``ddp``: every rank holds the whole model; gradients are averaged after each step's last micro-batch."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tunekit.distributed.strategy import OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    """torch ``DistributedDataParallel`` over the ``dp_replicate`` dim (all ranks)."""

    name = "ddp"

    @property
    def grad_average_factor(self) -> int:  # DDP divides the summed gradients by the world size
        return self.dp_size

    def _wrap(self, model: nn.Module, build_optimizer: OptimizerFactory):
        model.to(self.device)
        cuda = self.device.type == "cuda"
        # init_sync=False: prepare() already broadcast the trainable tensors and checked the rest
        # equal; DDP's own start-up broadcast would send the whole frozen base again.
        # forward_sync_buffers=False: buffers (rotary tables) are constants, not worth a collective per forward.
        wrapped = DistributedDataParallel(
            model, device_ids=[self.device.index] if cuda else None, process_group=self.runtime.dp_group(),
            init_sync=False, forward_sync_buffers=False,
        )
        return wrapped, build_optimizer(model)

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if enabled else self.wrapped.no_sync()
