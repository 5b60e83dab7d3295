"""Sharded checkpoints: trainable state only, in torch Distributed Checkpoint (DCP) format.

A checkpoint is one folder ``<root>/step-<N>/``::

    state/                    DCP: "model" (trainable parameters) + "optim" (optimizer state),
                              each rank writing its shards; loads on any number of processes
                              (DeepSpeed: its own engine checkpoint, frozen parameters excluded)
    adapter/                  the gathered adapter, as the final save writes it (optional)
    rng-rank<r>.pt            every rank's RNG states
    trainer_state.pt          scheduler state and the world size it was saved with
    config.json, progress.json   as the single-process checkpoint (progress.json last: complete)

The frozen base is never in a checkpoint: it is reloaded from its source (and a
quantized base never meets DCP). Writing is atomic: every rank writes into
``.tmp-step-N``, a barrier, then rank 0 renames it into place, then a barrier
(the folder must be on a file system all ranks share).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunekit.train.checkpoint import PROGRESS, list_checkpoints, rng_state, set_rng_state

STATE = "state"


def _single() -> bool:
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


def _model_state(model: nn.Module, wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable part of ``wrapped``'s state dict: local shards (DTensors) or tensors, no communication."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable, _ = split_keys(model)
    state = get_model_state_dict(wrapped)  # keys as the unwrapped model's (DDP's "module." dropped)
    missing = sorted(trainable - set(state))
    if missing:
        raise ValueError(f"trainable parameter {missing[0]!r} has no state-dict entry; it cannot be checkpointed")
    return {k: v for k, v in state.items() if k in trainable}


def save_dcp(folder: str | Path, model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
             layout: Any = None) -> None:
    """Write the trainable parameters of ``model`` (as ``wrapped`` holds them) and ``optimizer``'s state (collective).

    Frozen tensors never enter the checkpoint: the state dict is filtered before DCP sees it.
    ``layout.to_saved(state)`` (optional) puts tensors held in a strategy-specific order into
    the canonical one first (tensor parallelism's packed outputs).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": _model_state(model, wrapped), "optim": get_optimizer_state_dict(wrapped, optimizer)}
    if layout is not None:
        layout.to_saved(state)
    dcp.save(state, checkpoint_id=str(folder), no_dist=_single())


def load_dcp(folder: str | Path, model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
             layout: Any = None) -> None:
    """Load a ``save_dcp`` folder into ``model`` and ``optimizer``, resharding to this world size.

    The parameters are filled in place (DCP reads into the tensors of the state dict);
    only frozen keys may be absent from the checkpoint, and it may hold no key this model lacks.

    Raises:
        ValueError: the checkpoint was written for another model or adapter config.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    trainable, frozen = split_keys(model)
    saved = {k.removeprefix("model.") for k in checkpoint_keys(folder) if k.startswith("model.")}
    absent, unknown = sorted(trainable - saved), sorted(saved - trainable - frozen)
    if absent or unknown:
        what = f"lacks trainable tensor {absent[0]!r}" if absent else f"holds {unknown[0]!r}, unknown to this model"
        raise ValueError(f"{folder}: the checkpoint {what}; resume with the same model and adapter config, "
                         "or set train.resume=never")
    if saved & frozen:
        raise ValueError(f"{folder}: the checkpoint holds frozen tensor {sorted(saved & frozen)[0]!r}; "
                         "it was not written by tunekit")
    state = {"model": _model_state(model, wrapped), "optim": get_optimizer_state_dict(wrapped, optimizer)}
    finish = layout.to_loaded(state) if layout is not None else None  # canonical buffers DCP reads into
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended (2 -> 1 resume)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=_single())
    if finish is not None:
        finish()
    set_optimizer_state_dict(wrapped, optimizer, state["optim"], options=StateDictOptions(strict=False))


def checkpoint_keys(folder: str | Path) -> list[str]:
    """Every tensor key a DCP folder's metadata holds (``model.<param>``, ``optim.state.<param>.<stat>``, ...)."""
    import torch.distributed.checkpoint as dcp

    return sorted(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_sharded_checkpoint(
    root: str | Path, step: int, *, strategy: Any, scheduler: Any, progress: dict, config: dict,
    keep_last: int | None, write_adapter: Any = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` from every rank, atomically; return its folder.

    ``write_adapter(folder)`` (collective, optional) adds the gathered adapter.
    """
    root = Path(root)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    rank, world = _rank_and_world()
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()
    strategy.save_state(tmp / STATE)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if write_adapter is not None:
        write_adapter(tmp / "adapter")
    strategy.barrier()
    if strategy.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "world_size": world}, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / PROGRESS).write_text(json.dumps(progress, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, final, root)
        if keep_last is not None:
            for stale in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(stale)
    strategy.barrier()
    return final


def _swap_into_place(tmp: Path, final: Path, root: Path) -> None:
    if final.exists():  # re-saving a step (a resumed run that stopped at once): swap, then drop
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def load_sharded_checkpoint(folder: str | Path, *, strategy: Any, scheduler: Any) -> dict:
    """Restore trainable state, optimizer, scheduler and this rank's RNG; return the progress record.

    On another world size than the checkpoint's, rank ``r`` takes the RNG of saved rank
    ``r % saved_world`` (dropout streams then differ from an uninterrupted run).
    """
    folder = Path(folder)
    strategy.load_state(folder / STATE)
    trainer_state = torch.load(folder / "trainer_state.pt", weights_only=True)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rank, _ = _rank_and_world()
    saved_rank = rank % int(trainer_state["world_size"])
    set_rng_state(torch.load(folder / f"rng-rank{saved_rank}.pt", weights_only=True))
    return json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
