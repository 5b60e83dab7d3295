"""Model states per rank: the ZeRO paper's figures, DeepSpeed's documented estimates, and the local sizes
FSDP2 and transformers' tensor-parallel plans really give (on a fake 4-rank process group), plus the
optimizer step's scratch memory against the profiler.
"""

from __future__ import annotations


import pytest
import torch
from _tiny import tiny_gpt2, tiny_llama

from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.estimate.measure import _profiled_step_peak
from tunekit.estimate.memory import (
    deepspeed_zero3_model_states,
    local_rows,
    optimizer_step_transient,
    rank_model_states,
    zero_model_states,
)
from tunekit.estimate.model import ModelSpec, build_model, inventory, tp_placements

GB, GiB, MiB = 1e9, 2**30, 2**20


def test_zero_paper_figure_1():
    # Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B parameters, N_d = 64, K = 12 (mixed-precision Adam).
    figure = {0: 120, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in figure.items():
        assert zero_model_states(7.5e9, 64, stage) / GB == pytest.approx(gb, abs=0.05)


# DeepSpeed docs (docs/code-docs/source/memory.rst), estimate_zero3_model_states_mem_needs_all_cold with
# total_params=2851e6, largest_layer_params=32e6, 1 node x 8 GPUs: (per CPU GB, per GPU GB) per option.
DEEPSPEED_DOC = [
    (dict(offload_params=True, offload_optimizer=True, zero_init=True), (71.69, 0.12)),
    (dict(offload_params=True, offload_optimizer=True, zero_init=False), (127.45, 0.12)),
    (dict(offload_params=False, offload_optimizer=True, zero_init=True), (63.72, 0.78)),
    (dict(offload_params=False, offload_optimizer=True, zero_init=False), (127.45, 0.78)),
    (dict(offload_params=False, offload_optimizer=False, zero_init=True), (1.43, 6.09)),
    (dict(offload_params=False, offload_optimizer=False, zero_init=False), (127.45, 6.09)),
]


@pytest.mark.parametrize(("options", "expected"), DEEPSPEED_DOC)
def test_deepspeed_documented_zero3_example(options, expected):
    cpu, gpu = deepspeed_zero3_model_states(2851e6, 32e6, gpus_per_node=8, nodes=1, **options)
    assert (round(cpu / GiB, 2), round(gpu / GiB, 2)) == expected  # DeepSpeed prints GiB as "GB"


def test_deepspeed_documented_t5_large_gpu_cases():
    # memory.rst: t5-large, 737.67M params, 32.90M largest layer, 4 GPUs -> case1 3291MB, case2 125MB, case3 477MB
    kw = dict(gpus_per_node=4, nodes=1)
    assert int(deepspeed_zero3_model_states(737.67e6, 32.90e6, **kw)[1]) >> 20 == 3291
    assert int(deepspeed_zero3_model_states(737.67e6, 32.90e6, offload_params=True, offload_optimizer=True,
                                            **kw)[1]) >> 20 == 125
    assert int(deepspeed_zero3_model_states(737.67e6, 32.90e6, offload_optimizer=True, **kw)[1]) >> 20 == 477


def test_frozen_parameters_cost_two_bytes_under_deepspeed():
    full = deepspeed_zero3_model_states(1e9, 0, gpus_per_node=4)[1]
    half_frozen = deepspeed_zero3_model_states(1e9, 0, gpus_per_node=4, frozen_params=5e8)[1]
    assert full == 18e9 / 4 and half_frozen == (18 * 5e8 + 2 * 5e8) / 4


@pytest.mark.parametrize(("size", "parts"), [(10, 4), (5, 4), (3, 4), (128, 8), (1, 2)])
def test_local_rows_follow_torch_chunk(size, parts):
    chunks = torch.arange(size).chunk(parts)
    assert [local_rows(size, parts, r) for r in range(parts)] == [
        len(chunks[r]) if r < len(chunks) else 0 for r in range(parts)]


@pytest.fixture
def fake_world(monkeypatch):
    """A 4-rank fake process group (no communication) in which this process is rank 0."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    for key, value in dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", LOCAL_WORLD_SIZE="4").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("fake", rank=0, world_size=4, store=FakeStore())
    yield 4
    dist.destroy_process_group()


def _odd_llama():
    # widths that do not divide by 4 everywhere, so FSDP2's uneven last shards are exercised
    return tiny_llama(vocab_size=101, hidden_size=40, intermediate_size=70, num_attention_heads=4,
                      num_key_value_heads=2)


def test_fsdp2_rank0_local_bytes_equal_the_estimate(fake_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _odd_llama()
    inject_adapters(model, LoRAConfig(rank=3))
    expected = rank_model_states(inventory(model), "adamw", dp=fake_world, dp_rank=0)
    mesh = init_device_mesh("cpu", (fake_world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = {True: 0, False: 0}
    for p in model.parameters():
        local[p.requires_grad] += p.to_local().numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert (expected.frozen, expected.trainable) == (local[False] + buffers, local[True])
    assert expected.gradients == local[True]
    n_tensors = sum(p.requires_grad for p in model.parameters())
    assert expected.optimizer == 2 * local[True] + 4 * n_tensors  # AdamW moments + fp32 step scalars


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tunekit_tp_rank0_local_sizes_equal_the_estimate(fake_world, arch):
    # tunekit's own split (tunekit.distributed.tensor_parallel), LoRA on every projection: the
    # estimate's per-parameter TP rule must give this rank's DTensor local bytes exactly.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from tunekit.distributed.tensor_parallel import parallelize

    if arch == "llama":
        model = tiny_llama(vocab_size=104, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=4)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:
        model, targets = tiny_gpt2(), ["c_attn", "c_proj", "c_fc"]
    inject_adapters(model, LoRAConfig(rank=4, target_modules=targets, use_dora=arch == "gpt2"))
    ours = rank_model_states(inventory(model), "adamw", tp=fake_world, placements=tp_placements(model))
    parallelize(model, init_device_mesh("cpu", (fake_world,)))
    local = {True: 0, False: 0}
    for p in model.parameters():
        local[p.requires_grad] += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert (ours.frozen, ours.trainable) == (local[False] + buffers, local[True])
    assert ours.trainable < sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # really split


def _adamw_step_scratch(foreach: bool) -> tuple[int, int]:
    shapes = [(64, 80), (30,), (100, 100), (7,)]
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s)) for s in shapes])
    params = list(model)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, foreach=foreach)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # states exist from here on, as in every step after the first
    measured = _profiled_step_peak(optimizer.step)
    inv = inventory(model)
    return measured, optimizer_step_transient(inv, "adamw", "cuda" if foreach else "cpu")


@pytest.mark.parametrize("foreach", [True, False], ids=["gpu-foreach", "cpu-loop"])
def test_optimizer_step_scratch_matches_the_profiler(foreach):
    measured, estimated = _adamw_step_scratch(foreach)
    assert 0 <= measured - estimated <= 64  # a few fp32 scalars (bias corrections) on top


def test_optimizers_without_scratch():
    inv = inventory(torch.nn.Linear(8, 8))
    assert optimizer_step_transient(inv, "sgd", "cuda") == optimizer_step_transient(inv, "adamw_8bit", "cuda") == 0


def test_ddp_style_unsharded_states_are_the_whole_model():
    model = _odd_llama()
    inject_adapters(model, LoRAConfig(rank=3))
    inv = inventory(model)
    whole = rank_model_states(inv, "adamw")
    assert whole.frozen == inv.frozen_bytes and whole.trainable == whole.gradients == inv.trainable_bytes
