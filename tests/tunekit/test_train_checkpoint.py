"""Checkpoints: atomic writes, keep-last-K per run, damaged checkpoints refused, exact resume (in-process
and after a real SIGTERM), early stopping's last checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import tiny_llama
from _train_data import ToyLM
from _trainer_runs import CFG, LORA, assert_same_weights, learner, lora_model, lora_trainer, run, trainable
import tunekit.train.checkpoint as ckpt
from tunekit.adapters import LoRAConfig, inject_adapters, load_adapters
from tunekit.distributed import DistributedOptions, make_strategy
from tunekit.train import StopOnSignal, TrainConfig, Trainer, build_optimizer, build_scheduler, list_checkpoints
from tunekit.train.trainer import READY_MESSAGE

SUPPORT = Path(__file__).resolve().parents[1] / "support"


def test_checkpoint_contents_and_keep_last(tmp_path):
    model, _ = run(tmp_path, save_every=1, keep_last=2)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-5", "step-6"]
    last = kept[-1]
    assert {p.name for p in last.iterdir()} == {
        "adapter", "state", "rng-rank0.pt", "trainer_state.pt", "progress.json", "config.json"}
    progress = json.loads((last / "progress.json").read_text(encoding="utf-8"))
    # 2 steps per epoch: step 6 is the last of epoch 2 (0-based); resume moves on to epoch 3.
    assert (progress["global_step"], progress["epoch"], progress["step_in_epoch"]) == (6, 2, 2)
    assert progress["samples_in_epoch"] == 10  # all 10 rows (3 x 2 rows per step, the last step short)
    assert len(progress["run_id"]) >= 8 and ckpt.run_id_of(kept[0]) == progress["run_id"]  # one run
    assert json.loads((last / "config.json").read_text(encoding="utf-8"))["train"]["keep_last"] == 2
    saved = ckpt.read_trainable(last)
    assert saved.keys() == trainable(model).keys()  # trainable tensors only: no frozen base weight
    assert all(torch.equal(saved[n], p) for n, p in trainable(model).items())
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


def test_keep_last_prunes_only_the_runs_own_checkpoints(tmp_path):
    strategy = make_strategy(DistributedOptions())
    _, optimizer = strategy.prepare(lora_model(), lambda m: build_optimizer(m, TrainConfig()))
    scheduler = build_scheduler(optimizer, TrainConfig(), 10)
    for step, run_id in [(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "b")]:
        ckpt.save_checkpoint(tmp_path, step, strategy=strategy, scheduler=scheduler,
                             progress={"run_id": run_id, "global_step": step}, config={}, keep_last=1)
    assert [(p.name, ckpt.run_id_of(p)) for p in list_checkpoints(tmp_path)] == [("step-2", "a"), ("step-5", "b")]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """(run folder with step-2, step-4 and step-6, the run's final weights)."""
    out = tmp_path_factory.mktemp("checkpointed")
    model, _ = run(out, save_every=2, keep_last=None)
    return out, trainable(model)


@pytest.mark.parametrize("damaged", ["state/__0_0.distcp", "state/.metadata", "rng-rank0.pt", "progress.json"])
def test_a_damaged_checkpoint_is_refused_naming_the_previous_complete_one(tmp_path, checkpointed_run, damaged):
    source, final_weights = checkpointed_run
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    root = tmp_path / "checkpoints"
    file = root / "step-6" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # complete-looking, truncated
    with pytest.raises(ValueError) as info:
        lora_trainer(tmp_path)  # resume: auto picks step-6
    message = str(info.value)
    assert "\n" not in message and f"checkpoint {root / 'step-6'} is damaged ({damaged}:" in message
    assert f"train.resume={root / 'step-4'}" in message and "train.resume=never" in message
    # The way out it names works, and the run ends with the uninterrupted run's weights.
    resumed, result = run(tmp_path, resume=str(root / "step-4"), save_every=2)
    assert result.global_step == 6
    assert_same_weights(final_weights, trainable(resumed))


@pytest.mark.parametrize("save_every", [1, 2])  # 1 divides the stop step (3), 2 does not
def test_early_stopping_last_checkpoint_holds_the_restored_best_weights(tmp_path, save_every):
    # Training lowers the loss, so with "max" it stops at step 3 with the best evaluation at step 1.
    cfg = TrainConfig(max_steps=10, batch_size=4, lr=3e-2, eval_every=1, early_stopping_patience=2,
                      early_stopping_mode="max", save_every=save_every, resume="never")
    torch.manual_seed(0)
    model, data = learner()
    result = Trainer(model, data, cfg, tmp_path).fit()
    assert result.stopped_early and (result.global_step, result.best_step) == (3, 1)
    torch.manual_seed(0)
    one_step, data = learner()
    Trainer(one_step, data, cfg.model_copy(update={"max_steps": 1}), tmp_path / "one").fit()
    last = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert last.name == "step-3" and result.checkpoint_dir == last
    assert_same_weights(ckpt.read_trainable(last), trainable(one_step), tol=0.0)
    # Resuming the finished run keeps those weights and reports the best evaluation.
    torch.manual_seed(0)
    again_model, data = learner()
    again = Trainer(again_model, data, cfg.model_copy(update={"resume": "auto"}), tmp_path).fit()
    assert again.global_step == 3 and again.final_metrics == result.best_metrics
    assert_same_weights(trainable(again_model), trainable(one_step), tol=0.0)


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
        signal.raise_signal(signal.SIGTERM)  # returns after the Python handler ran
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


SCRIPT = """
import pathlib, sys, time
import torch
from _tiny import tiny_llama
from _train_data import ToyLM
from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.train import TrainConfig, Trainer


class GatedToyLM(ToyLM):
    def collate(self, rows):  # no batch before the test says it has signalled: the signal lands mid-run
        deadline = time.monotonic() + 120
        while not pathlib.Path("signalled").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return super().collate(rows)


torch.manual_seed(0)
model = tiny_llama()
inject_adapters(model, LoRAConfig(**{lora}))
result = Trainer(model, GatedToyLM(n=10), TrainConfig(**{cfg}), sys.argv[1]).fit()
print("interrupted", result.interrupted, result.global_step, flush=True)
"""


@pytest.mark.slow  # a python subprocess importing torch + transformers, then two in-process runs: ~15 s
def test_sigterm_mid_run_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    script = SCRIPT.format(lora=LORA, cfg={**CFG, "max_steps": 8})
    env = {**os.environ, "PYTHONPATH": str(SUPPORT)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # signal once the trainer says its handler is installed, however slow the machine
        lines.append(line)
        if line.strip() == READY_MESSAGE:
            proc.send_signal(signal.SIGTERM)
            (tmp_path / "signalled").touch()
    assert proc.wait(timeout=120) == 0, "".join(lines)
    out = "".join(lines)
    assert "SIGTERM: stopping after step" in out and "interrupted True" in out
    stopped_at = list_checkpoints(tmp_path / "run" / "checkpoints")
    # before the first step, or during it (its batch waits for the signal)
    assert [p.name for p in stopped_at] in (["step-0"], ["step-1"])
    resumed, result = run(tmp_path / "run", max_steps=8)
    assert result.global_step == 8 and not result.interrupted
    full, _ = run(tmp_path / "full", max_steps=8)
    assert_same_weights(trainable(full), trainable(resumed))
