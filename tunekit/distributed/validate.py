"""The check an adapter passes before it is written: complete, at its global shapes, finite.

An empty or half-size adapter file is the classic ZeRO-3 failure (a shard saved
where the gathered tensor belonged); refusing it here makes that impossible.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_adapter_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size | tuple]) -> None:
    """Raise unless ``tensors`` has exactly the names of ``expected``, at those shapes, all finite.

    Args:
        tensors: name -> tensor about to be saved.
        expected: name -> global shape (what the adapter config created before any sharding).

    Raises:
        ValueError: one line naming the first missing, unexpected, mis-shaped or non-finite tensor.

    Example:
        >>> check_adapter_tensors({"a": torch.zeros(2, 3)}, {"a": (2, 3)})
        >>> check_adapter_tensors({"a": torch.zeros(1, 3)}, {"a": (2, 3)})
        Traceback (most recent call last):
        ...
        ValueError: adapter save refused: 'a' has shape (1, 3) but the adapter config implies (2, 3) (a shard where the gathered tensor belongs?)
    """
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"adapter save refused: {len(missing)} trainable tensors are missing, e.g. {missing[0]!r} "
                         "(were all shards gathered?)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"adapter save refused: {extra[0]!r} is not a trainable tensor of this adapter")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"adapter save refused: {name!r} has shape {tuple(tensor.shape)} but the adapter config "
                             f"implies {tuple(shape)} (a shard where the gathered tensor belongs?)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"adapter save refused: {name!r} holds NaN or Inf values (training diverged; "
                             "lower train.lr or check the data)")
