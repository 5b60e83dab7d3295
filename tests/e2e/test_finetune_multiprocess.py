"""`tunekit finetune CONFIG --nproc 2` end to end, for every strategy, against one process on the same global batch.

The reference is `tunekit finetune` on one process with batch 6 x accumulation 2; each
2-process run has batch 3 x accumulation 2 (global batch 12, the same rows in every forward).
Per strategy: the per-step losses logged in metrics.jsonl, the evaluations and results.json
equal the reference's (1e-5 relative), the adapter equals the reference's and loads in PEFT
with the same outputs, the checkpoint holds trainable tensors only. DDP runs under an external
`torchrun` (the same command, unchanged). Then SIGTERM to the launcher: exit 130, a checkpoint,
and the same command resumes to the uninterrupted run's adapter, bit for bit; the checkpoint
also resumes on one process (within 1e-6).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _tiny_runs import run_config
from _tolerances import DIST_LOSS_REL, DIST_RESUME_OTHER_WORLD, FP32_EXACT, max_abs_diff
from safetensors.torch import load_file

from tunekit.cli import main
from tunekit.inference import load_adapted
from tunekit.train import list_checkpoints
from tunekit.train.trainer import READY_MESSAGE

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STRATEGIES = {
    "fsdp": {"strategy": "fsdp"},
    "fsdp_offload": {"strategy": "fsdp", "cpu_offload": True},
    "deepspeed": {"strategy": "deepspeed"},
    "deepspeed_offload": {"strategy": "deepspeed", "cpu_offload": True},
}
TRAIN = {"max_steps": 4, "grad_accum_steps": 2, "eval_every": 2, "save_every": 2, "log_every": 1}
IDS = torch.tensor([[1, 30, 40, 50, 60, 70]])


def _write(tmp: Path, name: str, distributed: dict, batch_size: int, **train) -> tuple[Path, Path]:
    """A run config (YAML file) of the tiny causal LM, and its output folder."""
    cfg = run_config(tmp, "causal_lm", "lora")
    cfg["train"].update(TRAIN, batch_size=batch_size, **train)
    cfg["distributed"] = distributed
    cfg["output"]["dir"] = str(tmp / name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path, tmp / name


def _records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("multiprocess")
    path, out = _write(tmp, "one", {"strategy": "none"}, batch_size=6)
    assert main(["finetune", str(path)]) == 0
    return tmp, out


def _assert_same_run(out: Path, ref: Path) -> None:
    for split, keys in (("train", ("loss",)), ("eval", ("loss", "perplexity"))):
        ours, theirs = _records(out, split), _records(ref, split)
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] and theirs
        for a, b in zip(ours, theirs):
            assert all(abs(a[k] - b[k]) <= DIST_LOSS_REL * abs(b[k]) for k in keys), (split, a, b)
    ours, theirs = json.loads((out / "results.json").read_text()), json.loads((ref / "results.json").read_text())
    for when in ("before", "after"):
        assert abs(ours[when]["loss"] - theirs[when]["loss"]) <= DIST_LOSS_REL * theirs[when]["loss"]
    a, b = _adapter(out), _adapter(ref)
    assert sorted(a) == sorted(b) and all(max_abs_diff(a[k], b[k]) <= FP32_EXACT for k in b)


def _assert_peft_loads_it(out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((out / "adapter" / "tunekit_base.json").read_text(encoding="utf-8"))["model"]["name_or_path"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter").eval()
    ours = load_adapted(out / "adapter").model
    with torch.no_grad():
        assert max_abs_diff(peft_model(input_ids=IDS).logits, ours(input_ids=IDS).logits) <= FP32_EXACT


def _assert_checkpoint_is_trainable_only(out: Path, nproc: int = 2) -> None:
    from tunekit.train.checkpoint import read_trainable

    last = list_checkpoints(out / "checkpoints")[-1]
    assert last.name == "step-4"
    assert sorted(last.glob("rng-rank*.pt")) == sorted(last / f"rng-rank{r}.pt" for r in range(nproc))
    saved = read_trainable(last)
    assert saved and all(".adapters." in key for key in saved)  # the LoRA factors, no base weight


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_finetune_on_two_processes_equals_one_process(reference, name, capfd):
    tmp, ref = reference
    path, out = _write(tmp, name, STRATEGIES[name], batch_size=3)
    assert main(["finetune", str(path), "--nproc", "2"]) == 0
    log = capfd.readouterr().out
    assert "peak memory per rank" in log
    # fsdp: rank 1 built the base on the meta device and got every tensor from rank 0 (rank0_fill)
    assert ("base: loaded by rank 0 only" in log) == name.startswith("fsdp")
    _assert_same_run(out, ref)
    _assert_peft_loads_it(out)
    _assert_checkpoint_is_trainable_only(out)


# Tensor parallelism: the TP ranks of a group read the same rows, so the data-parallel size is
# nproc / tp_size and the per-rank batch keeps the global batch of 12.
# As the cookbook's 70B recipes run: tp with sequence parallelism, fsdp_tp with activation checkpointing.
TENSOR_PARALLEL = {
    "tp": ({"strategy": "tp", "tp_size": 2, "sequence_parallel": True}, 2, 6, {}),
    "fsdp_tp": ({"strategy": "fsdp_tp", "tp_size": 2}, 4, 3, {"gradient_checkpointing": True}),  # 2 x 2
}


@pytest.mark.parametrize("name", list(TENSOR_PARALLEL))
def test_finetune_tensor_parallel_equals_one_process(reference, name, capfd):
    tmp, ref = reference
    distributed, nproc, batch_size, train = TENSOR_PARALLEL[name]
    path, out = _write(tmp, name, distributed, batch_size=batch_size, **train)
    assert main(["finetune", str(path), "--nproc", str(nproc)]) == 0
    assert "peak memory per rank" in capfd.readouterr().out
    _assert_same_run(out, ref)
    _assert_peft_loads_it(out)
    _assert_checkpoint_is_trainable_only(out, nproc)


def test_ddp_under_an_external_torchrun_runs_the_same_command_unchanged(reference):
    tmp, ref = reference
    path, out = _write(tmp, "ddp", {"strategy": "ddp"}, batch_size=3)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tunekit", "finetune", str(path)]
    proc = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(out, ref)


def _interrupt(path: Path, cwd: Path) -> str:
    """Start `tunekit finetune PATH --nproc 2`, SIGTERM the launcher once training is under way; its output."""
    proc = subprocess.Popen([sys.executable, "-m", "tunekit", "finetune", str(path), "--nproc", "2"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:  # the line comes once every rank has its handlers installed
        lines.append(line)
        if line.strip() == READY_MESSAGE:
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    return output


def test_sigterm_to_the_launcher_checkpoints_and_the_same_command_resumes(reference, tmp_path):
    tmp, _ = reference
    # A constant schedule: the rerun may stop earlier than the first run would have, harmlessly.
    cut, cut_out = _write(tmp_path, "cut", {"strategy": "fsdp"}, batch_size=3, max_steps=100_000, save_every=None,
                          eval_every=None, scheduler="constant")
    output = _interrupt(cut, tmp_path)
    assert "SIGTERM: stopping after step" in output and "run the same command again" in output
    assert not (cut_out / "adapter").exists()
    stopped = list_checkpoints(cut_out / "checkpoints")
    assert len(stopped) == 1
    step = int(stopped[0].name.split("-")[1])
    end = [f"train.max_steps={step + 2}"]

    assert main(["finetune", str(cut), *end, "--nproc", "2"]) == 0
    assert [r["step"] for r in _records(cut_out, "train")] == list(range(1, step + 3))  # continued, not restarted
    whole, whole_out = _write(tmp_path, "whole", {"strategy": "fsdp"}, batch_size=3, save_every=None,
                              eval_every=None, scheduler="constant")
    assert main(["finetune", str(whole), *end, "--nproc", "2"]) == 0
    ours, theirs = _adapter(cut_out), _adapter(whole_out)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # The 2-process checkpoint resumes on one process: batch 6 keeps the global batch of 12.
    alone = tmp_path / "alone"
    args = [f"train.resume={stopped[0]}", "train.batch_size=6", "distributed.strategy=none", f"output.dir={alone}"]
    assert main(["finetune", str(cut), *end, *args]) == 0
    ours = _adapter(alone)
    assert all(max_abs_diff(ours[k], theirs[k]) <= DIST_RESUME_OTHER_WORLD for k in theirs)


def test_tunekit_merge_streams_the_base_and_equals_the_in_memory_merge(reference, tmp_path, capsys):
    from tunekit.inference import merge_adapter

    _, ref = reference
    assert main(["merge", str(ref / "adapter"), "--out", str(tmp_path / "streamed")]) == 0
    assert "(streamed shard by shard)" in capsys.readouterr().out
    merge_adapter(ref / "adapter", tmp_path / "in-memory")  # the model loaded whole, merged, saved
    ours, theirs = load_file(str(tmp_path / "streamed" / "model.safetensors")), \
        load_file(str(tmp_path / "in-memory" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    with torch.no_grad():
        assert max_abs_diff(plain(input_ids=IDS).logits, load_adapted(ref / "adapter").model(input_ids=IDS).logits) \
            <= FP32_EXACT
