"""Model states per rank under each strategy: the ZeRO paper's accounting, generalised.

ZeRO (Rajbhandari et al., 2020, §3-5) counts, for Ψ parameters trained with
mixed-precision Adam on N_d data-parallel ranks, 2Ψ bytes of fp16 weights, 2Ψ
of fp16 gradients and KΨ (K = 12: fp32 weights, momentum, variance) of
optimizer state, so per rank::

    baseline (DDP)      (2 + 2 + K) Ψ
    P_os   (ZeRO-1)     2Ψ + 2Ψ + KΨ / N_d
    P_os+g (ZeRO-2)     2Ψ + (2 + K) Ψ / N_d
    P_os+g+p (ZeRO-3)   (2 + 2 + K) Ψ / N_d

Fine-tuning splits Ψ into a frozen base Ψ_f and trainable parameters Ψ_t, and
tunekit trains adapters in fp32 beside a bf16 or quantized base (no separate
master copy: the fp32 adapter *is* the master). With s_f the bytes per frozen
parameter as stored (2 for bf16, 4.127/8 for NF4 with double quantization,
quantization tables included), s_t those of a trainable one (4 for fp32), and
o the optimizer's bytes per trainable parameter (8 for AdamW, ~2 for 8-bit
AdamW, 0 for SGD)::

    frozen weights     Ψ_f s_f            gradients          Ψ_t s_t      (trainable only)
    trainable weights  Ψ_t s_t            optimizer states   Ψ_t o        (trainable only)

and a strategy divides each term by what it shards over (per-tensor, exactly as
FSDP2 and DTensor split dim 0: ``torch.chunk`` sizes, rank 0 holding the largest
piece; FSDP2 pads every rank's parameter and gradient shard to that largest piece,
its optimizer states hold the real rows), plus its communication buffers::

    none / ddp        nothing sharded; DDP adds a gradient bucket copy (Ψ_t s_t)
    fsdp (ZeRO-3)     all four / N; the root unit (embeddings, head) stays gathered from forward to
                      backward, plus two gathered blocks (current + prefetched) and one block's
                      unsharded gradients before reduce-scatter
    fsdp, reshard_after_forward=false (ZeRO-2-like)
                      gradients and optimizer / N; after forward every block stays gathered, so the
                      peak holds the whole unsharded model beside its shards
    fsdp + cpu_offload
                      the shards of all four live in host memory; the GPU holds the gathered units
    deepspeed (ZeRO-3, DeepSpeed's own accounting, ``memory.rst``): every parameter 2 bytes
                      (fp16/bf16), a trainable one 18 (fp16 copy, fp32 weight, fp32 gradient, two fp32
                      Adam moments), all / N, plus 4 x the largest layer (its gathered fp16 weights and
                      gradients); with offload the GPU keeps only that and the host
                      ``18 Ψ_t + 2 Ψ_f`` x 1.5 (DeepSpeed's buffer factor) per node
    tp (degree t)     the layers in tunekit's TP plan / t (colwise: output rows, rowwise: input
                      columns; a LoRA's A follows the base's input split, B its output split; the
                      head and embeddings whole);
                      activations of one rank's slice (heads and MLP width / t)
    fsdp_tp           TP first, then FSDP over the N / t data-parallel ranks

DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs_all_live``)
assume every parameter trains; ``deepspeed_zero3_model_states`` reproduces them
for comparison, and ``zero_model_states`` the paper's formulas.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from tunekit.estimate.model import Inventory, ParamInfo
from tunekit.estimate.storage import optimizer_state_bytes

__all__ = [
    "RankBytes",
    "deepspeed_zero3_model_states",
    "local_rows",
    "local_shape",
    "rank_model_states",
    "zero_model_states",
]


def zero_model_states(psi: float, n_d: int, stage: int, k: int = 12) -> float:
    """Bytes per rank of mixed-precision Adam model states under ZeRO stage 0-3 (the paper's formulas)."""
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return 2 * psi + 2 * psi + k * psi / n_d
    if stage == 2:
        return 2 * psi + (2 + k) * psi / n_d
    if stage == 3:
        return (2 + 2 + k) * psi / n_d
    raise ValueError(f"ZeRO stage {stage} does not exist (0-3)")


def deepspeed_zero3_model_states(
    total_params: float, largest_layer_params: float, *, gpus_per_node: int = 1, nodes: int = 1,
    offload_params: bool = False, offload_optimizer: bool = False, zero_init: bool = True,
    buffer_factor: float = 1.5, frozen_params: float = 0,
) -> tuple[float, float]:
    """(host bytes per node, GPU bytes per rank) of ZeRO-3 model states, as DeepSpeed's memory docs compute them.

    ``frozen_params`` (not in DeepSpeed's estimator) is the part of ``total_params``
    that does not train: 2 bytes each instead of 18.
    """
    total_gpus = gpus_per_node * nodes
    node_share = 1 / nodes
    trained = total_params - frozen_params
    largest_layer_memory = 4 * largest_layer_params
    states = 18 * trained + 2 * frozen_params  # fp16 copy + fp32 (weight, gradient, 2 Adam moments)
    if offload_params and offload_optimizer:
        gpu = largest_layer_memory
        per_param = states * node_share if zero_init else max(4 * gpus_per_node * total_params, states * node_share)
        return per_param * buffer_factor, gpu
    if offload_optimizer:
        gpu = largest_layer_memory + int(2 * total_params / total_gpus)
        host = (16 * trained) * node_share
        host = host if zero_init else max(4 * gpus_per_node * total_params, host)
        return host * buffer_factor, gpu
    gpu = largest_layer_memory + int(states / total_gpus)
    host_params = largest_layer_params if zero_init else total_params
    return host_params * 4 * gpus_per_node * buffer_factor, gpu


def local_rows(size: int, parts: int, index: int) -> int:
    """Length of piece ``index`` when ``size`` is split in ``parts`` as ``torch.chunk`` (and FSDP2, DTensor) do."""
    if parts == 1:
        return size
    chunk = math.ceil(size / parts)
    return max(0, min(chunk, size - index * chunk))


def local_shape(shape: tuple[int, ...], splits: list[tuple[int, int, int]]) -> tuple[int, ...]:
    """``shape`` after each (dim, parts, index) split in turn (TP first, then FSDP's dim 0)."""
    out = list(shape)
    for dim, parts, index in splits:
        if out:
            out[dim] = local_rows(out[dim], parts, index)
    return tuple(out)


def _owner(name: str) -> tuple[str, str, str]:
    """(base module path, adapter part, leaf) of a parameter name.

    tunekit names a wrapped layer's tensors ``<layer>.base_layer.weight`` and
    ``<layer>.adapters.<adapter>.<part>[.weight]``.
    """
    leaf = name.rpartition(".")[2]
    if ".adapters." in name:
        owner, rest = name.split(".adapters.", 1)
        return owner, rest.split(".")[1], leaf
    if ".base_layer." in name:
        return name.split(".base_layer.")[0], "", leaf
    return name.rpartition(".")[0], "", leaf


def _tp_split(param: ParamInfo, placements: dict[str, str], tp: int, tp_rank: int) -> list[tuple[int, int, int]]:
    """The tensor-parallel split of ``param`` (its dim, tp, rank), or [] when it is replicated."""
    if tp == 1 or not placements:
        return []
    owner, part, leaf = _owner(param.name)
    style = next((s for pattern, s in placements.items() if re.fullmatch(pattern, owner)), None)
    if style is None:
        return []
    style = style.split(":")[0].removeprefix("packed_")  # packed outputs split like one colwise layer
    if style == "replicate":
        return []
    colwise = style.startswith("colwise")
    rowwise = style.startswith("rowwise")
    if part == "lora_A":  # (r, in): split with the base's input features
        dim = 1 if rowwise else None
    elif part in ("lora_B", "lora_magnitude_vector"):  # (out, r) / (out,): split with its output features
        dim = 0 if colwise else None
    elif part:  # other adapters inside a TP layer act on its full input or output
        dim = None
    elif leaf == "bias":
        dim = 0 if colwise else None
    else:
        dim = 0 if colwise or style == "embedding_rowwise" else 1
    return [] if dim is None or dim >= len(param.shape) else [(dim, tp, tp_rank)]


@dataclass(frozen=True)
class RankBytes:
    """Model-state bytes one rank holds, by kind."""

    frozen: int
    trainable: int
    gradients: int
    optimizer: int
    """Optimizer tensors (moments; bitsandbytes' absmax and maps; AdamW's fp32 ``step`` scalars)."""

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.gradients + self.optimizer


def _local(param: ParamInfo, splits: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(local elements, local bytes) of ``param`` after ``splits``; quantization tables stay whole."""
    shape = local_shape(param.shape, splits)
    numel = math.prod(shape)
    whole = math.prod(param.shape) or 1
    if param.storage == "dense":
        return numel, numel * param.dtype.itemsize
    stored = math.prod(param.shape) * param.dtype.itemsize
    tables = param.nbytes - stored
    return round(param.numel * numel / whole), numel * param.dtype.itemsize + tables


def rank_model_states(
    inv: Inventory, optimizer: str, *, dp: int = 1, dp_rank: int = 0, tp: int = 1, tp_rank: int = 0,
    placements: dict[str, str] | None = None,
) -> RankBytes:
    """Exact model-state bytes of one rank: each parameter split by TP (``placements``), then dim 0 over ``dp``.

    ``dp`` > 1 means sharded data parallelism (FSDP2 / ZeRO-3); plain DDP is ``dp=1``.
    Gradients have their parameter's shape and dtype; optimizer states follow ``optimizer``.
    FSDP2 pads every rank's dim-0 shard to the largest (rank 0's, ``ceil(rows / dp)``), so a
    rank holds that many rows of parameter and gradient even where fewer are real; the optimizer
    states, made from the DTensor's unpadded local view, hold only the real rows.
    """
    frozen, trainable, grads = inv.buffer_bytes, 0, 0
    opt_params: list[tuple[int, torch.dtype]] = []
    for param in inv.params:
        splits = _tp_split(param, placements or {}, tp, tp_rank)
        held, real = splits, splits
        if dp > 1:
            held, real = [*splits, (0, dp, 0)], [*splits, (0, dp, dp_rank)]
        nbytes = _local(param, held)[1]
        if param.trainable:
            trainable += nbytes
            grads += nbytes
            opt_params.append((_local(param, real)[0], param.dtype))
        else:
            frozen += nbytes
    return RankBytes(frozen, trainable, grads, optimizer_state_bytes(opt_params, optimizer))


def optimizer_step_transient(inv: Inventory, optimizer: str, device: str, shard: int = 1) -> int:
    """Peak scratch bytes of one optimizer step over the trainable parameters (1/``shard`` of each).

    tunekit's AdamW has two parameter groups (matrices with weight decay, 1-D tensors
    without). On GPUs torch runs ``foreach``: ``_foreach_sqrt`` of every second moment
    of a group at once, so one group's bytes. On a CPU it loops over the tensors of a
    group: the square root and the denominator of the current tensor, plus the previous
    tensor's denominator, which Python holds until the name is reassigned.
    bitsandbytes and SGD update in place.
    """
    if optimizer != "adamw":
        return 0
    groups: tuple[list[int], list[int]] = ([], [])
    for p in inv.params:
        if p.trainable:
            groups[len(p.shape) < 2].append(p.nbytes // shard)
    if device != "cpu":
        return max(sum(g) for g in groups)
    return max((2 * n + (g[i - 1] if i else 0) for g in groups for i, n in enumerate(g)), default=0)
