"""Checkpoints: atomic writes, keep-last-K, and everything needed to resume exactly.

A checkpoint is one folder ``<root>/step-<N>/``::

    adapter/                  save_adapters() output (PEFT format where the method has one)
    trainable.safetensors     every trainable parameter by name (what resume loads)
    optimizer.pt              optimizer state (tensors only; loaded with weights_only=True)
    trainer_state.pt          scheduler state + RNG states (python, numpy, torch, cuda)
    progress.json             global step, epoch, step in epoch, early-stopping state, history
    config.json               the TrainConfig of the run

The trainable parameters are stored by parameter name in addition to the
adapter export because resume must restore exactly what the optimizer
updates, whatever method (or no adapter at all) produced it; the adapter
folder is the user-facing artefact. Nothing is unpickled as code: tensors go
to safetensors, and the two ``.pt`` files hold only tensors and plain values.

Atomicity: the folder is written under ``.tmp-step-<N>`` and renamed into
place, so a crash leaves either a complete checkpoint or none; readers only
consider ``step-<N>`` folders that contain ``progress.json``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunekit.adapters import adapter_configs, save_adapters

_STEP_DIR = re.compile(r"step-(\d+)")
PROGRESS = "progress.json"


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
            "resume with the same model and adapter config, or set train.resume=never"
        )
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
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # progress.json last: its presence marks the folder complete.
    (tmp / PROGRESS).write_text(json.dumps(progress, indent=2) + "\n")
    if final.exists():  # re-saving a step (a resumed run that stopped at once): swap, then drop
        old = root / f".old-step-{step}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep_last is not None:
        for stale in list_checkpoints(root)[:-keep_last]:
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


def load_checkpoint(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``folder``; return its progress record."""
    load_trainable_state(model, load_file(str(folder / "trainable.safetensors")), folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    trainer_state = torch.load(folder / "trainer_state.pt", weights_only=True)
    scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(trainer_state["rng"])
    return json.loads((folder / PROGRESS).read_text())
