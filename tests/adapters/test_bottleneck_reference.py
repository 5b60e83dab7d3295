"""Bottleneck forward and merge against hand-written references, and the placement table.

The references compute each block by hand from the HF submodules it owns (norms, attention,
MLP, dense + LayerNorm) and the adapter weights, with the paper formulas written out:
serial ``h + s·up(act(down(LN(h))))``, parallel ``sublayer(x) + s·up(act(down(LN(x))))``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _tiny import TINY_MODELS, model_output, tiny_gpt2, tiny_inputs, tiny_llama
from _tolerances import FP32_EXACT, FP32_MERGE_ROUNDTRIP, max_abs_diff
from torch import nn

from tunekit.adapters import (
    BottleneckConfig,
    LoRAConfig,
    NotMergeableError,
    ParallelBottleneck,
    disable_adapters,
    eject_adapters,
    inject_adapters,
    merge_adapters,
    unmerge_adapters,
)

ACTS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda t: t}


def f_ref(host: nn.Module, z: torch.Tensor, cfg: BottleneckConfig, name: str = "default") -> torch.Tensor:
    """``s · up(act(down(LN(z))))`` from the raw parameters of adapter ``name`` in ``host``."""
    p = dict(host.adapters[name].named_parameters())
    if cfg.layer_norm:
        z = F.layer_norm(z, z.shape[-1:], p["adapter_norm.weight"], p["adapter_norm.bias"], eps=1e-5)
    hidden = ACTS[cfg.activation](z @ p["adapter_down.weight"].T + p["adapter_down.bias"])
    scale = p["adapter_scale"] if cfg.scaling == "learned" else cfg.scaling
    return (hidden @ p["adapter_up.weight"].T + p["adapter_up.bias"]) * scale


def _trained(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("cfg", [
    BottleneckConfig(variant="serial", hidden_size=4, activation="gelu", layer_norm=True),
    BottleneckConfig(variant="parallel", hidden_size=4, scaling="learned"),
], ids=["serial", "parallel"])
def test_llama_block_matches_hand_computation(cfg):
    model = tiny_llama()
    inject_adapters(model, cfg)
    _trained(model)
    block, x = model.model.layers[0], torch.randn(2, 5, 32)
    pe = model.model.rotary_emb(x, torch.arange(5)[None])
    kw = dict(position_embeddings=pe, attention_mask=None)
    with torch.no_grad():
        got = block(x, **kw)
        with disable_adapters(model):  # the plain HF sublayers
            h = block.input_layernorm(x)
            attn = block.self_attn(hidden_states=h, **kw)[0]
            host = block.self_attn if cfg.variant == "parallel" else block.self_attn.o_proj
            x1 = x + attn + f_ref(host, h if cfg.variant == "parallel" else attn, cfg)
            h2 = block.post_attention_layernorm(x1)
            mlp = block.mlp(h2)
            host = block.mlp if cfg.variant == "parallel" else block.mlp.down_proj
            want = x1 + mlp + f_ref(host, h2 if cfg.variant == "parallel" else mlp, cfg)
    assert max_abs_diff(got, want) <= FP32_EXACT


@pytest.mark.parametrize("variant", ["serial", "parallel"])
def test_bert_post_norm_sublayers_match_hand_computation(variant):
    cfg = BottleneckConfig(variant=variant, hidden_size=4, activation="tanh")
    model = TINY_MODELS["bert"]()
    inject_adapters(model, cfg)
    _trained(model)
    layer = model.bert.encoder.layer[0]
    inter, x = torch.randn(2, 5, 64), torch.randn(2, 5, 32)  # FFN hidden, FFN input (= residual)
    out = layer.output.base_layer if variant == "parallel" else layer.output
    dense = out.dense.base_layer if variant == "serial" else out.dense
    with torch.no_grad():
        h = inter @ dense.weight.T + dense.bias
        # Houlsby: adapter after the projection, before residual + LN. He et al.: beside the FFN, from its input.
        h = h + (f_ref(out.dense, h, cfg) if variant == "serial" else f_ref(layer.output, x, cfg))
        want = F.layer_norm(h + x, (32,), out.LayerNorm.weight, out.LayerNorm.bias, eps=out.LayerNorm.eps)
        assert max_abs_diff(layer.output(inter, x), want) <= FP32_EXACT


def test_t5_ffn_and_gpt2_attention_parallel_match_hand_computation():
    cfg = BottleneckConfig(variant="parallel", hidden_size=4)
    t5, gpt2 = TINY_MODELS["t5"](), tiny_gpt2()
    for model in (t5, gpt2):
        inject_adapters(model, cfg)
        _trained(model)
    x = torch.randn(2, 5, 32)
    ff = t5.decoder.block[1].layer[2]  # T5LayerFF: x + DenseReluDense(LN(x))
    block = gpt2.transformer.h[0]  # attention returns a tuple: the adapter adds to its first item
    with torch.no_grad():
        n = ff.layer_norm(x)
        want_ff = x + ff.DenseReluDense.base_layer(n) + f_ref(ff.DenseReluDense, n, cfg)
        assert max_abs_diff(ff(x), want_ff) <= FP32_EXACT
        n = block.ln_1(x)
        attn = block.attn.base_layer(n)[0]
        assert max_abs_diff(block.attn(n)[0], attn + f_ref(block.attn, n, cfg)) <= FP32_EXACT


PLACEMENT_ROWS = [  # (arch, variant, placement, wrapped names in block 0 of the first stack)
    ("llama", "serial", "houlsby", ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]),
    ("llama", "parallel", "houlsby", ["model.layers.0.self_attn", "model.layers.0.mlp"]),
    ("gpt2", "serial", "pfeiffer", ["transformer.h.0.mlp.c_proj"]),
    ("gpt2", "parallel", "houlsby", ["transformer.h.0.attn", "transformer.h.0.mlp"]),
    ("bert", "serial", "houlsby", ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"]),
    ("bert", "parallel", "houlsby", ["bert.encoder.layer.0.attention.output", "bert.encoder.layer.0.output"]),
    ("t5", "serial", "houlsby", ["encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense",
                                 "decoder.block.0.layer.0.SelfAttention.o", "decoder.block.0.layer.2.DenseReluDense"]),
    ("t5", "parallel", ["cross_attention"], ["decoder.block.0.layer.1.EncDecAttention"]),
]


@pytest.mark.parametrize(("arch", "variant", "placement", "expected"), PLACEMENT_ROWS)
def test_placement_from_arch_table(arch, variant, placement, expected):
    model = TINY_MODELS[arch]()
    report = inject_adapters(model, BottleneckConfig(variant=variant, placement=placement))
    in_block_0 = [n for n in report.wrapped if not re.search(r"(layers|\.h|encoder\.layer|block)\.1\.", n)]
    assert sorted(in_block_0) == sorted(expected)
    assert len(report.wrapped) == 2 * len(expected)  # two blocks per stack


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_parallel_linear_merge_equals_unmerged(arch):
    # Beside a single linear layer with a bias (GPT-2 Conv1D c_fc, BERT nn.Linear query), an
    # identity-activation adapter is linear: W' = W + s·U·D, b' = b + s·(U·b_D + b_U).
    target = {"gpt2": ["c_fc"], "bert": ["query"]}[arch]
    cfg = BottleneckConfig(variant="parallel", target_modules=target, activation="identity", scaling=0.5,
                           init="random", hidden_size=3)
    model, inputs = TINY_MODELS[arch](), tiny_inputs(arch)
    inject_adapters(model, cfg)
    adapted = model_output(model, inputs)
    host = next(m for m in model.modules() if isinstance(m, ParallelBottleneck))
    base = host.base_layer
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    branch = host.adapters["default"]
    up, down = branch.adapter_up, branch.adapter_down
    delta_w = 0.5 * up.weight @ down.weight
    delta_b = 0.5 * (up.weight @ down.bias + up.bias)

    merge_adapters(model)
    merge_adapters(model)  # idempotent
    w_t = base.weight.T if arch == "gpt2" else base.weight  # Conv1D stores (in, out)
    w0_t = w0.T if arch == "gpt2" else w0
    assert max_abs_diff(w_t, w0_t + delta_w) <= FP32_MERGE_ROUNDTRIP
    assert max_abs_diff(base.bias, b0 + delta_b) <= FP32_MERGE_ROUNDTRIP
    assert max_abs_diff(model_output(model, inputs), adapted) <= FP32_EXACT
    unmerge_adapters(model)
    assert max_abs_diff(base.weight, w0) <= FP32_MERGE_ROUNDTRIP
    plain = eject_adapters(model, merge=True)
    assert not any(isinstance(m, ParallelBottleneck) for m in plain.modules())
    assert max_abs_diff(model_output(plain, inputs), adapted) <= FP32_EXACT


@pytest.mark.parametrize(("kw", "message"), [
    (dict(placement="pfeiffer"), "whole sublayer"),  # beside LlamaMLP: not one weight
    (dict(target_modules=["down_proj"]), "no bias"),  # Llama linears have no bias
    (dict(target_modules=["down_proj"], activation="relu"), "not linear maps"),
])
def test_parallel_merge_refused_before_any_weight_changes(kw, message):
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(rank=2, init="random"), name="lora")  # mergeable on its own
    inject_adapters(model, BottleneckConfig(variant="parallel", hidden_size=2, init="random",
                                            **{"activation": "identity", **kw}), name="adapter")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeableError, match=message):
        merge_adapters(model, ["lora", "adapter"])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unknown_arch_needs_target_modules():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "mamba", "hidden_size": 8})()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    model = Tiny()
    with pytest.raises(ValueError, match="no built-in defaults for model_type 'mamba'"):
        inject_adapters(model, BottleneckConfig())
    report = inject_adapters(model, BottleneckConfig(target_modules=["fc2"], hidden_size=2, init="random"))
    assert report.wrapped == ["fc2"]
    x = torch.randn(3, 8)
    h = model.fc2.base_layer(torch.relu(model.fc1(x)))
    assert max_abs_diff(model(x), h + f_ref(model.fc2, h, BottleneckConfig(hidden_size=2))) <= FP32_EXACT


@pytest.mark.parametrize(("arch", "kw", "message"), [
    ("llama", dict(placement=["cross_attention"]), "no such sublayer"),
    ("gpt2", dict(placement=["cross_attention"]), "matched no module"),  # built without add_cross_attention
    ("llama", dict(target_modules=["nope"]), "matched no module"),
])
def test_bad_placement_is_a_clear_error(arch, kw, message):
    model = TINY_MODELS[arch]()
    with pytest.raises(ValueError, match=message):
        inject_adapters(model, BottleneckConfig(**kw))
    assert not getattr(model, "tunekit_adapter_configs", {})


@pytest.mark.parametrize(("kw", "message"), [
    (dict(hidden_size=4, reduction_factor=8), "not both"),
    (dict(placement="pfeiffer", target_modules=["fc"]), "not both"),
    (dict(activation="swish"), "relu"),
    (dict(scaling="auto"), "learned"),
    (dict(rank=4), "rank"),
])
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**kw)
