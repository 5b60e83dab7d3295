"""The adapter contract for serial and parallel bottleneck adapters over tiny HF models.

Rows are (architecture, BottleneckConfig fields); every row runs every contract check.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny import TINY_MODELS, model_output, tiny_inputs
from _tolerances import FP32_EXACT, max_abs_diff
from safetensors.torch import load_file

from tunekit.adapters import (
    AdapterHost,
    BottleneckConfig,
    NotMergeableError,
    delete_adapter,
    disable_adapters,
    inject_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
    set_active_adapters,
    trainable_parameters,
)

ROWS = [
    ("llama", dict(variant="serial")),
    ("llama", dict(variant="parallel", layer_norm=True, scaling="learned")),
    ("gpt2", dict(variant="serial", placement="pfeiffer", activation="gelu")),  # Conv1D base
    ("gpt2", dict(variant="parallel", scaling=4.0)),
    ("bert", dict(variant="serial", modules_to_save=["classifier"])),
    ("bert", dict(variant="parallel", modules_to_save=["classifier"])),  # post-norm wrapper
    ("t5", dict(variant="serial", placement=["attention", "cross_attention", "mlp"])),
    ("t5", dict(variant="parallel", activation="silu", dropout=0.1)),
]
IDS = [f"{arch}-{kw['variant']}-{i}" for i, (arch, kw) in enumerate(ROWS)]


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Make the trainable parameters non-zero, as after training."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def _build(arch: str, kw: dict, *, trained: bool = True):
    torch.manual_seed(0)
    model = TINY_MODELS[arch]()
    base = copy.deepcopy(model)
    inputs = tiny_inputs(arch)
    base_logits = model_output(model, inputs)
    report = inject_adapters(model, BottleneckConfig(hidden_size=4, **kw))
    if trained:
        _perturb(model)
    return model, base, inputs, base_logits, report


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_identity_at_init(arch, kw):
    model, _, inputs, base_logits, report = _build(arch, kw, trained=False)
    assert report.wrapped, "nothing was wrapped"
    assert max_abs_diff(model_output(model, inputs), base_logits) <= FP32_EXACT


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_only_adapters_train_and_base_is_unchanged(arch, kw):
    model, _, inputs, _, _ = _build(arch, kw, trained=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable), sorted(trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**inputs).logits.float().pow(2).mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen parameter {name} changed"
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_disable_equals_base_and_serial_or_sublayer_merge_is_refused(arch, kw):
    model, _, inputs, base_logits, _ = _build(arch, kw)
    adapted = model_output(model, inputs)
    assert max_abs_diff(adapted, base_logits) > 10 * FP32_EXACT, "a trained adapter must change the output"
    with disable_adapters(model):
        assert max_abs_diff(model_output(model, inputs), base_logits) <= FP32_EXACT
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeableError, match="serial|whole sublayer|residual"):
        merge_adapters(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "a refused merge touched weights"
    assert max_abs_diff(model_output(model, inputs), adapted) <= FP32_EXACT


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_save_load_roundtrip(arch, kw, tmp_path):
    model, base, inputs, _, _ = _build(arch, kw)
    adapted = model_output(model, inputs)
    save_adapters(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["tunekit_method"] == "bottleneck" and saved["variant"] == kw["variant"]
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys and all(".adapter_" in k or k.startswith("classifier.") for k in keys), list(keys)
    load_adapters(base, tmp_path)
    assert max_abs_diff(model_output(base, inputs), adapted) <= FP32_EXACT


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_switch_and_delete(arch, kw):
    model, base, inputs, base_logits, _ = _build(arch, kw)
    first = model_output(model, inputs)
    inject_adapters(model, BottleneckConfig(hidden_size=4, **kw), name="other")
    _perturb(model)  # only "other" is active, so only it moves
    second = model_output(model, inputs)
    assert max_abs_diff(first, second) > 10 * FP32_EXACT
    set_active_adapters(model, "default")
    assert max_abs_diff(model_output(model, inputs), first) <= FP32_EXACT
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters.other." in n)
    delete_adapter(model, "default")
    assert max_abs_diff(model_output(model, inputs), base_logits) <= FP32_EXACT  # "other" is inactive
    delete_adapter(model, "other")
    assert not any(isinstance(m, AdapterHost) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]


def _per_sublayer(d: int, m: int, *, d_out: int | None = None, norm: bool = False, learned: bool = False) -> int:
    d_out = d if d_out is None else d_out
    return d * m + m + m * d_out + d_out + (2 * d if norm else 0) + (1 if learned else 0)


COUNT_ROWS = [  # (arch, config fields, closed-form trainable count); tiny models are 32 wide, 2 blocks
    ("llama", dict(variant="serial", hidden_size=4), 4 * _per_sublayer(32, 4)),
    ("llama", dict(variant="parallel", placement="pfeiffer", hidden_size=4, layer_norm=True, scaling="learned"),
     2 * _per_sublayer(32, 4, norm=True, learned=True)),
    ("t5", dict(variant="serial", reduction_factor=8), 8 * _per_sublayer(32, 4)),  # enc 2x2 + dec 2x2 sublayers
    ("bert", dict(variant="parallel", hidden_size=4, modules_to_save=["classifier"]), 4 * _per_sublayer(32, 4) + 32 * 3 + 3),
    # parallel beside GPT-2's c_fc (Conv1D 32 -> 128): m = 128 // 16 (default reduction)
    ("gpt2", dict(variant="parallel", target_modules=["c_fc"]), 2 * _per_sublayer(32, 8, d_out=128)),
]


@pytest.mark.parametrize(("arch", "kw", "expected"), COUNT_ROWS, ids=[f"{r[0]}-{i}" for i, r in enumerate(COUNT_ROWS)])
def test_trainable_count_is_closed_form(arch, kw, expected):
    model = TINY_MODELS[arch]()
    total = sum(p.numel() for p in model.parameters())
    inject_adapters(model, BottleneckConfig(**kw))
    counts = trainable_parameters(model)
    assert counts.trainable == expected
    assert counts.total == total + expected  # the frozen base counts once; a trained head copy is new
