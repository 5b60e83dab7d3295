"""`tunekit finetune CONFIG distributed.strategy=auto --nproc 2` end to end on CPU processes (gloo).

The job's devices are its two CPU processes; the test gives them a memory size (a patched
``Devices.detect``, inherited by the forked workers) between the planner's FSDP and DDP
peaks for this model, so auto must pick fsdp: the launcher validates that choice, rank 0
decides it again from the smallest devices of every rank (its own are made large enough
for ddp), broadcasts it before any mesh, every rank
builds the FSDP mesh and trains, rank 0 logs the line once, and the run folder and the
checkpoint record fsdp (a resume keeps it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from _tiny import tiny_llama, tiny_tokenizer
from _tiny_runs import run_config

from tunekit.auto_strategy import decide
from tunekit.cli import main
from tunekit.config import load_config
from tunekit.estimate.inputs import from_finetune_config
from tunekit.estimate.planner import Devices, plan
from tunekit.train import list_checkpoints

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _write(tmp: Path) -> Path:
    model_dir = tmp / "llama-8x128"  # 8 blocks: sharding the frozen base saves more than FSDP's gathered units cost
    tiny_llama(layers=8, hidden_size=128, intermediate_size=256, head_dim=32).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    cfg = run_config(tmp, "causal_lm", "lora", steps=2)
    cfg["model"]["name_or_path"] = str(model_dir)
    cfg["train"].update(batch_size=3, grad_accum_steps=2, save_every=2)
    cfg["output"]["dir"] = str(tmp / "run")
    path = tmp / "auto.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _cpu_processes(memory: int, rank0_memory: int):
    """A ``Devices.detect`` where rank 0 sees ``rank0_memory`` per process and every other process ``memory``."""
    def detect(cls, headroom: float = 0.1, *, processes=None, per_node=None):
        count = processes or 1
        mine = rank0_memory if os.environ.get("RANK") == "0" else memory
        return cls(count, mine, None, per_node or count, "cpu", headroom)

    return classmethod(detect)


def test_auto_on_two_processes_picks_fsdp_trains_and_records_it(tmp_path, monkeypatch, capfd):
    path = _write(tmp_path)
    cfg = load_config(path, ["distributed.strategy=auto"])
    spec, settings, _ = from_finetune_config(cfg)
    peaks = {r.layout.label: r.peak for r in plan(spec, settings, Devices(count=2, memory=2**40, kind="cpu")).rows}
    fsdp, ddp = peaks["FSDP2 ZeRO-3"], peaks["DDP"]
    assert fsdp < ddp
    memory = int((fsdp + ddp) / 2 / 0.9)  # usable memory between the two peaks
    # Rank 0 alone would pick ddp: the choice must come from the smallest devices of all ranks.
    monkeypatch.setattr(Devices, "detect", _cpu_processes(memory, rank0_memory=2**40))

    assert main(["finetune", str(path), "distributed.strategy=auto", "--nproc", "2"]) == 0
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("distributed.strategy auto")]
    assert len(lines) == 1, out  # rank 0 alone logs it
    assert lines[0].startswith("distributed.strategy auto -> fsdp: LoRA on llama-8x128")
    assert "cheaper layouts need" in lines[0] and "with ddp" in lines[0] and "on 2 CPU processes" in lines[0]

    run = tmp_path / "run"
    resolved = (run / "resolved_config.yaml").read_text(encoding="utf-8")
    assert resolved.splitlines()[0] == f"# {lines[0]}"
    assert yaml.safe_load(resolved)["distributed"]["strategy"] == "fsdp"
    losses = [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
              if json.loads(r)["split"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    checkpoint = list_checkpoints(run / "checkpoints")[-1]
    saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    assert saved["distributed"]["strategy"] == "fsdp"

    # A resume of this run keeps the checkpoint's strategy, even where ddp would now fit.
    kept = decide(cfg, Devices(count=2, memory=2**40, kind="cpu"))
    assert kept.distributed["strategy"] == "fsdp" and f"as the checkpoint it resumes ({checkpoint})" in kept.line
