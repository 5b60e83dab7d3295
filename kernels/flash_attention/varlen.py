"""Packed ("varlen") batches: sequence boundaries from position ids.

Several examples concatenated into one row (padding-free packing) are described
either by FlashAttention's ``cu_seqlens`` (cumulative lengths ``[0, l0, l0+l1, ...]``)
or by position ids that restart for each example (``[0 1 2 0 1 0 1 2 3]``).
``cu_seqlens_from_position_ids`` turns the second form into the first so that the
attention kernel can keep every example to itself.

A new sequence starts at the first token of each row and wherever a position id
is not its predecessor + 1 (the rule transformers' SDPA mask uses, so packed
results match theirs; for ids that restart at 0 it is the same as "starts at 0").
"""

from __future__ import annotations

import torch

__all__ = ["cu_seqlens_from_position_ids"]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence offsets of a packed batch, flattened row-major over (B, T).

    Args:
        position_ids: (B, T) or (T,) integer positions; each row may hold several sequences.

    Returns:
        cu_seqlens: (N + 1,) int32 offsets into the B*T flattened tokens, and the longest length.

    Example:
        >>> cu, longest = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]))
        >>> cu.tolist(), longest
        ([0, 3, 5, 7, 10], 3)
    """
    if position_ids.ndim not in (1, 2) or position_ids.is_floating_point():
        raise ValueError(f"position_ids must be an integer (B, T) or (T,) tensor, got {tuple(position_ids.shape)} "
                         f"{position_ids.dtype}")
    pos = position_ids.reshape(-1, position_ids.shape[-1])  # (B, T)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = starts.reshape(-1).nonzero().flatten()
    end = torch.tensor([pos.numel()], device=pos.device)
    cu_seqlens = torch.cat([first, end]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())
