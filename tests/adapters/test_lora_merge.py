"""Merging and unmerging beyond the fp32 contract: tied output heads and bf16 weights.

Oracles: transformers (a plain model saved and reloaded), the model's own unmerged forward,
and the merge formula written out here (W + s·B·A, rounded once to the weights' dtype).
"""

from __future__ import annotations

import pytest
import torch
from _tiny import model_output, tiny_gpt2, tiny_inputs, tiny_llama
from _tolerances import BF16_MERGE, FP32_EXACT, max_abs_diff
from transformers import AutoModelForCausalLM

from tunekit.adapters import (
    LoRAConfig,
    LoRALayer,
    disable_adapters,
    eject_adapters,
    inject_adapters,
    merge_adapters,
    unmerge_adapters,
)

TIED = {"gpt2": tiny_gpt2, "llama": lambda: tiny_llama(tie_word_embeddings=True)}


@pytest.mark.parametrize("arch", sorted(TIED))
def test_merging_lora_on_a_tied_head_leaves_the_embeddings_alone(arch, tmp_path):
    model = TIED[arch]()
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tied, as GPT-2 / Llama 3.2 / Gemma ship
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["lm_head"], init="random"))
    inputs = tiny_inputs(arch)
    adapted = model_output(model, inputs)
    embed_before = embed.detach().clone()

    merge_adapters(model)
    assert max_abs_diff(model_output(model, inputs), adapted) <= FP32_EXACT
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    unmerge_adapters(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied again
    assert max_abs_diff(model_output(model, inputs), adapted) <= FP32_EXACT

    plain = eject_adapters(model, merge=True)
    assert torch.equal(plain.get_input_embeddings().weight, embed_before)
    assert max_abs_diff(model_output(plain, inputs), adapted) <= FP32_EXACT
    plain.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert max_abs_diff(model_output(reloaded.eval(), inputs), adapted) <= FP32_EXACT


def _trained_bf16_llama(use_dora: bool):
    model = tiny_llama().to(torch.bfloat16)
    inputs = tiny_inputs("llama")
    base = model_output(model, inputs)
    inject_adapters(model, LoRAConfig(rank=4, alpha=8, target_modules="all-linear", use_dora=use_dora))
    with torch.no_grad():  # as after training: non-zero B (and DoRA magnitude)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model, inputs, base


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_unmerge_restores_the_base_bit_exactly(use_dora):
    model, inputs, base = _trained_bf16_llama(use_dora)
    adapted = model_output(model, inputs)
    before = _base_weights(model)

    merge_adapters(model)
    assert max_abs_diff(model_output(model, inputs), adapted) <= BF16_MERGE
    with disable_adapters(model):  # unmerges for the block: the base exactly
        assert torch.equal(model_output(model, inputs), base)
    unmerge_adapters(model)
    after = _base_weights(model)
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert not changed, f"{len(changed)} base weights changed by merge + unmerge, e.g. {changed[0]}"
    assert torch.equal(model_output(model, inputs), adapted)


def test_bf16_merged_weight_is_the_formula_rounded_once():
    model, _, _ = _trained_bf16_llama(use_dora=False)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALayer)
    w, branch = layer.base_layer.weight.detach().clone(), layer.adapters["default"]
    a, b = branch.lora_A.weight.float(), branch.lora_B.weight.float()
    merge_adapters(model)
    expected = (w.float() + (8 / 4) * (b @ a)).to(torch.bfloat16)  # W + (alpha/r)·B·A, one rounding
    assert torch.equal(layer.base_layer.weight, expected)


def test_merge_survives_moving_the_model():
    """The kept originals follow .to(): unmerge after a dtype change gives the moved base."""
    model, inputs, _ = _trained_bf16_llama(use_dora=False)
    before = _base_weights(model)
    merge_adapters(model)
    model.to(torch.float32)
    unmerge_adapters(model)
    after = _base_weights(model)
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], before[n].float()) for n in before)
