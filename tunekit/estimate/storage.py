"""Bytes a tensor really occupies: quantized weight layouts and optimizer states.

bitsandbytes 4-bit (NF4 / FP4) weight of ``n`` parameters, block size 64
(``bitsandbytes.functional.quantize_4bit``; the only size transformers uses)::

    packed weight   ceil(n / 2) uint8, shape (ceil(n/2), 1)       4 bits / param
    absmax          ceil(n / 64) fp32                              + 0.5 bit / param
    code            16 fp32 (the NF4 / FP4 table)
  with double quantization (the absmax quantized blockwise, blocks of 256):
    absmax          ceil(n / 64) uint8                             + 0.125 bit / param
    state2.absmax   ceil(ceil(n / 64) / 256) fp32                  + 0.00195 bit / param
    state2.code     256 fp32, offset: one fp32 scalar

so NF4 costs 4.5 bits per parameter, 4.127 with double quantization (plus a few
hundred bytes of tables per layer). LLM.int8 (``Linear8bitLt``): the int8
weight plus one fp32 scale per output row (``SCB``).

Optimizer states per trainable parameter of ``b`` bytes (``b`` = its dtype):

    adamw       exp_avg + exp_avg_sq, each like the parameter: 2b; one fp32 ``step`` per tensor
    adamw_8bit  (bitsandbytes, also paged) tensors of >= 4096 elements: two uint8 states + two fp32
                absmax per block of 256 elements: 2 + 8/256 bytes; smaller tensors: two fp32 states
    sgd         nothing (momentum 0: torch stores no buffer)
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BNB_4BIT_BLOCKSIZE",
    "OPTIMIZERS",
    "int8_layout",
    "layout_bytes",
    "nf4_layout",
    "optimizer_state_bytes",
]

BNB_4BIT_BLOCKSIZE = 64
_NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization of the absmax
_BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes Optimizer2State min_8bit_size
_BNB_8BIT_STATE_BLOCK = 256
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def nf4_layout(numel: int, double_quant: bool) -> Layout:
    """Name -> (shape, dtype) of every tensor bitsandbytes keeps for one 4-bit weight of ``numel`` values."""
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    layout: Layout = {"weight": (((numel + 1) // 2, 1), torch.uint8), "code": ((16,), torch.float32)}
    if double_quant:
        layout["absmax"] = ((blocks,), torch.uint8)
        layout["offset"] = ((), torch.float32)
        layout["state2.absmax"] = ((math.ceil(blocks / _NESTED_BLOCKSIZE),), torch.float32)
        layout["state2.code"] = ((256,), torch.float32)
    else:
        layout["absmax"] = ((blocks,), torch.float32)
    return layout


def int8_layout(out_features: int, in_features: int) -> Layout:
    """Name -> (shape, dtype) of an LLM.int8 weight: int8 values and per-row fp32 scales."""
    return {"weight": ((out_features, in_features), torch.int8), "SCB": ((out_features,), torch.float32)}


def layout_bytes(layout: Layout) -> int:
    """Total bytes of the tensors in ``layout``."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


def optimizer_state_bytes(params: list[tuple[int, torch.dtype]], optimizer: str) -> int:
    """Bytes of ``optimizer``'s state for trainable tensors given as (numel, dtype).

    Raises:
        ValueError: an unknown optimizer name.
    """
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return sum(2 * n * dtype.itemsize + 4 for n, dtype in params)
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        total = 0
        for n, _ in params:
            if n < _BNB_8BIT_MIN_SIZE:
                total += 2 * n * 4
            else:
                total += 2 * n + 2 * 4 * math.ceil(n / _BNB_8BIT_STATE_BLOCK)
        # the two 256-entry quantization maps are shared by every tensor
        return total + (2 * 256 * 4 if any(n >= _BNB_8BIT_MIN_SIZE for n, _ in params) else 0)
    raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
