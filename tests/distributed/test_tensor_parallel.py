"""Tensor parallelism (``tp``, 2 gloo processes) with adapters split beside their base layers equals one process.

One launch trains every (architecture, method) on the same process group with tunekit's
Trainer; the single-process references run here, with the same rows in every step. Checked:
per-step losses and the gradients the optimizer steps with (gathered whole) within 1e-6, the
gathered adapter equal to the single-process save (1e-5) and loadable by PEFT, and the collectives:
LoRA adds none to the base's forward or backward, DoRA adds one all-reduce of squared norms per
rowwise layer in forward, and the explicit partial-gradient reduction is one bucketed all-reduce
per step (plus the global norm's scalar).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tolerances import FP32_EXACT, TP_EXACT, max_abs_diff
from _tp_helpers import LAYERS, PROJECTIONS, base_model, build, encoder_step, reference, run_tp
from safetensors.torch import load_file

from tunekit.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUNS = [("llama", "lora"), ("qwen2", "lora"), ("gpt2", "lora"),  # LoRA on every projection (colwise + rowwise)
        ("llama", "dora"), ("gpt2", "dora"), ("qwen2", "prefix"), ("llama", "bottleneck"), ("gpt2", "prompt")]
COLWISE = {"llama": 5, "qwen2": 5, "gpt2": 2}
"""Colwise plan layers per block (q, k, v, gate, up; GPT-2's packed c_attn, c_fc): an input-gradient all-reduce each."""
ROWWISE = {"llama": 2, "qwen2": 2, "gpt2": 2}
"""Rowwise plan layers per block (o / down; c_proj twice): an output all-reduce each."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("tp")
    case = {"out": str(out), "distributed": {"strategy": "tp", "tp_size": 2}, "runs": RUNS,
            "count": ["llama", "qwen2", "gpt2"], "fused": True,
            "sequence_parallel": True, "encoders": True}
    return launch(run_tp, case, nproc=2, echo=False), out


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("one")
    return {f"{arch}-{method}": reference(arch, method, out) for arch, method in RUNS}, out


def _assert_same_adapter(ours: Path, theirs: Path) -> None:
    a, b = load_file(str(ours / "adapter_model.safetensors")), load_file(str(theirs / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and b
    # Adam divides by sqrt(v): a near-zero gradient's 1e-8 difference can move its weight by ~1e-6
    # after 3 steps; the adapters are held to the other multi-process tests' FP32_EXACT.
    assert all(a[k].shape == b[k].shape and max_abs_diff(a[k], b[k]) <= FP32_EXACT for k in b)
    read = lambda folder: json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))  # noqa: E731
    assert read(ours) == read(theirs)


@pytest.mark.parametrize(("arch", "method"), RUNS, ids=[f"{a}-{m}" for a, m in RUNS])
def test_tp2_equals_one_process_step_by_step(runs, references, arch, method):
    (results, out), (expected, ref_out) = runs, references
    ours, theirs = results[f"{arch}-{method}"], expected[f"{arch}-{method}"]
    assert len(ours["losses"]) == len(theirs["losses"]) == 3
    assert all(abs(a - b) <= TP_EXACT * abs(b) for a, b in zip(ours["losses"], theirs["losses"]))
    for got, want in zip(ours["grads"], theirs["grads"], strict=True):
        assert sorted(got) == sorted(want)
        assert all(got[n].shape == want[n].shape and max_abs_diff(got[n], want[n]) <= TP_EXACT for n in want), \
            max((max_abs_diff(got[n], want[n]), n) for n in want)
    _assert_same_adapter(out / f"{arch}-{method}", ref_out / f"{arch}-{method}")
    # Really split: the TP ranks hold different halves of the colwise / rowwise weights.
    assert [r["frozen"] for r in ours["bytes"]][0] < theirs["bytes"]["frozen"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tp2_lora_adapter_loads_in_peft_with_tunekits_outputs(runs, arch):
    from peft import PeftModel

    _, out = runs
    ids = torch.tensor([[1, 30, 40, 50, 60, 70]])
    peft_model = PeftModel.from_pretrained(base_model(arch), out / f"{arch}-lora").eval()
    assert {n.split(".")[-4] for n, _ in peft_model.named_parameters() if "lora_A" in n} == set(PROJECTIONS[arch])
    from tunekit.adapters import load_adapters

    ours = base_model(arch)
    load_adapters(ours, out / f"{arch}-lora")
    ours.eval()
    with torch.no_grad():
        assert max_abs_diff(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits) <= TP_EXACT


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lora_adds_no_collective_and_the_partial_gradients_meet_in_one_all_reduce(runs, arch):
    results, _ = runs
    comms = results[f"{arch}-comms"]
    # The base's own collectives: one all-reduce per rowwise output (forward), one per colwise
    # input gradient (backward); LoRA on every projection rides on exactly those.
    assert comms["base"] == {"forward": {"all_reduce": ROWWISE[arch] * LAYERS},
                             "backward": {"all_reduce": COLWISE[arch] * LAYERS}}
    assert comms["lora"] == comms["base"]
    # DoRA: one reduction of the squared row norms per rowwise-split weight, in forward only.
    assert comms["dora"] == {"forward": {"all_reduce": 2 * ROWWISE[arch] * LAYERS},
                             "backward": comms["base"]["backward"]}
    run = results[f"{arch}-lora"]
    # Every replicated factor (lora_A beside colwise, lora_B beside rowwise) came back partial ...
    layers_with_lora = (COLWISE[arch] + ROWWISE[arch]) * LAYERS
    assert run["partial_factors"] == [layers_with_lora] * 3
    # ... and optimizer_step reduced them all in ONE bucketed all-reduce, plus the norm's scalar.
    assert run["step_collectives"] == [{"allreduce": 2}] * 3


def test_prefix_gradients_are_reduced_like_factors_and_bottleneck_and_prompt_ones_need_none(runs):
    results, _ = runs
    assert results["qwen2-prefix"]["partial_factors"][0] >= 1  # the KV-head-sharded prefix's gradient
    assert results["qwen2-prefix"]["step_collectives"] == [{"allreduce": 2}] * 3
    # bottlenecks act on the replicated hidden states, a prompt on the replicated input embeddings:
    # full gradients on every rank, nothing to reduce but the norm's scalar
    for run in ("llama-bottleneck", "gpt2-prompt"):
        assert results[run]["partial_factors"] == [0] * 3
        assert results[run]["step_collectives"] == [{"allreduce": 1}] * 3


def test_fused_cross_entropy_under_tp_keeps_the_head_whole_and_equals_one_process(runs, tmp_path):
    # The head (and embeddings) stay replicated: the fused linear + cross-entropy runs unchanged
    # on every rank, with no gather of the head or the logits; only the layers' own all-reduces.
    results, out = runs
    assert results["fused-comms"] == {"all_reduce": ROWWISE["llama"] * LAYERS}
    ours, theirs = results["llama-lora-fused"], reference("llama", "lora", tmp_path, fused=True)
    assert all(abs(a - b) <= TP_EXACT * abs(b) for a, b in zip(ours["losses"], theirs["losses"], strict=True))
    for got, want in zip(ours["grads"], theirs["grads"], strict=True):
        assert all(max_abs_diff(got[n], want[n]) <= TP_EXACT for n in want)
    _assert_same_adapter(out / "llama-lora-fused", tmp_path / "llama-lora-fused")


def test_sequence_parallel_equals_one_process_and_swaps_all_reduces_for_gather_and_reduce_scatter(runs, references):
    results, out = runs
    ours, theirs = results["llama-lora-sp"], references[0]["llama-lora"]
    assert all(abs(a - b) <= TP_EXACT * abs(b) for a, b in zip(ours["losses"], theirs["losses"], strict=True))
    for got, want in zip(ours["grads"], theirs["grads"], strict=True):
        assert all(max_abs_diff(got[n], want[n]) <= TP_EXACT for n in want)
    _assert_same_adapter(out / "llama-lora-sp", references[1] / "llama-lora")
    # Forward: each rowwise output is reduce-scattered onto sequence shards instead of all-reduced;
    # each attention / MLP input and the final norm's output are all-gathered. Backward: each
    # sublayer input's gradient is reduce-scattered once (in place of one all-reduce per colwise
    # layer: q, k, v share one), each reduce-scatter's gradient all-gathered.
    rowwise, sublayers = ROWWISE["llama"] * LAYERS, 2 * LAYERS
    comms = results["sp-comms"]
    assert comms["forward"] == {"reduce_scatter_tensor": rowwise, "all_gather_into_tensor": sublayers + 1}
    # Backward (the first block's scatter: an all-gather of its gradient; the final gather's gradient
    # is whole on every rank, so its scatter is a local slice): as many collectives as forward.
    assert comms["backward"] == {"reduce_scatter_tensor": sublayers, "all_gather_into_tensor": rowwise + 1}


@pytest.mark.parametrize(("arch", "method"), RUNS, ids=[f"{a}-{m}" for a, m in RUNS])
def test_the_estimators_per_rank_bytes_equal_each_ranks_dtensor_local_sizes(runs, arch, method):
    from tunekit.estimate.memory import rank_model_states
    from tunekit.estimate.model import inventory, tp_placements

    results, _ = runs
    model = build(arch, method)  # the whole model: the estimator splits it on paper
    inv, placements = inventory(model), tp_placements(model)
    run = results[f"{arch}-{method}"]
    for measured, where in zip(run["bytes"], run["coordinates"], strict=True):
        ours = rank_model_states(inv, "adamw", tp=2, tp_rank=where["tp"], placements=placements)
        assert (ours.frozen, ours.trainable) == (measured["frozen"], measured["trainable"]), where


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_tunekits_own_plans_for_bert_and_t5_equal_one_process(runs, arch):
    # LoRA on every linear layer: the plan's (q/k/v/o, MLP; T5's relative-position bias split by heads)
    # and the whole ones beside it (BERT's pooler and classifier, T5's head)
    ours, theirs = runs[0]["encoders"][arch], encoder_step(arch)
    assert abs(ours["loss"] - theirs["loss"]) <= TP_EXACT * abs(theirs["loss"])
    assert sorted(ours["grads"]) == sorted(theirs["grads"])
    assert all(max_abs_diff(ours["grads"][n], g) <= TP_EXACT for n, g in theirs["grads"].items())
