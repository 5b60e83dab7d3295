"""Checkpoints: atomic writes from every rank, keep-last-K, and everything needed to resume exactly.

A checkpoint is one folder ``<root>/step-<N>/``, the same for every strategy and
any number of processes::

    state/                    trainable parameters + optimizer state in torch DCP format, each rank
                              writing its shards (``tunekit.distributed.checkpoint``); loads on any number
                              of processes under any strategy
    adapter/                  the gathered adapter, as the final save writes it (PEFT format where the
                              method has one), when the model has adapters
    rng-rank<r>.pt            every rank's RNG states (python, numpy, torch, cuda)
    trainer_state.pt          scheduler state and the number of processes that wrote the checkpoint
    config.json               the run's resolved config
    progress.json             run id, global step, epoch, samples consumed in the epoch, early-stopping
                              state, history; written last: its presence marks the folder complete

The frozen base is never in a checkpoint (it is reloaded from its source). Nothing
is unpickled as code: the two ``.pt`` files hold only tensors and plain values.

Atomicity: every rank writes into ``.tmp-step-<N>``; after a barrier rank 0 writes
the small files, renames the folder into place and prunes, then a barrier (the
folder must be on a file system all ranks share). A crash leaves either a complete
checkpoint or none; readers only consider ``step-<N>`` folders that contain
``progress.json``. A folder that looks complete but cannot be read (a truncated
file) is refused by ``read_checkpoint`` with the way out, never half-loaded.

Runs: every checkpoint records the id of the run that wrote it (a resumed run
keeps its id; rank 0's id, broadcast, so every rank agrees). ``keep_last``
prunes only the run's own checkpoints, and a run never starts in a folder
holding another run's checkpoints (``other_runs_checkpoints``), so
``resume: auto`` can never pick up a checkpoint of a different run.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"step-(\d+)")
PROGRESS = "progress.json"
# Errors that mean "this file is damaged" when a checkpoint file is read.
_READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError)
STATE, TRAINER_STATE, CONFIG = "state", "trainer_state.pt", "config.json"
LEGACY_WEIGHTS = "trainable.safetensors"
"""The one-process checkpoint format of earlier tunekit versions (refused, see ``read_checkpoint``)."""


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


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(
    root: str | Path, step: int, *, strategy: Any, scheduler: Any, progress: dict, config: dict,
    keep_last: int | None, write_adapter: Callable[[Path], Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` from every rank, atomically; prune to ``keep_last``; return its folder.

    Collective: every rank calls it. ``strategy`` writes the trainable state
    (``strategy.save_state``); ``write_adapter(folder)`` (collective, optional) adds the adapter.
    """
    root = Path(root)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()
    strategy.save_state(tmp / STATE)
    torch.save(rng_state(), tmp / f"rng-rank{strategy.runtime.rank}.pt")
    if write_adapter is not None:
        write_adapter(tmp / "adapter")
    strategy.barrier()
    if strategy.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "world_size": strategy.runtime.world_size},
                   tmp / TRAINER_STATE)
        _write_json(tmp / CONFIG, config)
        _write_json(tmp / PROGRESS, progress)  # last: its presence marks the folder complete
        _swap_into_place(tmp, final, root)
        if keep_last is not None:  # only this run's own checkpoints
            run_id = progress.get("run_id", "")
            for stale in [p for p in list_checkpoints(root) if run_id_of(p) == run_id][:-keep_last]:
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
    """A checkpoint folder whose files were all found readable (``read_checkpoint``); tensors are not loaded."""

    folder: Path
    progress: dict[str, Any]
    config: dict[str, Any]
    world_size: int
    """Processes that wrote it (each left its ``rng-rank<r>.pt``)."""

    @property
    def run_id(self) -> str:
        return self.progress.get("run_id", "")


