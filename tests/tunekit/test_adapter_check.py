"""The adapter validity gate: expected shapes against PEFT's own adapters, and a clear line per defect."""

from __future__ import annotations

import peft
import pytest
import torch
from _tiny import tiny_bert, tiny_llama
from safetensors.torch import load_file, save_file

from tunekit.adapter_check import (AdapterCheckError, check_adapter_folder, check_adapter_tensors,
                                   expected_adapter_shapes)
from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, PromptConfig, inject_adapters, save_adapters

# (tunekit config, PEFT config of the same adapter)
PEFT_TWINS = [
    (LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]),
     peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    (LoRAConfig(rank=2, use_dora=True, target_modules="all-linear"),
     peft.LoraConfig(r=2, use_dora=True, target_modules="all-linear")),
    (PrefixConfig(num_virtual_tokens=3), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    (PromptConfig(num_virtual_tokens=5), peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")),
]


def _peft_shapes(model, peft_cfg) -> dict[str, tuple[int, ...]]:
    wrapped = peft.get_peft_model(model, peft_cfg)
    return {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(wrapped).items()}


@pytest.mark.parametrize("ours, theirs", PEFT_TWINS, ids=["lora", "dora", "prefix", "prompt"])
def test_expected_shapes_equal_peft_state_dict_shapes(ours, theirs):
    model = tiny_llama(kv_heads=2)
    expected = expected_adapter_shapes(model.config, ours, task="causal_lm")
    assert expected == _peft_shapes(model, theirs)


def test_a_trained_classifier_head_is_sized_by_the_labels():
    cfg = LoRAConfig(rank=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    expected = expected_adapter_shapes(tiny_bert(num_labels=2).config, cfg, task="seq_cls",
                                       label_names=["a", "b", "c", "d", "e"])
    theirs = peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                             task_type="SEQ_CLS")
    assert expected == _peft_shapes(tiny_bert(num_labels=5), theirs)
    assert (5, 32) in expected.values()


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    inject_adapters(model, BottleneckConfig(hidden_size=8))
    save_adapters(model, tmp_path)
    (tmp_path / "tunekit_base.json").write_text('{"model": {"name_or_path": null}, "task": "causal_lm"}',
                                                encoding="utf-8")
    return tmp_path, model.config


def test_a_good_folder_passes(saved):
    folder, config = saved
    assert check_adapter_folder(folder, config).hidden_size == 8


@pytest.mark.parametrize("defect, message", [
    ("drop", "1 of 16 expected tensors are missing"),
    ("extra", "1 tensors the adapter config does not describe"),
    ("shape", "but the adapter config and base model config give"),
    ("nan", "holds 1 NaN/Inf values"),
    ("int", "adapter weights are floating point"),
])
def test_each_defect_is_named_in_one_line(saved, defect, message):
    folder, config = saved
    state = load_file(folder / "adapter_model.safetensors")
    key = sorted(state)[0]
    if defect == "drop":
        del state[key]
    elif defect == "extra":
        state["base_model.model.stray.weight"] = torch.zeros(2)
    elif defect == "shape":
        state[key] = torch.zeros(*(d + 1 for d in state[key].shape))
    elif defect == "nan":
        state[key][(0,) * state[key].dim()] = float("inf")
    else:
        state[key] = state[key].to(torch.int32)
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterCheckError, match=message) as caught:
        check_adapter_folder(folder, config)
    assert len(str(caught.value).splitlines()) == 1
    assert defect in ("extra", "drop") or key in str(caught.value)


def test_the_gate_takes_a_gathered_state_dict_directly():
    model = tiny_llama()
    cfg = LoRAConfig(rank=4)
    inject_adapters(model, cfg)
    from tunekit.adapters import adapter_state_dict

    state = adapter_state_dict(model)
    check_adapter_tensors(state, expected_adapter_shapes(model.config, cfg))
    with pytest.raises(AdapterCheckError, match="missing"):
        check_adapter_tensors(dict(list(state.items())[1:]), expected_adapter_shapes(model.config, cfg))


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(AdapterCheckError, match="no adapter_model.safetensors"):
        check_adapter_folder(tmp_path)
