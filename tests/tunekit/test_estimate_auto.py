"""``distributed.strategy: auto`` on fake device inventories, checked against numbers the test computes itself.

The oracle: the frozen base's bytes from transformers' own model built on the meta
device (parameters x 2 bytes, bf16), and the sharded model states of each strategy
from ``rank_model_states`` called per strategy here. DDP holds the whole base on
every rank, so it cannot fit under less memory than the base; FSDP holds 1/N of it.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunekit.config import ConfigError, load_config
from tunekit.estimate.auto import AUTO_STRATEGIES, choose_strategy, layout_problem, reuse_saved_strategy
from tunekit.estimate.inputs import from_finetune_config
from tunekit.estimate.memory import rank_model_states
from tunekit.estimate.model import build_model, inventory
from tunekit.estimate.planner import Devices, Layout, candidate_layouts
from tunekit.estimate.units import GiB, format_bytes

# 16 blocks of ~3.2M parameters, small embeddings: the blocks dominate, as in real LLMs.
LLAMA = dict(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=16, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto-llama")
    LlamaConfig(**LLAMA, dtype="bfloat16").save_pretrained(folder)
    return folder


def _cfg(model_dir, **sections):
    tree = {"model": {"name_or_path": str(model_dir), "dtype": "bf16"},
            "adapter": {"method": "lora", "rank": 4},
            "data": {"train_files": ["train.jsonl"], "format": "text", "max_seq_len": 64},
            "train": {"batch_size": 1, "mixed_precision": "bf16"},
            "distributed": {"strategy": "auto"}}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return load_config(tree)


def _base_bytes() -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    return 2 * sum(p.numel() for p in model.parameters())  # bf16


def _states(cfg, dp: int) -> int:
    spec, settings, _ = from_finetune_config(cfg)
    return rank_model_states(inventory(build_model(spec)), settings.optimizer, dp=dp).total


def test_many_large_gpus_pick_ddp_the_cheapest(model_dir):
    cfg = _cfg(model_dir)
    choice = choose_strategy(cfg, Devices(count=8, memory=80 * GiB))
    assert choice.distributed == {"strategy": "ddp", "cpu_offload": False, "reshard_after_forward": True}
    assert choice.peaks["DDP"] >= _states(cfg, dp=1) >= _base_bytes()
    assert choice.line.startswith("distributed.strategy auto -> ddp: LoRA on auto-llama")
    assert f"needs {format_bytes(choice.peaks['DDP'])} per GPU with DDP, on 8 GPUs of 80.00 GiB" in choice.line


def test_gpus_smaller_than_the_base_pick_fsdp_which_holds_a_shard(model_dir):
    cfg, base = _cfg(model_dir), _base_bytes()
    devices = Devices(count=8, memory=int(0.6 * base / 0.9))  # usable: 60% of the base
    choice = choose_strategy(cfg, devices)
    assert choice.distributed == {"strategy": "fsdp", "cpu_offload": False, "reshard_after_forward": True}
    # DDP and the ZeRO-2-like layout (every block gathered after forward) hold the whole base: too big.
    assert choice.peaks["DDP"] > devices.usable and choice.peaks["DDP"] >= base
    assert choice.peaks["FSDP2 ZeRO-2-like (no reshard after forward)"] >= base
    assert _states(cfg, dp=8) <= choice.peaks["FSDP2 ZeRO-3"] <= devices.usable
    assert _states(cfg, dp=8) < _states(cfg, dp=1) / 4  # the shard the oracle says FSDP holds
    assert "cheaper layouts need" in choice.line and "with ddp" in choice.line


@pytest.mark.slow  # the advice plans each fix again (~7 s)
def test_one_small_gpu_refuses_in_one_line_naming_the_need(model_dir):
    cfg, base = _cfg(model_dir), _base_bytes()
    with pytest.raises(ValueError) as err:
        choose_strategy(cfg, Devices(count=1, memory=int(0.5 * base)))
    message = str(err.value)
    assert "\n" not in message and message.startswith("distributed.strategy=auto: nothing fits: LoRA on auto-llama")
    need = float(message.split("needs at least ")[1].split(" MiB")[0]) * 2**20
    assert need >= _states(cfg, dp=1) >= base  # one process holds the whole base
    assert "dominant term: frozen weights" in message
    assert "processes (--nproc 2" in message  # the fix, in finetune's words (not estimate's --gpus)


def test_one_gpu_large_enough_runs_one_process(model_dir):
    assert choose_strategy(_cfg(model_dir), Devices(count=1, memory=80 * GiB)).distributed["strategy"] == "none"


def test_a_model_that_fits_nowhere_names_the_smallest_need(model_dir):
    cfg = _cfg(model_dir)
    devices = Devices(count=8, memory=2**20)
    with pytest.raises(ValueError, match="nothing fits") as err:
        choose_strategy(cfg, devices)
    need = float(str(err.value).split("needs at least ")[1].split(" MiB")[0]) * 2**20
    assert need >= _states(cfg, dp=8) > devices.usable


def test_cpu_only_job_is_its_processes_sharing_host_memory(model_dir):
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    devices = Devices.detect(processes=2, per_node=2)
    assert (devices.kind, devices.count, devices.memory, devices.host_memory) == ("cpu", 2, host // 2, host)
    choice = choose_strategy(_cfg(model_dir), devices)
    assert choice.distributed["strategy"] == "ddp" and "on 2 CPU processes of" in choice.line
    one = choose_strategy(_cfg(model_dir), Devices.detect())
    assert one.distributed["strategy"] == "none" and "with one process, on 1 CPU process" in one.line


def test_only_runnable_layouts_are_candidates(model_dir):
    cfg = _cfg(model_dir)
    eight = Devices(count=8)
    runnable = [l for l in candidate_layouts(cfg_model_config(cfg), eight) if layout_problem(l, eight, cfg) is None]
    assert {l.strategy for l in runnable} <= set(AUTO_STRATEGIES) - {"none"}  # no TP rows, no one-process row
    assert layout_problem(Layout("fsdp", cpu_offload=True), Devices(count=1), cfg).endswith("(tunekit finetune --nproc N)")
    qlora = _cfg(model_dir, model={"quantization": {"bits": 4}})
    assert "cannot run under distributed.strategy=deepspeed" in layout_problem(Layout("deepspeed"), eight, qlora)


def cfg_model_config(cfg):
    return from_finetune_config(cfg)[0].config


def test_no_runnable_strategy_is_one_line_naming_why(model_dir):
    cfg = _cfg(model_dir, train={"fused_cross_entropy": True})
    with pytest.raises(ValueError, match=r"no strategy can run this config on 2 GPUs .*ddp: train.fused_cross_entropy"):
        choose_strategy(cfg, Devices(count=2))


def test_fields_auto_decides_cannot_be_set_beside_it(model_dir):
    with pytest.raises(ConfigError, match="distributed.cpu_offload=True cannot go with distributed.strategy=auto"):
        _cfg(model_dir, distributed={"cpu_offload": True})


def test_a_resume_keeps_the_checkpoint_strategy_when_the_job_can_run_it(model_dir, tmp_path):
    cfg = _cfg(model_dir)
    saved = {"strategy": "fsdp", "cpu_offload": True, "reshard_after_forward": True}
    kept = reuse_saved_strategy(cfg, Devices(count=2), saved, tmp_path)
    assert kept.distributed == saved and "as the checkpoint it resumes" in kept.line
    assert reuse_saved_strategy(cfg, Devices(count=1), saved, tmp_path) is None  # fsdp cannot run on one process
