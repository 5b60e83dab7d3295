"""Bad input gets one clear error that names the problem and the fix, and changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import model_output, tiny_inputs, tiny_llama
from _tolerances import max_abs_diff
from pydantic import ValidationError
from torch import nn

from tunekit.adapters import (
    LoRAConfig,
    LoRALayer,
    adapter_configs,
    inject_adapters,
    load_adapters,
    save_adapters,
)


def test_nothing_matched_names_the_targets_and_shows_real_names():
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        inject_adapters(tiny_llama(), LoRAConfig(target_modules=["query"]))


def test_unsupported_module_type_lists_supported_types():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"cannot wrap .*LlamaAttention.*nn.Linear"):
        inject_adapters(model, LoRAConfig(target_modules=["self_attn"]))


def test_unknown_architecture_asks_for_explicit_targets():
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="set target_modules explicitly"):
        inject_adapters(mlp, LoRAConfig())
    report = inject_adapters(mlp, LoRAConfig(target_modules=["0"], rank=2))  # a plain MLP works when told
    assert report.wrapped == ["0"] and isinstance(mlp[0], LoRALayer)


def test_duplicate_name_is_refused():
    model = tiny_llama()
    inject_adapters(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        inject_adapters(model, LoRAConfig())


@pytest.mark.parametrize(("field", "value"), [("rank", 0), ("dropout", 1.5), ("bias", "some"), ("alpah", 3)])
def test_config_validation_names_the_key(field, value):
    with pytest.raises(ValidationError, match=field):
        LoRAConfig(**{field: value})


def test_missing_folder_and_pickles(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapters(tiny_llama(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        load_adapters(tiny_llama(), tmp_path)


def test_unsupported_adapter_type(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'IA3' is not supported"):
        load_adapters(tiny_llama(), tmp_path)


def test_weights_from_another_architecture_leave_the_model_clean(tmp_path):
    src = tiny_llama()
    inject_adapters(src, LoRAConfig(target_modules=["q_proj", "v_proj"]))
    save_adapters(src, tmp_path)
    # same target names, different depth: the saved keys do not fit
    target = tiny_llama(layers=1)
    inputs = tiny_inputs("llama")
    before = model_output(target, inputs)
    with pytest.raises(KeyError, match="has no place for"):
        load_adapters(target, tmp_path)
    assert adapter_configs(target) == {} and not any(isinstance(m, LoRALayer) for m in target.modules())
    assert max_abs_diff(model_output(target, inputs), before) == 0.0


def test_merge_with_nan_is_refused_before_writing():
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(rank=2))
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.adapters["default"].lora_B.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0) and layer.merged == []
