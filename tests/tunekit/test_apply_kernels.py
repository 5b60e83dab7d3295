"""apply_kernels / revert_kernels on tiny HF models, and fused_causal_lm_loss vs ``model(...).loss``."""

from __future__ import annotations

import pytest
import torch
from _tiny import VOCAB, tiny_gpt2, tiny_inputs, tiny_llama
from _tolerances import BF16_AUTOCAST_LOSS, FP32_EXACT, max_abs_diff
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tunekit.adapters import LoRAConfig, PromptConfig, inject_adapters
from tunekit.kernels import use_backend
from tunekit.models.kernels import (
    TunekitGatedMLP,
    TunekitRMSNorm,
    apply_kernels,
    fused_causal_lm_loss,
    revert_kernels,
)

_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0)


def tiny_gemma():
    return GemmaForCausalLM(GemmaConfig(**_SMALL)).eval()


def tiny_qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**_SMALL)).eval()


def tiny_mistral():
    return MistralForCausalLM(MistralConfig(**_SMALL)).eval()


def tiny_qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**_SMALL)).eval()


def _batch():
    batch = tiny_inputs("llama", batch=2, length=7)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def _loss_and_grads(model, batch, loss_fn=None):
    loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def _assert_same(a, b, tol=FP32_EXACT):
    (la, ga), (lb, gb) = a, b
    assert max_abs_diff(la, lb) <= tol
    assert len(ga) == len(gb) and all(max_abs_diff(x, y) <= tol for x, y in zip(ga, gb))


@pytest.mark.parametrize("factory,norms", [(tiny_llama, 5), (tiny_gemma, 3), (tiny_qwen3, 5), (tiny_mistral, 3),
                                           (tiny_qwen2, 3)])
def test_apply_kernels_keeps_loss_grads_and_parameters(factory, norms):
    model, batch = factory(), _batch()
    stock = _loss_and_grads(model, batch)
    keys = list(model.state_dict())
    report = apply_kernels(model)
    assert len(report.swapped["rmsnorm"]) == norms  # qwen3 also has q_norm / k_norm
    assert all(type(model.get_submodule(n)) is TunekitRMSNorm for n in report.swapped["rmsnorm"])
    assert all(type(model.get_submodule(n)) is TunekitGatedMLP for n in report.swapped["swiglu"])
    assert list(model.state_dict()) == keys
    _assert_same(_loss_and_grads(model, batch), stock)
    assert revert_kernels(model) == norms + len(report.swapped["swiglu"])
    assert not any(isinstance(m, (TunekitRMSNorm, TunekitGatedMLP)) for m in model.modules())
    _assert_same(_loss_and_grads(model, batch), stock)


def test_apply_kernels_under_the_triton_interpreter_matches_stock():
    model, batch = tiny_llama(layers=1), _batch()
    stock = _loss_and_grads(model, batch)
    apply_kernels(model)
    with use_backend("interpret"):
        _assert_same(_loss_and_grads(model, batch), stock)


def test_lora_on_mlp_projections_survives_apply_and_revert():
    model, batch = tiny_llama(layers=1), _batch()
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["gate_proj", "down_proj"], init="random"))
    stock = _loss_and_grads(model, batch)
    apply_kernels(model)
    _assert_same(_loss_and_grads(model, batch), stock)
    revert_kernels(model)
    assert type(model.model.layers[0].mlp.gate_proj).__name__ == "LoRALayer"
    _assert_same(_loss_and_grads(model, batch), stock)


def test_rope_is_reported_not_swapped_and_bad_input_is_a_clear_error():
    report = apply_kernels(tiny_llama(layers=1), ops=("rmsnorm", "rope"))
    assert "monkey-patching" in report.skipped["rope"] and "rope not swapped" in str(report)
    with pytest.raises(ValueError, match="do not support model_type 'gpt2'"):
        apply_kernels(tiny_gpt2())
    with pytest.raises(ValueError, match="unknown kernel ops"):
        apply_kernels(tiny_llama(layers=1), ops=("layernorm",))
    model = tiny_llama(layers=1)
    apply_kernels(model)
    with pytest.raises(ValueError, match="already applied"):
        apply_kernels(model)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma])  # gemma ties lm_head to the embeddings
def test_fused_causal_lm_loss_equals_model_loss(factory):
    model, batch = factory(), _batch()
    _assert_same(_loss_and_grads(model, batch, fused_causal_lm_loss), _loss_and_grads(model, batch))


def test_fused_causal_lm_loss_with_lora_on_lm_head():
    model, batch = tiny_llama(), _batch()
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["lm_head", "q_proj"], init="random"))
    fused = _loss_and_grads(model, batch, fused_causal_lm_loss)
    assert len(fused[1]) == 6  # lora A/B on lm_head and on two q_proj
    _assert_same(fused, _loss_and_grads(model, batch))


def test_fused_causal_lm_loss_refuses_dora_on_lm_head():
    model = tiny_llama(layers=1)
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        fused_causal_lm_loss(model, _batch())


def test_fused_causal_lm_loss_with_prompt_tuning_virtual_tokens():
    model, batch = tiny_llama(layers=1), _batch()
    inject_adapters(model, PromptConfig(num_virtual_tokens=3))
    _assert_same(_loss_and_grads(model, batch, fused_causal_lm_loss), _loss_and_grads(model, batch))


@pytest.mark.slow
def test_full_kernel_stack_under_the_interpreter_matches_stock_llama():
    """Every tunekit kernel at once on Triton (interpreted): attention, RMSNorm, SwiGLU, fused LoRA
    linear and fused linear+CE give the loss and adapter gradients of a stock sdpa Llama with LoRA."""
    from tunekit.models.attention import register_tunekit_attention

    register_tunekit_attention()
    batch = _batch()
    torch.manual_seed(0)
    stock = tiny_llama(layers=1, attn_implementation="sdpa")
    fast = tiny_llama(layers=1, attn_implementation="tunekit")
    fast.load_state_dict(stock.state_dict())
    for model in (stock, fast):
        torch.manual_seed(1)
        inject_adapters(model, LoRAConfig(rank=4, init="random", target_modules="all-linear"))
    expected = _loss_and_grads(stock, batch)
    report = apply_kernels(fast)
    assert report.swapped["rmsnorm"] and report.swapped["swiglu"]
    with use_backend("interpret"):
        got = _loss_and_grads(fast, batch, fused_causal_lm_loss)
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_fused_causal_lm_loss_with_lora_on_lm_head_under_bf16_autocast(dtype):
    """As the trainer runs bf16 mixed precision: loss and fp32 adapter grads within bf16 of model(...).loss."""
    model, batch = tiny_llama().to(dtype), _batch()
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["lm_head", "q_proj"], init="random"))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _loss_and_grads(model, batch, fused_causal_lm_loss)
        unfused = _loss_and_grads(model, batch)
    assert all(g.dtype == torch.float32 for g in fused[1])
    _assert_same(fused, unfused, tol=BF16_AUTOCAST_LOSS)