def _damaged(folder: Path, name: str, reason: str) -> ValueError:
    earlier = [p for p in list_checkpoints(folder.parent) if _step_of(p) < _step_of(folder)]
    way_out = f"set train.resume={earlier[-1]} to resume from the previous complete checkpoint, or " if earlier else ""
    return ValueError(f"checkpoint {folder} is damaged ({name}: {reason}); {way_out}set train.resume=never "
                      "with a new output.dir (or train.overwrite_checkpoints=true) to start over")


def read_checkpoint(folder: Path) -> SavedCheckpoint:
    """Check every file of checkpoint ``folder`` and read its small ones, so a damaged one fails before
    anything is restored (the tensors' files are checked against the sizes DCP recorded, not loaded).

    Raises:
        ValueError: a file is missing or unreadable, or the folder is an earlier tunekit's one-process
            format (one line naming the checkpoint and the way out).
    """
    from tunekit.distributed.checkpoint import check_dcp_files

    if (folder / LEGACY_WEIGHTS).is_file() and not (folder / STATE).exists():
        raise ValueError(f"checkpoint {folder} was written by an earlier tunekit version ({LEGACY_WEIGHTS}), which "
                         "this one does not resume; set train.resume=never with a new output.dir (or "
                         "train.overwrite_checkpoints=true) to start over (its adapter/ folder still loads)")
    name = PROGRESS
    try:
        progress = json.loads((folder / name).read_text(encoding="utf-8"))
        name = CONFIG
        config = json.loads((folder / name).read_text(encoding="utf-8"))
        name = TRAINER_STATE
        trainer_state = torch.load(folder / name, weights_only=True)
        trainer_state["scheduler"]  # noqa: B018 - must be there
        world = int(trainer_state["world_size"])
        for rank in range(world):
            name = f"rng-rank{rank}.pt"
            torch.load(folder / name, weights_only=True)["torch"]  # noqa: B018
        name = STATE
        check_dcp_files(folder / STATE)  # raises "<file>: <reason>"
    except _READ_ERRORS as err:
        if name == STATE and isinstance(err, ValueError):
            file, _, reason = str(err).partition(": ")
            raise _damaged(folder, f"{STATE}/{file}", reason) from None
        raise _damaged(folder, name, " ".join(str(err).split())[:160] or type(err).__name__) from None
    return SavedCheckpoint(folder, progress, config, world)


def read_trainable(folder: str | Path) -> dict[str, torch.Tensor]:
    """Checkpoint ``folder``'s trainable tensors, whole, on the CPU, by state-dict key (for inspection)."""
    from tunekit.distributed.checkpoint import read_trainable_state

    return read_trainable_state(Path(folder) / STATE)


def _step_of(folder: Path) -> int:
    match = _STEP_DIR.fullmatch(folder.name)
    return int(match.group(1)) if match else -1


def restore_checkpoint(saved: SavedCheckpoint, *, strategy: Any, scheduler: Any) -> None:
    """Restore the trainable weights, optimizer and scheduler state and this rank's RNG from ``saved``.

    The optimizer's hyperparameters (lr, weight decay, ...) stay the ones it was built with,
    i.e. the current config's, and the schedule's current lr is recomputed from them: the
    saved state holds the moments and the step, the config says how to train from here.
    With an unchanged config this is exactly the saved state. On another number of processes
    than the checkpoint's, rank ``r`` takes the RNG of saved rank ``r % saved`` (dropout
    streams then differ from an uninterrupted run).
    """
    optimizer = strategy.optimizer
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    strategy.load_state(saved.folder / STATE)
    for group, hyper in zip(optimizer.param_groups, configured):
        group.update(hyper)
    trainer_state = torch.load(saved.folder / TRAINER_STATE, weights_only=True)
    scheduler.load_state_dict(trainer_state["scheduler"])
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # What LambdaLR.get_lr computes at this step, from the configured peak lr and schedule.
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    rank = strategy.runtime.rank % saved.world_size
    set_rng_state(torch.load(saved.folder / f"rng-rank{rank}.pt", weights_only=True))
