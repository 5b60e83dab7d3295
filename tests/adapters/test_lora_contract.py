"""The adapter contract for the LoRA family over tiny HF models built from configs.

Rows are (architecture, LoRA config); every row runs every contract check.
"""

from __future__ import annotations

import pytest
import torch
from _quantized import load_4bit, save_tiny_llama
from _tiny import TINY_MODELS, model_output, tiny_inputs
from _tolerances import BF16_MERGE, FP32_DEQUANT_MERGE, FP32_EXACT, FP32_MERGE_ROUNDTRIP, max_abs_diff

from tunekit.adapters import (
    LoRAConfig,
    LoRALayer,
    NotMergeableError,
    disable_adapters,
    eject_adapters,
    inject_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from tunekit.kernels import use_backend

ROWS = [
    ("llama", dict()),
    ("llama", dict(use_rslora=True, target_modules="all-linear")),
    ("llama", dict(use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("gpt2", dict()),  # Conv1D
    ("gpt2", dict(use_dora=True, target_modules=["c_attn", "c_fc"])),
    ("bert", dict(modules_to_save=["classifier"])),
    ("bert", dict(target_modules=r".*attention\.self\.(query|value)")),  # regex
    ("t5", dict()),
    ("t5", dict(use_rslora=True, target_modules="all-linear")),
]
IDS = [f"{arch}-{i}" for i, (arch, _) in enumerate(ROWS)]


def _build(arch: str, kw: dict, *, trained: bool = True):
    torch.manual_seed(0)
    model = TINY_MODELS[arch]()
    inputs = tiny_inputs(arch)
    base_logits = model_output(model, inputs)
    report = inject_adapters(model, LoRAConfig(rank=4, alpha=8, **kw))
    if trained:  # make B (and DoRA's magnitude) non-zero, as after training
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    return model, inputs, base_logits, report


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_identity_at_init(arch, kw):
    model, inputs, base_logits, report = _build(arch, kw, trained=False)
    assert report.wrapped, "nothing was wrapped"
    assert max_abs_diff(model_output(model, inputs), base_logits) <= FP32_EXACT


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_only_adapters_train_and_base_is_unchanged(arch, kw):
    model, inputs, _, _ = _build(arch, kw, trained=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable), trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = model(**inputs).logits
    out.float().pow(2).mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen parameter {name} changed"
    counts = trainable_parameters(model)
    assert counts.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def _merge_formula(branch, w: torch.Tensor, kw: dict) -> torch.Tensor:
    """LoRA: W + s·B·A with s = alpha/r (alpha/sqrt(r) for rsLoRA); DoRA: m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row."""
    rank, alpha = 4, 8  # as _build
    s = alpha / (rank ** 0.5 if kw.get("use_rslora") else rank)
    combined = w.double() + s * (branch.lora_B.weight.double() @ branch.lora_A.weight.double())
    if not kw.get("use_dora"):
        return combined
    m = branch.lora_magnitude_vector.double()
    return (m / combined.norm(dim=1)).unsqueeze(1) * combined


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_merge_unmerge_eject_and_disable(arch, kw):
    model, inputs, base_logits, _ = _build(arch, kw)
    adapted = model_output(model, inputs)
    # well above rounding noise (tiny random BERT heads give logits of ~1e-2)
    assert max_abs_diff(adapted, base_logits) > 10 * FP32_EXACT, "a non-zero B must change the output"
    with disable_adapters(model):
        assert max_abs_diff(model_output(model, inputs), base_logits) <= FP32_EXACT

    layer = next(m for m in model.modules() if isinstance(m, LoRALayer))
    w0 = layer.base_layer.weight.detach().clone()
    merge_adapters(model)
    merged_w = layer.base_layer.weight.detach().clone()
    assert max_abs_diff(model_output(model, inputs), adapted) <= FP32_EXACT
    merge_adapters(model)  # idempotent
    assert torch.equal(layer.base_layer.weight, merged_w)
    got = merged_w.T if arch == "gpt2" else merged_w  # Conv1D stores (in, out)
    expected = _merge_formula(layer.adapters["default"], w0.T if arch == "gpt2" else w0, kw)
    assert max_abs_diff(got, expected) <= FP32_MERGE_ROUNDTRIP  # W_after == W0 + delta
    with disable_adapters(model):  # disabling a merged model unmerges for the block
        assert max_abs_diff(model_output(model, inputs), base_logits) <= FP32_EXACT
    assert max_abs_diff(model_output(model, inputs), adapted) <= FP32_EXACT

    unmerge_adapters(model)
    assert torch.equal(layer.base_layer.weight, w0)  # the original weight is put back
    assert max_abs_diff(model_output(model, inputs), adapted) <= FP32_EXACT

    plain = eject_adapters(model, merge=True)
    assert not any(isinstance(m, LoRALayer) for m in plain.modules())
    assert max_abs_diff(model_output(plain, inputs), adapted) <= FP32_EXACT


@pytest.mark.parametrize(("arch", "kw"), ROWS, ids=IDS)
def test_save_load_roundtrip(arch, kw, tmp_path):
    model, inputs, _, _ = _build(arch, kw)
    adapted = model_output(model, inputs)
    save_adapters(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    torch.manual_seed(0)
    fresh = TINY_MODELS[arch]()
    load_adapters(fresh, tmp_path)
    assert max_abs_diff(model_output(fresh, inputs), adapted) <= FP32_EXACT


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_generate_works(arch):
    model, inputs, _, _ = _build(arch, {})
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == inputs["input_ids"].shape[0] and out.shape[1] >= 4


def test_injected_adapters_follow_the_models_mode():
    model = TINY_MODELS["llama"]().eval()
    inject_adapters(model, LoRAConfig(rank=2, dropout=0.5))
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    assert layers and not any(m.training for layer in layers for m in layer.modules())
    model.train()
    assert all(m.training for layer in layers for m in layer.modules())


@pytest.mark.parametrize("use_dora", [False, True])
def test_trainable_count_matches_closed_form(use_dora):
    """Per wrapped (in, out) layer: r·(in + out) (+ out for DoRA's magnitude); tiny Llama GQA 4:2, head 8."""
    model = TINY_MODELS["llama"]()
    hidden, inter, kv, layers, r = 32, 64, 2 * 8, 2, 4
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),  # q, k, v, o
              (hidden, inter), (hidden, inter), (inter, hidden)]                # gate, up, down
    per_layer = sum(r * (i + o) + (o if use_dora else 0) for i, o in shapes)
    report = inject_adapters(model, LoRAConfig(rank=r, target_modules="all-linear", use_dora=use_dora))
    assert report.trainable_params == trainable_parameters(model).trainable == layers * per_layer
    assert len(report.wrapped) == layers * len(shapes)


def test_lora_forward_follows_autocast():
    """Under bf16 autocast the LoRA layer computes in bf16 like the linear layers around it."""
    model = TINY_MODELS["llama"]()
    inject_adapters(model, LoRAConfig(rank=4, init="random"))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    # The Triton path is a custom autograd Function that autocast does not reach, so the layer
    # must leave it under autocast (the CPU reference path is autocast-aware either way).
    with use_backend("interpret"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        assert layer(x).dtype == torch.float32


# Half-precision and quantized bases: the contract checks whose outcome depends on the base's
# precision (adapters and modules_to_save copies train in fp32 beside them, as PEFT's adapters do).
PRECISION_ROWS = {
    "bf16-lora": ("llama", torch.bfloat16, dict(target_modules="all-linear")),
    "bf16-dora": ("llama", torch.bfloat16, dict(use_dora=True)),
    "bf16-classifier": ("bert", torch.bfloat16, dict(modules_to_save=["classifier"])),
    "4bit-lora": ("llama", "nf4", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
}


@pytest.fixture(scope="module")
def four_bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("tiny-llama-4bit")
    save_tiny_llama(folder)
    return folder


def _precision_base(row: str, request):
    arch, dtype, _ = PRECISION_ROWS[row]
    if dtype == "nf4":
        return load_4bit(request.getfixturevalue("four_bit_dir"))
    torch.manual_seed(0)
    return TINY_MODELS[arch]().to(dtype)


def _precision_build(row: str, request, **extra):
    model = _precision_base(row, request)
    inputs = tiny_inputs(PRECISION_ROWS[row][0])
    base_logits = model_output(model, inputs)
    inject_adapters(model, LoRAConfig(rank=4, alpha=8, **PRECISION_ROWS[row][2], **extra))
    return model, inputs, base_logits


@pytest.mark.parametrize("row", sorted(PRECISION_ROWS))
def test_precision_identity_at_init_and_fp32_trainables(row, request):
    model, inputs, base_logits = _precision_build(row, request)
    assert torch.equal(model_output(model, inputs), base_logits)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert dtypes and set(dtypes.values()) == {torch.float32}, dtypes


@pytest.mark.parametrize("row", sorted(PRECISION_ROWS))
def test_precision_a_tiny_update_is_not_lost(row, request):
    """One SGD step far below bf16's resolution still moves every trainable weight by exactly -lr·grad."""
    model, inputs, _ = _precision_build(row, request, init="random")
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    model.train()
    out = model(**inputs).logits
    assert out.dtype == (torch.float32 if PRECISION_ROWS[row][1] == "nf4" else torch.bfloat16)
    out.float().pow(2).mean().backward()
    lr = 1e-3
    torch.optim.SGD(params, lr=lr).step()
    moved = kept_by_bf16 = 0
    for p, p0 in zip(params, before):
        assert p.dtype == torch.float32 and torch.equal(p, p0 - lr * p.grad)  # the fp32 update, not rounded away
        moved += int((p != p0).sum())
        kept_by_bf16 += int(((p0 - lr * p.grad).bfloat16() != p0.bfloat16()).sum())
    assert moved > 10 * max(kept_by_bf16, 1)  # bf16 weights would have dropped almost all of it


@pytest.mark.parametrize("row", sorted(PRECISION_ROWS))
def test_precision_merge_tolerance_and_save_load(row, request, tmp_path):
    model, inputs, base_logits = _precision_build(row, request, init="random")
    adapted = model_output(model, inputs)
    if PRECISION_ROWS[row][1] == "nf4":
        with pytest.raises(NotMergeableError, match="eject_adapters"):
            merge_adapters(model)
    else:
        merge_adapters(model)
        assert max_abs_diff(model_output(model, inputs), adapted) <= BF16_MERGE
        unmerge_adapters(model)
        assert torch.equal(model_output(model, inputs), adapted)

    save_adapters(model, tmp_path)
    fresh = _precision_base(row, request)
    load_adapters(fresh, tmp_path)
    assert torch.equal(model_output(fresh, inputs), adapted)
    plain = eject_adapters(model, merge=True)
    assert {p.dtype for p in plain.parameters() if p.is_floating_point()} == {
        torch.float32 if PRECISION_ROWS[row][1] == "nf4" else torch.bfloat16}
    tolerance = FP32_DEQUANT_MERGE if PRECISION_ROWS[row][1] == "nf4" else BF16_MERGE
    assert max_abs_diff(model_output(plain, inputs), adapted) <= tolerance
