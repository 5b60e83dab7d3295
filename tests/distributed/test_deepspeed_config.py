"""The DeepSpeed JSON tunekit generates, and a user's own file checked against what tunekit relies on."""

from __future__ import annotations

import json

import pytest

from tunekit.distributed.deepspeed_zero import deepspeed_config, generated_config
from tunekit.distributed.options import DistributedOptions


def test_generated_config_is_zero3_with_tunekits_accumulation_and_adapter_only_gathering():
    cfg = generated_config(DistributedOptions(strategy="deepspeed", micro_batch_size=4, max_grad_norm=0.5), 2)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert "offload_param" not in zero and "offload_optimizer" not in zero
    assert (cfg["gradient_accumulation_steps"], cfg["managed_gradient_accumulation"]) == (1, False)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"], cfg["gradient_clipping"]) == (4, 8, 0.5)
    offload = generated_config(DistributedOptions(strategy="deepspeed", cpu_offload=True, max_grad_norm=None), 2)
    assert offload["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert offload["gradient_clipping"] == 0.0
    json.dumps(cfg)  # printable as the JSON a user could replace


def test_user_file_is_merged_over_the_generated_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}, "steps_per_print": 5}))
    cfg = deepspeed_config(DistributedOptions(strategy="deepspeed", deepspeed_config=str(path)), 2)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert cfg["steps_per_print"] == 5


@pytest.mark.parametrize(("content", "message"), [
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4, tunekit needs 1"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2, tunekit needs 3"),
    ({"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True}}, "gather_16bit"),
])
def test_user_file_contradicting_tunekit_is_refused(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        deepspeed_config(DistributedOptions(strategy="deepspeed", deepspeed_config=str(path)), 2)


def test_missing_or_broken_user_file(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        deepspeed_config(DistributedOptions(strategy="deepspeed", deepspeed_config=str(tmp_path / "no.json")), 2)
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(ValueError, match="not valid JSON"):
        deepspeed_config(DistributedOptions(strategy="deepspeed", deepspeed_config=str(bad)), 2)
