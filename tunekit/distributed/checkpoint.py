"""Trainable state in torch Distributed Checkpoint (DCP) format: the ``state/`` folder of every checkpoint.

DCP holds two entries, each rank writing its own shards:

    model   the trainable parameters (state-dict keys; DTensor shards under fsdp, whole tensors otherwise)
    optim   the optimizer state, keyed by parameter name (``get_optimizer_state_dict``'s layout)

A folder written on N processes loads on M (DCP reshards on load), whatever the
strategies: one process, DDP, FSDP2 and DeepSpeed (which gathers its partitions into
the same layout) read each other's. Frozen tensors never enter it: the state dict
is filtered before DCP sees it, and loading checks that nothing but frozen keys is
missing. The run-folder side of checkpoints (atomic folders, RNG, progress, run
ids) is ``tunekit.train.checkpoint``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def no_process_group() -> bool:
    """True when this process is not in a process group (DCP then reads and writes alone)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def split_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    """State-dict keys of ``model``'s trainable parameters, and of everything else (frozen weights, buffers).

    Found by identity (``keep_vars``), so a module that renames its keys in ``state_dict``
    (tunekit's ``AdapterLayer`` drops the ``base_layer`` level) is read the way it writes.
    """
    trainable, frozen = set(), set()
    for key, value in model.state_dict(keep_vars=True).items():
        (trainable if isinstance(value, nn.Parameter) and value.requires_grad else frozen).add(key)
    return trainable, frozen


def trainable_model_state(model: nn.Module, wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable part of ``wrapped``'s state dict: local shards (DTensors) or tensors, no communication."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable, _ = split_keys(model)
    state = get_model_state_dict(wrapped)  # keys as the unwrapped model's (DDP's "module." dropped)
    missing = sorted(trainable - set(state))
    if missing:
        raise ValueError(f"trainable parameter {missing[0]!r} has no state-dict entry; it cannot be checkpointed")
    return {k: v for k, v in state.items() if k in trainable}


def save_dcp(folder: str | Path, state: dict[str, Any]) -> None:
    """Write ``{"model": ..., "optim": ...}`` to ``folder`` (collective under a process group)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process writing DCP is intended (strategy none)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(state, checkpoint_id=str(folder), no_dist=no_process_group())


def trainable_mismatch(folder: str | Path, model: nn.Module, shapes: dict[str, torch.Size] | None = None) -> str | None:
    """Why the checkpoint in ``folder`` cannot fill ``model``'s trainable parameters, or None.

    It must hold every trainable tensor, nothing unknown to the model and no frozen one, each at
    the global shape ``shapes`` gives (default: the parameters' own shapes).
    """
    trainable, frozen = split_keys(model)
    metadata = read_metadata(folder).state_dict_metadata
    saved = {k.removeprefix("model."): v for k, v in metadata.items() if k.startswith("model.")}
    absent, unknown = sorted(trainable - saved.keys()), sorted(saved.keys() - trainable - frozen)
    if absent:
        return f"the checkpoint lacks trainable tensor {absent[0]!r} ({len(absent)} in all)"
    if unknown:
        return f"the checkpoint holds {unknown[0]!r}, unknown to this model"
    if saved.keys() & frozen:
        return f"the checkpoint holds frozen tensor {sorted(saved.keys() & frozen)[0]!r} (not written by tunekit)"
    if shapes is None:
        shapes = {k: v.shape for k, v in model.state_dict(keep_vars=True).items() if k in trainable}
    for name in sorted(trainable):
        if name in shapes and tuple(saved[name].size) != tuple(shapes[name]):
            return f"{name} has shape {tuple(saved[name].size)} there and {tuple(shapes[name])} in this model"
    return None


def check_trainable_fit(folder: str | Path, model: nn.Module, shapes: dict[str, torch.Size] | None = None) -> None:
    """Raise ``ValueError`` with ``trainable_mismatch``'s reason (and the way out), if there is one."""
    problem = trainable_mismatch(folder, model, shapes)
    if problem:
        raise ValueError(f"{folder}: {problem}; resume with the same model and adapter config, or set "
                         "train.resume=never")


def load_dcp(folder: str | Path, state: dict[str, Any]) -> None:
    """Read ``folder`` into the tensors of ``state`` in place, resharding to this process's shards (collective)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended (2 -> 1 resume)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=no_process_group())


def read_metadata(folder: str | Path):
    """The DCP metadata of ``folder`` (raises on a missing or damaged ``.metadata`` file)."""
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader(str(folder)).read_metadata()


def checkpoint_keys(folder: str | Path) -> list[str]:
    """Every tensor key a DCP folder's metadata holds (``model.<param>``, ``optim.state.<param>.<stat>``, ...)."""
    return sorted(read_metadata(folder).state_dict_metadata)


def check_dcp_files(folder: str | Path) -> None:
    """Raise ``ValueError`` naming the first damaged file of a DCP folder: unreadable metadata, or a data file
    shorter than the bytes its metadata places in it (a truncated write). Reads no tensor."""
    folder = Path(folder)
    try:
        metadata = read_metadata(folder)
    except Exception as err:  # noqa: BLE001 - any failure to read it means the same: damaged
        raise ValueError(f".metadata: {' '.join(str(err).split())[:120] or type(err).__name__}") from None
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = folder / name
        size = file.stat().st_size if file.is_file() else -1
        if size < end:
            raise ValueError(f"{name}: {'missing' if size < 0 else f'{size} bytes, its metadata needs {end}'}")


def read_trainable_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The trainable tensors a ``state/`` folder holds, whole, on the CPU, by state-dict key (one process).

    Example:
        >>> read_trainable_state("runs/x/checkpoints/step-6/state")  # doctest: +SKIP
        {'model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight': tensor(...), ...}
    """
    import torch.distributed.checkpoint as dcp

    metadata = read_metadata(folder).state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(tuple(item.size), dtype=item.properties.dtype)
             for key, item in metadata.items() if key.startswith("model.") and hasattr(item, "size")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"model": model}, checkpoint_id=str(folder), no_dist=True)
    return model
