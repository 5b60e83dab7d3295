"""Run folders and resuming with a changed config.

Runs are never mixed in one folder; every config change is named (key: old -> new) with whether the
trajectory still matches an uninterrupted run; changes that alter training are refused, or applied for
real with train.resume_with_changes.
"""

import pytest
import torch
from _tiny import tiny_llama
from _train_data import ToyLM
from _trainer_runs import CFG, LORA, assert_same_weights, lora_trainer, run, snapshot, trainable

from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.train import TrainConfig, Trainer, list_checkpoints
from tunekit.train.checkpoint import read_trainable, run_id_of

# A schedule whose first steps do not depend on the run's length: warmup 0 -> 0.5 -> 1, then constant.
CONSTANT = dict(scheduler="constant", warmup_steps=2)
RUN_CONFIG = {"model": {"name_or_path": "tiny"}, "data": {"max_seq_len": 16}}


def test_a_new_run_in_a_folder_with_another_runs_checkpoints_is_refused_and_changes_nothing(tmp_path):
    run(tmp_path, save_every=2, keep_last=2)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        lora_trainer(tmp_path, resume="never")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "checkpoints") in message and "up to step-6" in message
    assert all(way in message for way in ("train.resume=auto", "output.dir", "train.overwrite_checkpoints=true"))
    assert snapshot(tmp_path) == before


def test_overwrite_checkpoints_starts_a_clean_run_that_resume_auto_then_follows(tmp_path):
    run(tmp_path, save_every=2, keep_last=None)  # the old run: step-2, step-4, step-6
    old_id = run_id_of(tmp_path / "checkpoints" / "step-6")
    alone, _ = run(tmp_path / "alone", max_steps=4, save_every=2)
    new, result = run(tmp_path, max_steps=4, save_every=2, resume="never", overwrite_checkpoints=True)
    assert_same_weights(trainable(alone), trainable(new))
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-2", "step-4"]  # the old run's step-6 is gone with it
    assert {run_id_of(p) for p in kept} == {run_id_of(result.checkpoint_dir)} != {old_id}
    again, again_result = run(tmp_path, max_steps=4, save_every=2)  # resume: auto picks the new run's step-4
    assert again_result.global_step == 4
    assert_same_weights(trainable(new), trainable(again))


def test_resuming_a_checkpoint_into_a_folder_of_another_run_is_refused(tmp_path):
    run(tmp_path / "a", save_every=3, keep_last=None)
    run(tmp_path / "b", save_every=3)
    step_3 = tmp_path / "a" / "checkpoints" / "step-3"
    with pytest.raises(ValueError, match=f"another run than {step_3}"):
        lora_trainer(tmp_path / "b", resume=str(step_3))
    _, result = run(tmp_path / "c", resume=str(step_3), save_every=6)  # an empty folder continues run a
    assert run_id_of(result.checkpoint_dir) == run_id_of(step_3)


def test_a_harmless_change_is_named_and_the_run_still_matches_an_uninterrupted_one(tmp_path, capsys):
    full, _ = run(tmp_path / "full", **CONSTANT)
    run(tmp_path / "cut", **CONSTANT, max_steps=3, save_every=3)
    capsys.readouterr()
    resumed, _ = run(tmp_path / "cut", **CONSTANT, log_every=2, keep_last=2)  # max_steps back to 6
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming from"))
    assert line == (f"resuming from {tmp_path / 'cut' / 'checkpoints' / 'step-3'} at step 3; changed without effect "
                    "on the trajectory: train.keep_last: 3 -> 2, train.log_every: 1 -> 2, train.max_steps: 3 -> 6, "
                    "train.save_every: 3 -> None")
    assert_same_weights(trainable(full), trainable(resumed))


@pytest.mark.parametrize(("change", "named"), [
    ({"max_steps": 8}, "train.max_steps: 6 -> 8"),  # cosine: the 6 steps taken had other learning rates
    ({"lr": 2e-2}, "train.lr: 0.01 -> 0.02"),
    ({"batch_size": 2}, "train.batch_size: 3 -> 2"),
    ({"seed": 1}, "train.seed: 0 -> 1"),
    ({"run_config": {**RUN_CONFIG, "data": {"max_seq_len": 32}}}, "data.max_seq_len: 16 -> 32"),
    ({"run_config": {**RUN_CONFIG, "model": {"name_or_path": "other"}}}, "model.name_or_path: 'tiny' -> 'other'"),
])
def test_a_change_that_alters_training_is_refused_naming_it(tmp_path, change, named):
    run(tmp_path, save_every=6, run_config=RUN_CONFIG)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        lora_trainer(tmp_path, **{"run_config": RUN_CONFIG, **change})
    message = str(info.value)
    assert "\n" not in message and f"at step 6 refused: {named} would change training" in message
    assert "train.resume_with_changes=true" in message and "new output.dir" in message
    assert snapshot(tmp_path) == before


