"""Every adapter family under FSDP2 on 2 processes equals one process; QLoRA's 4-bit base really shards.

DoRA (its weight norm reads the gathered base weight), prefix tuning (its encoder lives in
the root unit and is folded at export), a serial bottleneck, a classifier whose new head
trains in full (``modules_to_save``), fp32 LoRA beside a bf16 base in the same units, and
LoRA on a bitsandbytes nf4 base.
"""

from __future__ import annotations

import math

import pytest
import torch
from _dist_helpers import run_case, save_qlora_base, single_process
from _tolerances import DIST_LOSS_REL, FP32_EXACT
from safetensors.torch import load_file

from tunekit.adapters import save_adapters
from tunekit.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, BATCH, ACCUM = 3, 2, 2


@pytest.fixture(scope="module")
def qlora_base(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return str(save_qlora_base(tmp_path_factory.mktemp("qlora-base")))


def _run(kind: str, tmp_path, base_dir: str | None = None):
    strategy, reference = single_process(kind, steps=STEPS, batch_size=BATCH, accum=ACCUM * 2, base_dir=base_dir,
                                         out=tmp_path / "one")
    save_adapters(strategy.model, tmp_path / "reference")
    case = {"strategy": "fsdp", "kind": kind, "steps": STEPS, "batch_size": BATCH, "accum": ACCUM,
            "out": str(tmp_path / "run"), "base_dir": base_dir}
    return launch(run_case, case, nproc=2, echo=False), reference


def _assert_matches(result, reference, tmp_path):
    for ours, theirs in zip(result["losses"], reference["losses"], strict=True):
        assert abs(ours - theirs) <= DIST_LOSS_REL * abs(theirs)
    ours = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and (ours[key] - theirs[key]).abs().max() <= FP32_EXACT, key


@pytest.mark.parametrize("kind", ["dora", "prefix", "bottleneck", "head", "lora_bf16_base"])
def test_adapter_method_under_fsdp_equals_one_process(kind, tmp_path):
    result, reference = _run(kind, tmp_path)
    _assert_matches(result, reference, tmp_path)
    assert "has shape" in result["refused"]
    if kind == "lora_bf16_base":  # no mixed-precision policy cast the fp32 adapters to the base's bf16
        sizes = result["local_sizes"][0]
        assert {d for _, _, d, trainable in sizes.values() if trainable} == {"torch.float32"}
        assert {d for _, _, d, trainable in sizes.values() if not trainable} == {"torch.bfloat16"}


def test_qlora_under_fsdp_shards_every_frozen_weight_and_equals_one_process(qlora_base, tmp_path):
    result, reference = _run("qlora", tmp_path, base_dir=qlora_base)
    # Sharding changes nothing in the forward: the same logits, bit for bit, before any step.
    assert torch.equal(result["probe_logits"], reference["probe_logits"])
    _assert_matches(result, reference, tmp_path)

    sizes = result["local_sizes"]  # per rank: name -> (local elements, global shape, dtype, trainable)
    four_bit = [n for n, (_, _, dtype, _) in sizes[0].items() if dtype == "torch.uint8"]
    assert len(four_bit) == 7 * 2, "every projection of both layers holds a packed 4-bit weight"
    for name, (_, shape, _, trainable) in sizes[0].items():
        if trainable or not shape:
            continue
        rows, numel = shape[0], math.prod(shape)
        local = [rank[name][0] for rank in sizes]
        assert sum(local) == numel, name  # the shards cover the tensor exactly once
        assert max(local) == math.ceil(rows / 2) * (numel // rows), name  # each rank holds half (dim-0 chunks)
