"""QLoRA: LoRA on a bitsandbytes 4-bit (nf4, double-quant) base, on the CPU.

bitsandbytes' CPU backend repacks 4-bit weights (absmax rounded to bf16) on the first
forward in eval mode without grad, and computes in bf16 from then on; forwards here run
in train mode (dropout is 0) to stay on the exact fp32-dequantize path.
"""

from __future__ import annotations

import pytest
import torch
from _quantized import load_4bit, save_tiny_llama
from _tiny import tiny_inputs, train_losses
from _tolerances import BF16_COMPUTE, FP32_DEQUANT_MERGE, FP32_EXACT, max_abs_diff

from tunekit.adapters import (
    LoRAConfig,
    LoRALayer,
    NotMergeableError,
    eject_adapters,
    inject_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
    trainable_parameters,
)

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder)
    return folder


def test_training_reduces_loss_on_4bit_base(tiny_llama_dir):
    model = load_4bit(tiny_llama_dir)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    inject_adapters(model, LoRAConfig(rank=8, alpha=16, target_modules="all-linear"))
    assert isinstance(model.model.layers[0].mlp.down_proj, LoRALayer)
    # 4-bit params count unpacked, as PEFT does
    assert trainable_parameters(model).total > sum(p.numel() for p in model.parameters())

    batch = tiny_inputs("llama", batch=4, length=12, seed=3)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = train_losses(model.train(), batch, steps=6, lr=3e-3)
    assert losses[-1] < losses[0] - 0.05, losses


def test_adapters_keep_learning_after_an_evaluation(tiny_llama_dir):
    """An eval-mode no-grad forward (an evaluation) must not stop gradients through 4-bit layers."""
    model = load_4bit(tiny_llama_dir)
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["q_proj"]))
    batch = tiny_inputs("llama")
    batch["labels"] = batch["input_ids"]

    def first_layer_grad():
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.weight.grad.clone()

    before = first_layer_grad()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = first_layer_grad()
    assert before.abs().sum() > 0
    assert max_abs_diff(after, before) <= FP32_EXACT


def _repacks_here() -> bool:
    # bitsandbytes decides per layer at construction: Linear4bit.support_avx512bf16_for_cpu = has_avx512bf16()
    import bitsandbytes.functional as bnbF

    return bool(bnbF.has_avx512bf16())


needs_repack = pytest.mark.skipif(not _repacks_here(), reason="this CPU has no AVX512-BF16: bitsandbytes never "
                                  "repacks 4-bit weights here (the everywhere-checks below still run)")


@pytest.fixture(params=["as_bitsandbytes_decides", "without_avx512bf16"])
def cpu_path(request, monkeypatch):
    """Run on this CPU's bitsandbytes path, and on the path of a CPU without AVX512-BF16 (simulated
    at bitsandbytes' own decision point, so an AVX512 machine checks both)."""
    if request.param == "without_avx512bf16":
        import bitsandbytes.nn.modules

        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    return request.param


def _repacked(module) -> bool:
    # QuantState has no packing_format_for_cpu attribute until bitsandbytes repacks it once.
    return getattr(module.weight.quant_state, "packing_format_for_cpu", False)


@needs_repack
def test_injection_undoes_an_earlier_repack(tiny_llama_dir):
    model = load_4bit(tiny_llama_dir).eval()
    with torch.no_grad():
        model(**tiny_inputs("llama"))  # repacks every 4-bit layer
    q_proj = model.model.layers[0].self_attn.q_proj
    assert _repacked(q_proj)
    inject_adapters(model, LoRAConfig(rank=4))
    assert not _repacked(q_proj)  # q_proj is now the wrapped base_layer


@needs_repack
def test_base_weight_reads_repacked_4bit_weights(tiny_llama_dir):
    from tunekit.adapters.hf.layers import base_weight

    q_proj = load_4bit(tiny_llama_dir).eval().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        q_proj(x)  # triggers bitsandbytes' CPU repack (bf16 absmax)
        assert _repacked(q_proj)
        assert max_abs_diff(q_proj(x), x @ base_weight(q_proj).T) <= BF16_COMPUTE


def test_eval_forward_then_injection_and_base_weight_on_either_cpu_path(tiny_llama_dir, cpu_path):
    """What holds on every CPU: after an eval no-grad forward, injection works, the base is on
    bitsandbytes' trainable layout, base_weight equals the layer's forward, adapters get gradients."""
    from tunekit.adapters.hf.layers import base_weight

    model = load_4bit(tiny_llama_dir).eval()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.support_avx512bf16_for_cpu == (cpu_path == "as_bitsandbytes_decides" and _repacks_here())
    batch = tiny_inputs("llama")
    with torch.no_grad():
        model(**batch)
    assert _repacked(q_proj) == q_proj.support_avx512bf16_for_cpu
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["q_proj"]))
    assert not _repacked(q_proj)
    x = torch.randn(3, 64)
    with torch.no_grad():  # the fp32 dequantize path, which reads what base_weight reads
        assert max_abs_diff(q_proj(x), x @ base_weight(q_proj).T) <= FP32_DEQUANT_MERGE
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.weight.grad.abs().sum() > 0


def test_merge_refused_eject_dequantizes(tiny_llama_dir, tmp_path):
    model = load_4bit(tiny_llama_dir)
    inject_adapters(model, LoRAConfig(rank=4, init="random"))
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        adapted = model(**inputs).logits
    with pytest.raises(NotMergeableError, match="eject_adapters"):
        merge_adapters(model)

    save_adapters(model, tmp_path)  # the adapter also loads back onto a fresh 4-bit base
    again = load_4bit(tiny_llama_dir)
    load_adapters(again, tmp_path)
    with torch.no_grad():
        assert max_abs_diff(again(**inputs).logits, adapted) <= FP32_EXACT

    plain = eject_adapters(model, merge=True)
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert max_abs_diff(plain(**inputs).logits, adapted) <= FP32_DEQUANT_MERGE


def test_peft_dora_on_a_4bit_base_loads_with_the_same_logits(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_4bit(tiny_llama_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       use_dora=True))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path)
    ours = load_4bit(tiny_llama_dir)
    load_adapters(ours, tmp_path)
    with torch.no_grad():
        assert max_abs_diff(ours(**inputs).logits, theirs) <= FP32_EXACT
