"""``save_pretrained`` / ``state_dict`` of a model with adapters injected.

Documented behaviour: ``model.state_dict()`` is the base model's state dict (its own
keys, the unmerged weights even while merged) plus the ``adapters.*`` tensors, and
``save_pretrained`` writes the base model alone; a plain ``from_pretrained`` loads it
with no missing or unexpected keys. Oracle: transformers' own model, built from the
same config before injection, and transformers' loader.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import TINY_MODELS, model_output, tiny_inputs
from _tolerances import max_abs_diff
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from tunekit.adapters import (
    BottleneckConfig,
    LoRAConfig,
    PrefixConfig,
    PromptConfig,
    inject_adapters,
    merge_adapters,
    unmerge_adapters,
)

AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification,
        "t5": AutoModelForSeq2SeqLM}
ROWS = {
    "llama-lora": ("llama", [LoRAConfig(rank=4, target_modules="all-linear", init="random")]),
    "gpt2-lora-conv1d-and-head": ("gpt2", [LoRAConfig(rank=4, target_modules=["c_attn", "lm_head"], init="random")]),
    "bert-lora-classifier": ("bert", [LoRAConfig(rank=4, init="random", modules_to_save=["classifier"])]),
    "bert-parallel-post-norm": ("bert", [BottleneckConfig(variant="parallel", init="random")]),
    "t5-serial": ("t5", [BottleneckConfig(init="random")]),
    "llama-prefix-and-lora": ("llama", [PrefixConfig(num_virtual_tokens=2), LoRAConfig(rank=2, init="random")]),
    "gpt2-prompt": ("gpt2", [PromptConfig(num_virtual_tokens=2)]),
}


def _adapted(row: str):
    arch, configs = ROWS[row]
    torch.manual_seed(0)
    model = TINY_MODELS[arch]()
    base = copy.deepcopy(model)
    for i, cfg in enumerate(configs):
        inject_adapters(model, cfg, name=f"a{i}")
    return arch, model, base


def _with_grad_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


SAVE_CASES = [(row, False) for row in sorted(ROWS)] + [
    (row, True) for row in sorted(ROWS) if isinstance(ROWS[row][1][-1], LoRAConfig)]


@pytest.mark.parametrize(("row", "merged"), SAVE_CASES, ids=[f"{r}{'-merged' * m}" for r, m in SAVE_CASES])
def test_save_pretrained_writes_the_base_model(row, merged, tmp_path):
    arch, model, base = _adapted(row)
    if merged:
        merge_adapters(model, names=[f"a{len(ROWS[row][1]) - 1}"])
    model.save_pretrained(tmp_path)
    reloaded, info = AUTO[arch].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = tiny_inputs(arch)
    assert torch.equal(model_output(reloaded.eval(), inputs), model_output(base, inputs))
    assert set(reloaded.state_dict()) <= set(model.state_dict())  # the same keys as the plain model's


@pytest.mark.parametrize("row", sorted(ROWS))
def test_state_dict_round_trips_strictly(row):
    arch, model, base = _adapted(row)
    inputs = tiny_inputs(arch)
    adapted = model_output(model, inputs)
    state = _with_grad_state(model)
    assert set(base.state_dict()) <= set(state)
    assert all(".adapters." in k for k in set(state) - set(base.state_dict()))
    fresh = _adapted(row)[1]
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(model_output(fresh, inputs), adapted)


def test_load_state_dict_takes_the_module_path_spelling_too():
    """Keys as named_parameters() spells them (``q_proj.base_layer.weight``) load as well."""
    _, model, _ = _adapted("llama-lora")
    inputs = tiny_inputs("llama")
    by_path = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(".base_layer." in n for n in by_path)
    fresh = _adapted("llama-lora")[1]
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(by_path, strict=True)
    assert torch.equal(model_output(fresh, inputs), model_output(model, inputs))


def test_loading_base_weights_into_a_merged_layer_is_refused():
    _, model, _ = _adapted("llama-lora")
    state = _with_grad_state(model)
    merge_adapters(model)
    with pytest.raises(ValueError, match="unmerge_adapters"):
        model.load_state_dict(state)
    unmerge_adapters(model)
    model.load_state_dict(state)


def test_distributed_checkpoint_sees_the_same_keys():
    """torch.distributed.checkpoint maps the keys back to parameters (``_fqn_modifiers``)."""
    _, model, _ = _adapted("bert-parallel-post-norm")
    inputs = tiny_inputs("bert")
    adapted = model_output(model, inputs)
    dcp_state = get_model_state_dict(model)
    assert set(dcp_state) == set(model.state_dict())
    fresh = _adapted("bert-parallel-post-norm")[1]
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    set_model_state_dict(fresh, {k: v.clone() for k, v in dcp_state.items()})
    assert torch.equal(model_output(fresh, inputs), adapted)
