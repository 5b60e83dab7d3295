"""`tunekit merge` of a QLoRA adapter: the merged model computes what the trained 4-bit model computed.

The adapter learned against the dequantized 4-bit weights, not the checkpoint's full-precision
ones, so merging into the latter shifts every logit. Oracle: the trained 4-bit adapted model's
own logits, in memory, before anything was saved.
"""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_inputs, tiny_llama, tiny_tokenizer, train_losses
from _tolerances import FP32_DEQUANT_MERGE, max_abs_diff
from transformers import AutoModelForCausalLM

from tunekit.adapters import LoRAConfig, inject_adapters, save_adapters
from tunekit.api import BASE_INFO_NAME
from tunekit.cli import main
from tunekit.models import load_model
from tunekit.models.config import ModelConfig

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def trained_qlora(tmp_path_factory):
    """(model, adapter folder): a tiny Llama saved, loaded 4-bit, LoRA on q/v only (the other
    layers stay 4-bit), trained, saved."""
    tmp_path = tmp_path_factory.mktemp("qlora")
    base = tmp_path / "base"
    # bitsandbytes' 4-bit blocks are 64 wide: in_features >= 64
    tiny_llama(hidden_size=64, intermediate_size=128, head_dim=16).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    cfg = ModelConfig(name_or_path=str(base), quantization={"bits": 4, "compute_dtype": "fp32"})
    model, _ = load_model(cfg, task="causal_lm")
    inject_adapters(model, LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = tiny_inputs("llama", batch=2, length=9, seed=1)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = train_losses(model.train(), batch, steps=4, lr=2e-2)
    assert losses[-1] < losses[0]
    adapter = tmp_path / "adapter"
    save_adapters(model, adapter)
    record = {"model": cfg.model_dump(mode="json"), "task": "causal_lm", "label_names": None, "data": None}
    (adapter / BASE_INFO_NAME).write_text(json.dumps(record), encoding="utf-8")
    return model.eval(), adapter


def test_qlora_merge_equals_the_trained_4bit_model(trained_qlora, tmp_path, capsys):
    model, adapter = trained_qlora
    inputs = tiny_inputs("llama", seed=5)
    with torch.no_grad():
        trained = model(**inputs).logits
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert "merged model written to" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert {type(m).__name__ for m in merged.modules()}.isdisjoint({"Linear4bit", "Params4bit"})
    assert merged.dtype == torch.float32
    with torch.no_grad():
        assert max_abs_diff(merged(**inputs).logits, trained) <= FP32_DEQUANT_MERGE


def test_qlora_merge_to_bf16_rounds_the_dequantized_merge(trained_qlora, tmp_path):
    model, adapter = trained_qlora
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--dtype", "bf16"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    # q_proj: W_dequantized + s * B @ A, each element rounded once to bf16 (the formula written out)
    import bitsandbytes.functional as bnbF

    wrapped = model.model.layers[0].self_attn.q_proj
    branch, base = wrapped.adapters["default"], wrapped.base_layer
    with torch.no_grad():
        dequantized = bnbF.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        expected = dequantized + branch.scaling * (branch.lora_B.weight @ branch.lora_A.weight)
    # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-9 of it (2^-8 leaves room
    # for the fp32 sum itself differing in its last bit)
    error = (merged.model.layers[0].self_attn.q_proj.weight.float() - expected).abs()
    assert (error <= expected.abs() * 2**-8).all()
