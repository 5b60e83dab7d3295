"""Checkpoints: atomic writes, keep-last-K, and everything needed to resume exactly.

A checkpoint is one folder ``<root>/step-<N>/``::

    adapter/                  save_adapters() output (PEFT format where the method has one)
    trainable.safetensors     every trainable parameter by name (what resume loads)
    optimizer.pt              optimizer state (tensors only; loaded with weights_only=True)
    trainer_state.pt          scheduler state + RNG states (python, numpy, torch, cuda)
    progress.json             run id, global step, epoch, step in epoch, early-stopping state, history
    config.json               the run's resolved config (at least its train section)

The trainable parameters are stored by parameter name in addition to the
adapter export because resume must restore exactly what the optimizer
updates, whatever method (or no adapter at all) produced it; the adapter
folder is the user-facing artefact. Nothing is unpickled as code: tensors go
to safetensors, and the two ``.pt`` files hold only tensors and plain values.

Atomicity: the folder is written under ``.tmp-step-<N>`` and renamed into
place, so a crash leaves either a complete checkpoint or none; readers only
consider ``step-<N>`` folders that contain ``progress.json``. A folder that
looks complete but cannot be read (a truncated file) is refused by
``read_checkpoint`` with the way out, never half-loaded.

Runs: every checkpoint records the id of the run that wrote it (a resumed run
keeps its id). ``keep_last`` prunes only the run's own checkpoints, and a run
never starts in a folder holding another run's checkpoints
(``other_runs_checkpoints``), so ``resume: auto`` can never pick up a
checkpoint of a different run.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tunekit.adapters import adapter_configs, save_adapters

_STEP_DIR = re.compile(r"step-(\d+)")
PROGRESS = "progress.json"
# Errors that mean "this file is damaged" when a checkpoint file is read.
_READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError,
                SafetensorError)


def new_run_id() -> str:
    """A fresh run id (random: two runs of the same config are still two runs)."""
    return uuid.uuid4().hex[:12]


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch and every CUDA device."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.fullmatch(p.name)) and (p / PROGRESS).is_file()
    ]
    return [p for _, p in sorted(found)]


def run_id_of(folder: Path) -> str | None:
    """The id of the run that wrote checkpoint ``folder`` ("" before ids were recorded; None if unreadable)."""
    try:
        return json.loads((folder / PROGRESS).read_text(encoding="utf-8")).get("run_id", "")
    except _READ_ERRORS:
        return None


def other_runs_checkpoints(output_dir: str | Path, run_id: str | None) -> list[Path]:
    """Checkpoints under ``output_dir/checkpoints`` not written by run ``run_id`` (all of them for None).

    One whose progress.json is unreadable counts as nobody's: resuming an earlier checkpoint of
    the run is the way out ``read_checkpoint`` offers for it.
    """
    found = list_checkpoints(Path(output_dir) / "checkpoints")
    if run_id is None:
        return found
    return [p for p in found if run_id_of(p) not in (run_id, None)]


def foreign_checkpoints_message(output_dir: str | Path, foreign: list[Path], resume_from: Path | None) -> str:
    """One line refusing to mix runs in ``output_dir``, with the ways out."""
    whose = "another run" if resume_from is None else f"another run than {resume_from}"
    return (f"{Path(output_dir) / 'checkpoints'} holds {len(foreign)} checkpoint(s) of {whose} (up to "
            f"{foreign[-1].name}); set train.resume=auto to continue that run, choose a new output.dir, or set "
            "train.overwrite_checkpoints=true to delete them when this run starts")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, by name, on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` into ``model``'s trainable parameters; the names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        diff = sorted(set(params) ^ set(state))
        raise ValueError(
            f"{source}: trainable parameters differ from this model's ({len(diff)} names, e.g. {diff[0]!r}); "
            "resume with the same model and adapter config, or start over in a new output.dir"
        )
    shapes = [n for n, p in params.items() if p.shape != state[n].shape]
    if shapes:
        name = shapes[0]
        raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)} there and {tuple(params[name].shape)} "
                         "in this model; resume with the same model and adapter config, or start over in a new "
                         "output.dir")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def save_checkpoint(
    root: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, progress: dict, config: dict, keep_last: int | None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root``; prune to ``keep_last``; return its folder."""
    root = Path(root)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if adapter_configs(model):
        save_adapters(model, tmp / "adapter")
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "trainer_state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # progress.json last: its presence marks the folder complete.
    (tmp / PROGRESS).write_text(json.dumps(progress, indent=2) + "\n", encoding="utf-8")
    if final.exists():  # re-saving a step (a resumed run that stopped at once): swap, then drop
        old = root / f".old-step-{step}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep_last is not None:  # only this run's own checkpoints
        run_id = progress.get("run_id", "")
        for stale in [p for p in list_checkpoints(root) if run_id_of(p) == run_id][:-keep_last]:
            shutil.rmtree(stale)
    return final


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint folder a run should resume from, or None to start fresh.

    ``resume`` is ``"auto"`` (latest under ``output_dir/checkpoints``, if any),
    ``"never"``, a checkpoint folder, or a run folder (its latest checkpoint).

    Raises:
        FileNotFoundError: an explicit path holds no checkpoint.
    """
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if (path / PROGRESS).is_file():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"train.resume={resume!r}: no checkpoint there (expected a checkpoints/step-N folder with "
            f"{PROGRESS}); use 'auto', 'never' or an existing checkpoint folder"
        )
    return found[-1]


@dataclass
class SavedCheckpoint:
    """Everything a checkpoint folder holds, read into memory (see ``read_checkpoint``)."""

    folder: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer_state: dict[str, Any]
    progress: dict[str, Any]
    config: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.progress.get("run_id", "")


def read_checkpoint(folder: Path) -> SavedCheckpoint:
    """Read every file of checkpoint ``folder``, so a damaged one fails before anything is restored.

    Raises:
        ValueError: a file is missing or unreadable (one line naming the checkpoint and the way out).
    """
    name = "trainable.safetensors"
    try:
        trainable = load_file(str(folder / name))
        name = "optimizer.pt"
        optimizer = torch.load(folder / name, weights_only=True)
        name = "trainer_state.pt"
        trainer_state = torch.load(folder / name, weights_only=True)
        trainer_state["scheduler"], trainer_state["rng"]  # noqa: B018 - both must be there
        name = PROGRESS
        progress = json.loads((folder / name).read_text(encoding="utf-8"))
        name = "config.json"
        config = json.loads((folder / name).read_text(encoding="utf-8"))
    except _READ_ERRORS as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        earlier = [p for p in list_checkpoints(folder.parent) if _step_of(p) < _step_of(folder)]
        way_out = (f"set train.resume={earlier[-1]} to resume from the previous complete checkpoint, or "
                   if earlier else "")
        raise ValueError(f"checkpoint {folder} is damaged ({name}: {reason}); {way_out}set train.resume=never "
                         "with a new output.dir (or train.overwrite_checkpoints=true) to start over") from None
    return SavedCheckpoint(folder, trainable, optimizer, trainer_state, progress, config)


def _step_of(folder: Path) -> int:
    match = _STEP_DIR.fullmatch(folder.name)
    return int(match.group(1)) if match else -1


def restore_checkpoint(
    saved: SavedCheckpoint, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> None:
    """Restore weights, optimizer and scheduler state and RNG from ``saved``.

    The optimizer's hyperparameters (lr, weight decay, ...) stay the ones it was built with,
    i.e. the current config's, and the schedule's current lr is recomputed from them: the
    saved state holds the moments and the step, the config says how to train from here.
    With an unchanged config this is exactly the saved state.
    """
    load_trainable_state(model, saved.trainable, saved.folder)
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved.optimizer)
    for group, hyper in zip(optimizer.param_groups, configured):
        group.update(hyper)
    scheduler.load_state_dict(saved.trainer_state["scheduler"])
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # What LambdaLR.get_lr computes at this step, from the configured peak lr and schedule.
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    set_rng_state(saved.trainer_state["rng"])
