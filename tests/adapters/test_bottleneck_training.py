"""Bottleneck adapters in use: generate() with a KV cache, a few AdamW steps, and the
"MAM adapter" (He et al., 2022: LoRA on attention + a parallel adapter on the FFN) as two
named adapters active at once."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import TINY_MODELS, model_output, tiny_inputs, tiny_llama, train_losses
from _tolerances import FP32_EXACT, max_abs_diff

from tunekit.adapters import (
    BottleneckConfig,
    LoRAConfig,
    inject_adapters,
    load_adapters,
    save_adapters,
    set_active_adapters,
    trainable_parameters,
)


def _trained(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize(("arch", "variant"), [
    ("llama", "parallel"), ("gpt2", "serial"), ("gpt2", "parallel"), ("t5", "serial"), ("t5", "parallel"),
])
def test_generate_with_cache_equals_without(arch, variant):
    model, inputs = TINY_MODELS[arch](), tiny_inputs(arch)
    inputs.pop("decoder_input_ids", None)
    placement = ["attention", "cross_attention", "mlp"] if arch == "t5" else "houlsby"
    inject_adapters(model, BottleneckConfig(variant=variant, placement=placement, hidden_size=4))
    _trained(model)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = model.generate(**inputs, use_cache=True, **kw)
    uncached = model.generate(**inputs, use_cache=False, **kw)
    assert cached.shape[1] >= 5 and torch.equal(cached, uncached)


@pytest.mark.parametrize(("arch", "variant"), [("llama", "parallel"), ("t5", "serial")])
def test_adamw_steps_reduce_the_loss(arch, variant):
    model, inputs = TINY_MODELS[arch](), tiny_inputs(arch, batch=4)
    labels = inputs["decoder_input_ids"] if arch == "t5" else inputs["input_ids"]
    inject_adapters(model, BottleneckConfig(variant=variant, hidden_size=16))
    # eval mode: no base dropout, so the curve is deterministic
    losses = train_losses(model, {**inputs, "labels": labels}, steps=8, lr=5e-2)
    # ~0.2 nats is well beyond step noise for a fixed batch; random-init tiny models start near ln(V)
    assert losses[-1] < losses[0] - 0.2, losses


def test_mam_adapter_lora_plus_parallel_bottleneck(tmp_path):
    model = tiny_llama()
    base = copy.deepcopy(model)
    inputs = tiny_inputs("llama")
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]), name="lora")
    inject_adapters(model, BottleneckConfig(variant="parallel", placement="pfeiffer", hidden_size=8, scaling=4.0),
                    name="adapter")
    set_active_adapters(model, ["lora", "adapter"])
    _trained(model)  # both active, so both move
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".adapters.lora." in n for n in names) and any(".adapters.adapter." in n for n in names)
    both = model_output(model, inputs)
    singles = []
    for name in ("lora", "adapter"):
        set_active_adapters(model, name)
        singles.append(model_output(model, inputs))
    assert all(max_abs_diff(both, s) > 10 * FP32_EXACT for s in singles)

    set_active_adapters(model, ["lora", "adapter"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any(".adapters.lora." in n for n in moved) and any(".adapters.adapter." in n for n in moved)
    trained = model_output(model, inputs)

    written = save_adapters(model, tmp_path)
    assert sorted(p.name for p in written) == ["adapter", "lora"]  # PEFT layout: named subfolders
    load_adapters(base, tmp_path / "lora", name="lora")
    load_adapters(base, tmp_path / "adapter", name="adapter")
    set_active_adapters(base, ["lora", "adapter"])
    assert max_abs_diff(model_output(base, inputs), trained) <= FP32_EXACT
    assert trainable_parameters(base).trainable == trainable_parameters(model).trainable
