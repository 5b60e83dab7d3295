"""TrainConfig validation, optimizer selection and lr schedules (vs the formulas written out here)."""

import copy
import math

import pytest
import torch
from _tolerances import FP32_EXACT
from pydantic import ValidationError

from tunekit.train import OPTIMIZERS, TrainConfig, build_optimizer, build_scheduler


def expected_multiplier(name: str, s: int, w: int, total: int) -> float:
    """The lr multiplier of optimizer step ``s`` (0-based), ``w`` warmup steps, ``total`` steps."""
    if s < w:
        return s / w
    if name == "linear":
        return max(0.0, (total - s) / (total - w))
    if name == "cosine":
        return max(0.0, 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w))))
    return 1.0


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
def test_schedule_follows_the_formulas(name, warmup):
    total, lr = 12, 0.5
    cfg = TrainConfig(lr=lr, scheduler=name, **warmup)
    w = {"warmup_steps": 3, "warmup_ratio": 3}.get(next(iter(warmup), None), 0)  # 0.25 * 12 = 3
    assert cfg.warmup_for(total) == w
    ours = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr), cfg, total)
    for s in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(lr * expected_multiplier(name, s, w, total), abs=1e-12)
        ours.optimizer.step()
        ours.step()


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


def test_adamw_on_cpu_is_torchs_fused_one_and_steps_like_the_for_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    oracle_model = copy.deepcopy(model)
    opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    oracle = torch.optim.AdamW([{"params": [oracle_model[0].weight, oracle_model[1].weight], "weight_decay": 0.1},
                                {"params": [oracle_model[0].bias, oracle_model[1].bias], "weight_decay": 0.0}],
                               lr=1e-2, foreach=False)
    assert opt.defaults["fused"] is True
    for _ in range(3):
        x = torch.randn(5, 8)
        for m, o in ((model, opt), (oracle_model, oracle)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(model.parameters(), oracle_model.parameters()):
        torch.testing.assert_close(p, q, rtol=FP32_EXACT, atol=FP32_EXACT)
