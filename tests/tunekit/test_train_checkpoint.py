"""Checkpoints: atomic writes, keep-last-K, exact resume (in-process and after a real SIGTERM)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny import tiny_llama
from _train_data import ToyLM
from safetensors.torch import load_file

import tunekit.train.checkpoint as ckpt
from tunekit.adapters import LoRAConfig, inject_adapters, load_adapters
from tunekit.train import StopOnSignal, TrainConfig, Trainer, list_checkpoints

SUPPORT = Path(__file__).resolve().parents[1] / "support"
# Dropout > 0 makes the trajectory depend on the torch RNG, so resume must restore it too.
LORA = dict(rank=4, dropout=0.1, init="random")
CFG = dict(max_steps=6, batch_size=3, grad_accum_steps=2, lr=1e-2, scheduler="cosine", warmup_steps=2, log_every=1)


def run(out, data=None, **kw):
    torch.manual_seed(0)
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(**LORA))
    result = Trainer(model, data or ToyLM(n=10), TrainConfig(**{**CFG, **kw}), out).fit()
    return model, result


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6


def test_checkpoint_contents_and_keep_last(tmp_path):
    model, _ = run(tmp_path, save_every=1, keep_last=2)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-5", "step-6"]
    last = kept[-1]
    assert {p.name for p in last.iterdir()} == {
        "adapter", "trainable.safetensors", "optimizer.pt", "trainer_state.pt", "progress.json", "config.json"}
    progress = json.loads((last / "progress.json").read_text())
    # 2 steps per epoch: step 6 is the last of epoch 2 (0-based); resume moves on to epoch 3.
    assert (progress["global_step"], progress["epoch"], progress["step_in_epoch"]) == (6, 2, 2)
    assert json.loads((last / "config.json").read_text())["keep_last"] == 2
    assert load_file(str(last / "trainable.safetensors")).keys() == trainable(model).keys()
    # The adapter folder is a normal save_adapters() output: it loads back into a fresh model.
    torch.manual_seed(0)
    fresh = tiny_llama()  # the same base weights as run()'s
    load_adapters(fresh, last / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_failed_save_leaves_no_checkpoint_and_resume_uses_the_previous(tmp_path, monkeypatch):
    real_save = torch.save

    def crash_at_step_4(obj, path, *a, **kw):
        if "step-4" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", crash_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, save_every=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-2"]
    assert (root / ".tmp-step-4").exists()  # the half-written folder is never taken for a checkpoint
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-2"


def test_resume_from_a_mid_run_checkpoint_is_exact(tmp_path):
    full, _ = run(tmp_path / "full")
    run(tmp_path / "cut", save_every=3, keep_last=None)
    checkpoint = tmp_path / "cut" / "checkpoints" / "step-3"
    resumed, result = run(tmp_path / "resumed", resume=str(checkpoint))
    assert result.global_step == 6
    assert_same_weights(trainable(full), trainable(resumed))
    steps = [h["step"] for h in result.history if h["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # history continues the checkpoint's


def test_resume_auto_of_a_finished_run_trains_no_more(tmp_path):
    first, _ = run(tmp_path, save_every=6)
    again, result = run(tmp_path)
    assert result.global_step == 6
    assert_same_weights(trainable(first), trainable(again))


def test_resume_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.resume=.*no checkpoint there"):
        run(tmp_path, resume=str(tmp_path / "nowhere"))
    run(tmp_path / "a", save_every=6)
    torch.manual_seed(0)
    other = tiny_llama()
    inject_adapters(other, LoRAConfig(rank=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="trainable parameters differ"):
        Trainer(other, ToyLM(n=10), TrainConfig(**CFG, resume=str(tmp_path / "a")), tmp_path / "b").fit()


def test_stop_on_signal_restores_previous_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


SCRIPT = """
import sys, time
import torch
from _tiny import tiny_llama
from _train_data import ToyLM
from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.train import TrainConfig, Trainer


class SlowToyLM(ToyLM):
    def collate(self, rows):  # slow data, so the signal lands mid-run
        time.sleep(0.1)
        return super().collate(rows)


torch.manual_seed(0)
model = tiny_llama()
inject_adapters(model, LoRAConfig(**{lora}))
result = Trainer(model, SlowToyLM(n=10), TrainConfig(**{cfg}), sys.argv[1]).fit()
print("interrupted", result.interrupted, result.global_step, flush=True)
"""


@pytest.mark.slow  # a python subprocess importing torch + transformers, then two in-process runs: ~15 s
def test_sigterm_mid_run_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    script = SCRIPT.format(lora=LORA, cfg={**CFG, "max_steps": 8})
    env = {**os.environ, "PYTHONPATH": str(SUPPORT)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("train step 2/8"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(lines)
    out = "".join(lines)
    assert "SIGTERM: stopping after step" in out and "interrupted True" in out
    stopped_at = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(stopped_at) == 1 and 2 <= int(stopped_at[0].name.split("-")[1]) < 8
    resumed, result = run(tmp_path / "run", max_steps=8)
    assert result.global_step == 8 and not result.interrupted
    full, _ = run(tmp_path / "full", max_steps=8)
    assert_same_weights(trainable(full), trainable(resumed))
