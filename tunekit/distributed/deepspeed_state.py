"""DeepSpeed ZeRO-3 trainable state in the DCP layout every other strategy writes and reads.

DeepSpeed keeps each trainable parameter, its fp32 master copy and its optimizer
moments as flat partitions spread over the ranks; its own checkpoints load only on
the same number of processes. Here the trainable tensors are gathered whole
(DeepSpeed's ``safe_get_full_*`` API: only trainable tensors travel) into exactly
the state dict ``get_model_state_dict`` / ``get_optimizer_state_dict`` give on one
process::

    model   {state-dict key: full tensor}
    optim   {"state": {param name: {"exp_avg": full, "exp_avg_sq": full, "step": scalar}},
             "param_groups": [{hyperparameters..., "params": [param names]}]}

so a DeepSpeed checkpoint resumes on any number of processes under any strategy,
and the other way round. Loading reads the whole tensors on every rank, then lets
DeepSpeed keep its own partitions (``GatheredParameters`` with a modifier rank, and
``safe_set_full_optimizer_state``). Every rank holds the full trainable state for a
moment: adapter-sized, never the frozen base.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch


def _names(strategy) -> dict[int, str]:
    return {id(p): n for n, p in strategy.model.named_parameters() if p.requires_grad}


def _flat_states(strategy) -> list[tuple[torch.Tensor, dict]]:
    """(fp32 flat partition, its optimizer state) of every DeepSpeed sub-group."""
    zero = strategy.engine.optimizer
    return [(flat, zero.optimizer.state.get(flat, {})) for flat in zero.fp32_partitioned_groups_flat]


def _param_groups(strategy, names: dict[int, str]) -> list[dict[str, Any]]:
    groups = []
    for group, params in zip(strategy.optimizer.param_groups, strategy.group_params):
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": [names[id(p)] for p in params]})
    return groups


def gather_state(strategy) -> dict[str, Any]:
    """The full trainable model and optimizer state, on the CPU, on every rank (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from tunekit.distributed.checkpoint import split_keys

    names = _names(strategy)
    trainable_keys, _ = split_keys(strategy.model)
    keyed = {id(v): k for k, v in strategy.model.state_dict(keep_vars=True).items() if k in trainable_keys}
    flats = _flat_states(strategy)
    stats = sorted({k for _, state in flats for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0})
    steps = {k: v for _, state in flats for k, v in state.items() if not (torch.is_tensor(v) and v.dim() > 0)}
    model, optim = {}, {}
    for name, p in strategy.model.named_parameters():
        if not p.requires_grad:
            continue
        model[keyed[id(p)]] = safe_get_full_fp32_param(p).detach().cpu()
        if stats:
            per = {stat: safe_get_full_optimizer_state(p, stat).detach().cpu() for stat in stats}
            optim[name] = {**per, **{k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                     for k, v in steps.items()}}
    return {"model": model, "optim": {"state": optim, "param_groups": _param_groups(strategy, names)}}


def save_state(strategy, folder: str | Path) -> None:
    from tunekit.distributed.checkpoint import save_dcp

    save_dcp(folder, gather_state(strategy))


def _read_full(folder: str | Path, names: list[str], keys: list[str]) -> dict[str, Any]:
    """The saved whole tensors of the ``model`` keys and of each named parameter's optimizer state."""
    import torch.distributed.checkpoint as dcp

    from tunekit.distributed.checkpoint import read_metadata

    metadata = read_metadata(folder).state_dict_metadata

    def empty(key: str) -> torch.Tensor:
        item = metadata[key]
        return torch.empty(tuple(item.size), dtype=item.properties.dtype)

    state: dict[str, Any] = {"model": {k: empty(f"model.{k}") for k in keys}, "optim": {"state": {}}}
    for name in names:
        prefix = f"optim.state.{name}."
        stats = [k[len(prefix):] for k in metadata if k.startswith(prefix)]
        if stats:
            state["optim"]["state"][name] = {stat: empty(prefix + stat) for stat in stats}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)  # every rank reads the same whole tensors
    return state


def _ensure_optimizer_state(strategy, like: dict[str, torch.Tensor]) -> None:
    """Create the flat optimizer state DeepSpeed's torch optimizer makes lazily at its first step."""
    for flat, state in _flat_states(strategy):
        if state:
            continue
        fresh = {}
        for key, value in like.items():
            fresh[key] = torch.zeros_like(flat) if value.dim() > 0 else torch.zeros_like(value)
        strategy.engine.optimizer.optimizer.state[flat] = fresh


@torch.no_grad()
def load_state(strategy, folder: str | Path) -> None:
    """Read a DCP ``state/`` folder (any strategy, any number of processes) into DeepSpeed's partitions."""
    import deepspeed
    from deepspeed.utils import safe_set_full_optimizer_state

    from tunekit.distributed.checkpoint import check_trainable_fit, split_keys

    check_trainable_fit(folder, strategy.model, strategy.trainable_shapes)
    trainable_keys, _ = split_keys(strategy.model)
    keyed = {id(v): k for k, v in strategy.model.state_dict(keep_vars=True).items() if k in trainable_keys}
    named = [(n, p) for n, p in strategy.model.named_parameters() if p.requires_grad]
    saved = _read_full(folder, [n for n, _ in named], [keyed[id(p)] for _, p in named])
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
        for _, p in named:  # every rank read the same values; rank 0's are re-partitioned on exit
            p.data.copy_(saved["model"][keyed[id(p)]])
    strategy.engine.optimizer.refresh_fp32_params()  # the fp32 master partitions follow
    optim = saved["optim"]["state"]
    if not optim:
        return
    _ensure_optimizer_state(strategy, next(iter(optim.values())))
    for name, p in named:
        for stat, value in optim[name].items():
            if value.dim() > 0:
                safe_set_full_optimizer_state(p, value, stat)
    for _, state in _flat_states(strategy):  # scalar entries (AdamW's step) are one per flat group
        for stat, value in next(iter(optim.values())).items():
            if value.dim() == 0:
                state[stat] = value.clone()