def test_resume_with_changes_applies_a_new_lr_for_real(tmp_path, capsys):
    # Plain SGD: step 4's update is -lr * g, with g the same whatever the lr (same weights, rows, RNG).
    sgd = dict(optimizer="sgd", scheduler="constant", warmup_steps=0, max_grad_norm=None, lr=0.5, keep_last=None)
    data = ToyLM(n=10)
    run(tmp_path / "a", data, **sgd, max_steps=3, save_every=3)
    w3 = read_trainable(tmp_path / "a" / "checkpoints" / "step-3")
    step_3 = str(tmp_path / "a" / "checkpoints" / "step-3")
    same, _ = run(tmp_path / "same", data, **sgd, max_steps=4, resume=step_3)
    capsys.readouterr()
    changed, result = run(tmp_path / "changed", data, **{**sgd, "lr": 0.1}, max_steps=4, resume=step_3,
                          resume_with_changes=True)
    assert "applying from this step on (the run will match no uninterrupted run): train.lr: 0.5 -> 0.1" in \
        capsys.readouterr().out
    assert [h["lr"] for h in result.history if h["split"] == "train"][-1] == 0.1
    same, changed = trainable(same), trainable(changed)
    expected = {n: w3[n] - 0.2 * (w3[n] - same[n]) for n in w3}  # 0.1 / 0.5 of the update
    assert max((w3[n] - same[n]).abs().max().item() for n in w3) > 1e-4  # the step moved the weights
    assert_same_weights(changed, expected, tol=1e-6)


def test_a_changed_optimizer_is_refused_even_with_resume_with_changes(tmp_path):
    run(tmp_path, save_every=6)
    with pytest.raises(ValueError, match=r"train.optimizer: 'adamw' -> 'sgd'; the saved optimizer state"):
        lora_trainer(tmp_path, optimizer="sgd", resume_with_changes=True)


def test_a_changed_adapter_shape_is_refused_at_start_even_with_resume_with_changes(tmp_path):
    # issue 15: a new adapter.rank used to end in a raw tensor-size error mid-load.
    run_config = {**RUN_CONFIG, "adapter": {"method": "lora", "rank": 4}}
    run(tmp_path, save_every=6, run_config=run_config)
    before = snapshot(tmp_path)
    torch.manual_seed(0)
    wider = tiny_llama()
    inject_adapters(wider, LoRAConfig(**{**LORA, "rank": 8}))
    with pytest.raises(ValueError) as info:
        Trainer(wider, ToyLM(n=10), TrainConfig(**CFG, resume_with_changes=True), tmp_path,
                run_config={**RUN_CONFIG, "adapter": {"method": "lora", "rank": 8}})
    message = str(info.value)
    assert "\n" not in message and f"resuming from {tmp_path / 'checkpoints' / 'step-6'} refused" in message
    assert "adapter.rank: 4 -> 8" in message and "has shape (4, 32) there and (8, 32) in this model" in message
    assert snapshot(tmp_path) == before


def test_another_split_of_the_same_global_batch_is_allowed_and_named(tmp_path, capsys):
    # batch 3 x accumulation 2 and batch 6 x 1 read the same 6 rows per step (with several processes,
    # they multiply in): resuming with the other split is allowed, named, and without dropout ends where
    # the uninterrupted run ends, up to the rounding of another summation order.
    def fit(out, **cfg):
        torch.manual_seed(0)
        model = tiny_llama()
        inject_adapters(model, LoRAConfig(**{**LORA, "dropout": 0.0}))
        Trainer(model, ToyLM(n=10), TrainConfig(**{**CFG, **CONSTANT, **cfg}), out).fit()
        return trainable(model)

    full = fit(tmp_path / "full")
    fit(tmp_path / "cut", max_steps=3, save_every=3)
    capsys.readouterr()
    resumed = fit(tmp_path / "cut", batch_size=6, grad_accum_steps=1)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming from"))
    assert "the same global batch of 6 rows split another way" in line
    assert line.endswith("train.batch_size: 3 -> 6, train.grad_accum_steps: 2 -> 1")
    assert_same_weights(full, resumed, tol=1e-6)


def test_a_checkpoint_of_an_earlier_tunekit_is_refused_in_one_line(tmp_path):
    old = tmp_path / "checkpoints" / "step-2"
    old.mkdir(parents=True)
    (old / "trainable.safetensors").write_bytes(b"")
    (old / "progress.json").write_text('{"run_id": "x", "global_step": 2}', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        lora_trainer(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "written by an earlier tunekit version (trainable.safetensors)" in message
    assert "train.resume=never" in message
