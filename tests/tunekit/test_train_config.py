"""TrainConfig validation, optimizer selection and lr schedules (vs transformers' formulas)."""

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from tunekit.train import OPTIMIZERS, TrainConfig, build_optimizer, build_scheduler

HF_SCHEDULES = {
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
    "constant": lambda opt, num_warmup_steps, num_training_steps: get_constant_schedule_with_warmup(
        opt, num_warmup_steps
    ),
}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"learning_rate": 1e-4}, "learning_rate"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"scheduler": "step"}, "scheduler"),
        ({"lr": 0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"warmup_steps": 5, "warmup_ratio": 0.1}, "warmup_steps or train.warmup_ratio"),
        ({"early_stopping_patience": 2}, "eval_every"),
    ],
)
def test_config_rejects_bad_input_naming_the_key(fields, needle):
    with pytest.raises(ValidationError, match=needle):
        TrainConfig(**fields)


def test_config_fields_all_documented():
    assert all(f.description for f in TrainConfig.model_fields.values())


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 3}, {"warmup_ratio": 0.25}, {}])
def test_schedule_matches_transformers(name, warmup):
    total = 12
    cfg = TrainConfig(lr=1.0, scheduler=name, **warmup)
    ours = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, total)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = HF_SCHEDULES[name](ref_opt, num_warmup_steps=cfg.warmup_for(total), num_training_steps=total)
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours.optimizer.step()
        ref_opt.step()
        ours.step()
        ref.step()


def test_warmup_ratio_rounds_up():
    assert TrainConfig(warmup_ratio=0.1).warmup_for(25) == 3


def test_optimizer_gets_only_trainable_params_and_no_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups[0.1] == {id(model[2].weight)}
    assert groups[0.0] == {id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert isinstance(opt, torch.optim.AdamW)


def test_optimizer_without_trainable_params_is_a_clear_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


def test_optimizer_registry_names_match_config_choices():
    choices = set(TrainConfig.model_fields["optimizer"].annotation.__args__)
    assert set(OPTIMIZERS) == choices


def test_8bit_adamw_is_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    opt = build_optimizer(torch.nn.Linear(64, 64), TrainConfig(optimizer="adamw_8bit"))
    assert isinstance(opt, bnb.optim.AdamW8bit)
