"""LoRA and DoRA on a bitsandbytes 8-bit (LLM.int8) base, on the CPU."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_inputs, tiny_llama, train_losses
from _tolerances import FP32_EXACT, INT8_COMPUTE, max_abs_diff
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from tunekit.adapters import LoRAConfig, eject_adapters, inject_adapters, load_adapters, save_adapters
from tunekit.adapters.hf.layers import base_weight

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-8bit")
    torch.manual_seed(0)
    tiny_llama(hidden_size=64, intermediate_size=128, head_dim=16).save_pretrained(folder)
    return folder


def _load_8bit(folder) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                            dtype=torch.float32)


def test_dequantized_weight_is_right_before_and_after_a_forward(tiny_dir):
    reference = LlamaForCausalLM.from_pretrained(tiny_dir).model.layers[0].self_attn.q_proj.weight
    q_proj = _load_8bit(tiny_dir).model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear8bitLt"
    before = base_weight(q_proj).clone()
    with torch.no_grad():
        q_proj(torch.randn(2, 64))  # bitsandbytes moves the row scales to module.state here
    assert torch.equal(base_weight(q_proj), before)
    # int8 row-wise absmax quantization (of an fp16 copy): within one step (absmax / 127) per entry
    step = reference.abs().amax(dim=1, keepdim=True) / 127
    assert ((before - reference).abs() <= step).all()


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_eject_and_reload_on_an_8bit_base(tiny_dir, tmp_path, use_dora):
    model = _load_8bit(tiny_dir)
    inject_adapters(model, LoRAConfig(rank=8, target_modules="all-linear", use_dora=use_dora))
    batch = tiny_inputs("llama", batch=4, length=12, seed=3)
    batch["labels"] = batch["input_ids"]
    losses = train_losses(model.train(), batch, steps=6, lr=3e-3)
    assert losses[-1] < losses[0] - 0.05, losses

    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    save_adapters(model, tmp_path)
    again = _load_8bit(tiny_dir).eval()
    load_adapters(again, tmp_path)
    with torch.no_grad():
        assert max_abs_diff(again(**batch).logits, adapted) <= FP32_EXACT
    plain = eject_adapters(model, merge=True)  # dequantize -> merge: plain fp32 linears
    assert type(plain.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with torch.no_grad():
        assert max_abs_diff(plain(**batch).logits, adapted) <= INT8_COMPUTE
