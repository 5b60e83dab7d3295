"""Several named adapters on one model: add, switch, disable, delete, save and load each."""

from __future__ import annotations

import pytest
import torch
from _tiny import model_output, tiny_inputs, tiny_llama
from _tolerances import FP32_EXACT, max_abs_diff
from peft import PeftModel

from tunekit.adapters import (
    BottleneckConfig,
    LoRAConfig,
    LoRALayer,
    PrefixConfig,
    PromptConfig,
    active_adapters,
    delete_adapter,
    inject_adapters,
    load_adapters,
    save_adapters,
    set_active_adapters,
    trainable_parameters,
)


def _two_adapters():
    torch.manual_seed(0)
    model = tiny_llama()
    inputs = tiny_inputs("llama")
    base = model_output(model, inputs)
    inject_adapters(model, LoRAConfig(rank=4, init="random"), name="default")
    inject_adapters(model, LoRAConfig(rank=2, init="random", target_modules=["o_proj", "v_proj"]), name="other",
                    activate=False)
    return model, inputs, base


def test_switching_changes_output_and_trainable_set():
    model, inputs, base = _two_adapters()
    assert active_adapters(model) == ["default"]
    out_default = model_output(model, inputs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)

    set_active_adapters(model, "other")
    out_other = model_output(model, inputs)
    assert all(".adapters.other." in n for n, p in model.named_parameters() if p.requires_grad)
    assert max_abs_diff(out_default, out_other) > 1e-3 and max_abs_diff(out_other, base) > 1e-3

    set_active_adapters(model, ["default", "other"])  # both at once: the deltas add
    both = model_output(model, inputs)
    assert max_abs_diff(both, out_default) > 1e-3 and max_abs_diff(both, out_other) > 1e-3
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        set_active_adapters(model, "nope")


def test_delete_restores_plain_modules_where_empty():
    model, inputs, base = _two_adapters()
    delete_adapter(model, "default")
    assert active_adapters(model) == []
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert wrapped and all(n.endswith(("o_proj", "v_proj")) for n in wrapped)  # q_proj went back to nn.Linear
    set_active_adapters(model, "other")
    delete_adapter(model, "other")
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert max_abs_diff(model_output(model, inputs), base) <= FP32_EXACT


def test_save_several_uses_peft_subfolders(tmp_path):
    model, inputs, _ = _two_adapters()
    outputs = {}
    for name in ("default", "other"):
        set_active_adapters(model, name)
        outputs[name] = model_output(model, inputs)
    save_adapters(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    torch.manual_seed(0)
    fresh = tiny_llama()
    load_adapters(fresh, tmp_path, name="default")
    load_adapters(fresh, tmp_path / "other", name="other")
    for name in ("default", "other"):
        set_active_adapters(fresh, name)
        assert max_abs_diff(model_output(fresh, inputs), outputs[name]) <= FP32_EXACT

    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    peft_model.load_adapter(tmp_path / "other", adapter_name="other")
    peft_model.set_adapter("other")
    assert max_abs_diff(model_output(peft_model.eval(), inputs), outputs["other"]) <= FP32_EXACT


@pytest.mark.parametrize("config", [
    LoRAConfig(rank=2, target_modules=["o_proj"], bias="all", modules_to_save=["lm_head"]),
    LoRAConfig(rank=2, use_dora=True), PrefixConfig(num_virtual_tokens=3), PromptConfig(num_virtual_tokens=3),
    BottleneckConfig(reduction_factor=8)], ids=["lora-bias-head", "dora", "prefix", "prompt", "bottleneck"])
def test_report_counts_the_new_adapters_own_parameters_also_when_added_inactive(config):
    torch.manual_seed(0)
    alone = tiny_llama()
    report_alone = inject_adapters(alone, config, name="new")
    own = trainable_parameters(alone).trainable  # what requires_grad says when it is the only adapter
    assert report_alone.trainable_params == own > 0
    beside = tiny_llama()
    inject_adapters(beside, LoRAConfig(rank=4, target_modules=["q_proj"]), name="default")
    first = trainable_parameters(beside).trainable
    report = inject_adapters(beside, config, name="new", activate=False)
    assert report.trainable_params == own and trainable_parameters(beside).trainable == first
    assert report.total_params == trainable_parameters(beside).total
